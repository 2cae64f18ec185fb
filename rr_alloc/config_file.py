"""Config files: YAML presets (``safe_load``, unique keys, ``$VAR`` expansion) read into ``RunConfig`` keywords."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import UserError
from .io_utils import check_input_file

__all__ = ["load_config_file"]

_ENV = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            if name not in os.environ:
                raise UserError(
                    f"{where} uses ${{{name}}}, which is not set: export {name}=PATH "
                    "(see the README) or pass the path as a flag"
                )
            return os.environ[name]

        return os.path.expanduser(_ENV.sub(sub, value))
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (safe_load) into validated ``RunConfig`` keyword arguments."""
    import yaml

    p = Path(path)
    check_input_file(p, "config file", "--config", "an existing YAML file")
    try:
        # a SafeLoader subclass: builds plain data only, and refuses a repeated key
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {p} is not UTF-8 text (byte {e.start}): pass a YAML file")
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must be a mapping of option: value")
    known = {f.name: f for f in fields(RunConfig)}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key == "budget":
            raise UserError(f"config file {p}: the budget is not a config key: pass --budget B on the command line")
        if key not in known:
            raise UserError(f"config file {p}: unknown key {k!r}; known keys: {', '.join(sorted(known))}")
        if known[key].metadata["many"] and v is not None:
            v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        out[key] = _expand(v, f"config file {p} ({k})")
    return out


def _unique_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    """A YAML mapping whose keys are unique: a repeated key is an error, never the last value silently."""
    import yaml

    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _unique_key_loader() -> type:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """``yaml.safe_load`` with unique keys."""

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
    return UniqueKeyLoader
