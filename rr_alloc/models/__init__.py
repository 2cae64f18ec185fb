"""Model zoo and checkpoint loading."""

from ..data.transforms import TransformSpec
from .checkpoint import load_checkpoint, read_state_dict
from .registry import build_model, default_transform, list_models

__all__ = ["build_model", "default_transform", "list_models", "load_checkpoint", "read_state_dict", "TransformSpec"]
