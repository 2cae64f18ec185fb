"""Checkpoint loading without running code: ``torch.load(weights_only=True)`` (common wrappers unwrapped) or
``.safetensors`` files (tensors only by design)."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..system.files import check_input_file

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")


# torch's message for a refused global starts with advice to retry with weights_only=False ("will
# likely succeed"), i.e. to execute the file; only the name of the refused global is passed on.
_GLOBAL_RE = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.<>]+)")


def _load_failure(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words without torch's unsafe hints."""
    text = str(e)
    m = _GLOBAL_RE.search(text)
    if m:
        return f"it holds a Python object ({m.group(1)}), not only tensors"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    safe = [l for l in lines if "weights_only" not in l and "trust" not in l]
    if isinstance(e, pickle.UnpicklingError) or not safe:
        return f"it is not a tensor-only PyTorch checkpoint ({type(e).__name__})"
    return f"it is not a readable PyTorch checkpoint ({safe[0].split('. ')[0][:160]})"


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a state_dict from a checkpoint without executing code from it.

    Accepts a plain state_dict or a dict wrapping one under a common key
    (``state_dict``, ``model``, ...), and strips ``module.`` (DataParallel) and
    ``_orig_mod.`` (torch.compile) prefixes. Tensors saved on CUDA land on
    ``map_location``.
    """
    path = check_input_file(path, "checkpoint", "--checkpoint", "a state_dict file (.pt, .pth, .th, .safetensors)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    try:
        with warnings.catch_warnings():  # torch's warnings (old formats, quantised storages) would precede the
            warnings.simplefilter("ignore")  # one error line, or say nothing the checks below do not
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # weights_only=True is named as what rr_alloc does, never the unsafe False as a way out
        raise UserError(
            f"cannot load checkpoint {path} with weights_only=True: {_load_failure(e)}; rr_alloc "
            "never runs code from a checkpoint: save a plain state_dict "
            "(torch.save(model.state_dict(), path)) from the trusted code that made it"
        ) from None
    if isinstance(obj, dict):
        for k in _WRAPPER_KEYS:
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"checkpoint {path} holds no state_dict of tensors: save it as torch.save(model.state_dict(), path)"
        )
    for p in _PREFIXES:
        if obj and all(k.startswith(p) for k in obj):
            obj = {k[len(p) :]: v for k, v in obj.items()}
    return _plain_tensors(obj, path)


def _plain_tensors(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Dense tensors with values: sparse ones are made dense (the same numbers); tensors without values (the meta
    device) or quantised ones are refused in one line."""
    out = {}
    for k, v in sd.items():
        if v.is_meta:
            raise UserError(
                f"checkpoint {path} stores {k} on the meta device (shapes without values): save it after the "
                "weights are materialised (model.to('cpu') before torch.save)"
            )
        if v.is_nested:
            raise UserError(
                f"checkpoint {path} stores {k} as a nested tensor: save a plain state_dict of dense tensors"
            )
        if v.is_floating_point() and v.dtype.itemsize == 1:  # float8 formats: widened to float32 (exact)
            v = v.float()
        if v.is_quantized:
            raise UserError(
                f"checkpoint {path} stores {k} as a quantised tensor ({str(v.dtype).replace('torch.', '')}): pass "
                "the floating-point checkpoint the quantised model was made from"
            )
        out[k] = v.to_dense() if v.layout != torch.strided else v
    return out


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file: tensors and their names only, read without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if not isinstance(map_location, str) else map_location
    try:
        obj = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(
            f"cannot read checkpoint {path} as safetensors ({why}): the file is corrupt or truncated; "
            "pass an intact .safetensors file"
        ) from None
    for p in _PREFIXES:
        if obj and all(k.startswith(p) for k in obj):
            obj = {k[len(p) :]: v for k, v in obj.items()}
    return _plain_tensors(obj, path)


def load_checkpoint(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load ``path`` into ``model`` strictly, with a one-line error on any mismatch."""
    sd = read_state_dict(path, map_location)
    own = model.state_dict()
    # checkpoints from PyTorch < 0.4.1 lack BatchNorm's step counter; it does not affect eval
    for k in own:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(
            f"checkpoint {path} does not match the model: {', '.join(parts)}; "
            "pass the --model this checkpoint was trained with"
        )
    # an int8 (quantised) or complex tensor would be cast into a float parameter without a word, giving a
    # model that runs and is wrong (int8 weights: 10% top-1; complex: the imaginary part dropped)
    kinds = [k for k in own if own[k].is_floating_point() and not sd[k].is_floating_point()]
    if kinds:
        k = kinds[0]
        raise UserError(
            f"checkpoint {path} stores {k} as {str(sd[k].dtype).replace('torch.', '')}, but the model's parameter "
            f"is {str(own[k].dtype).replace('torch.', '')}: pass a floating-point checkpoint (quantised or complex "
            "weights are not loaded as floats)"
        )
    # NaN/inf weights make every metric NaN far downstream (and a plan that is not valid JSON): refuse them here
    bad = [k for k, v in sd.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(
            f"checkpoint {path} has non-finite values (NaN or inf) in {bad[0]}{more}: "
            "pass a checkpoint saved before training diverged"
        )
    model.load_state_dict(sd, strict=True)
