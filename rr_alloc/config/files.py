"""Config files: YAML presets (``safe_load``, unique keys, ``$VAR`` expansion) read into ``RunConfig`` keywords."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..system.files import check_input_file
from .run_config import RunConfig

__all__ = ["load_config_file"]

_ENV = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


MAX_NODES = 100_000  # a config is a few dozen values: more, once aliases are expanded, is an alias bomb


class UnsetVariable(UserError):
    """A ``${VAR}`` in a config value names a variable that is not set."""


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple)):  # include/exclude patterns, grids: each element expands
        return type(value)(_expand(v, where) for v in value)
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            if name not in os.environ:
                raise UnsetVariable(
                    f"{where} uses ${{{name}}}, which is not set: export {name}=PATH "
                    "(see the README) or pass the path as a flag"
                )
            return os.environ[name]

        return os.path.expanduser(_ENV.sub(sub, value))
    return value


def load_config_file(path: str | Path, overridden: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Read a YAML config (safe_load) into ``RunConfig`` keyword arguments.

    ``overridden``: keys the command line sets; an unset ``${VAR}`` in one of them is no error (the flag
    wins), and the key is left out.
    """
    import yaml

    p = Path(path)
    check_input_file(p, "config file", "--config", "an existing YAML file")
    try:
        # a SafeLoader subclass: builds plain data only, and refuses a repeated key
        loader = _unique_key_loader()(p.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_NODES:
                raise UserError(
                    f"config file {p} expands to more than {MAX_NODES:,} values (YAML aliases): write the values out"
                )
            raw = (loader.construct_document(node) if node is not None else None) or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {p} is not UTF-8 text (byte {e.start}): pass a YAML file")
    except RecursionError:
        raise UserError(f"config file {p} is nested too deeply: a config is a flat mapping of option: value")
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must be a mapping of option: value")
    known = {f.name: f for f in fields(RunConfig)}
    out: dict[str, Any] = {}
    spelled: dict[str, Any] = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key == "budget":
            raise UserError(f"config file {p}: the budget is not a config key: pass --budget B on the command line")
        if key not in known:
            raise UserError(f"config file {p}: unknown key {k!r}; known keys: {', '.join(sorted(known))}")
        if key in spelled:
            raise UserError(f"config file {p} sets {key!r} twice (as {spelled[key]!r} and {k!r}): keep one")
        spelled[key] = k
        if known[key].metadata["many"] and v is not None:
            v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        try:
            out[key] = _expand(v, f"config file {p} ({k})")
        except UnsetVariable:
            if key not in overridden:
                raise
    return out


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (each shared node sized once)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a node that contains itself counts once
        value = node.value if isinstance(node.value, list) else []
        items = [x for pair in value for x in (pair if isinstance(pair, tuple) else (pair,))]
        memo[id(node)] = 1 + sum(_expanded_size(x, memo) for x in items)
    return memo[id(node)]


def _unique_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    """A YAML mapping whose keys are unique: a repeated key is an error, never the last value silently."""
    import yaml

    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged keys may be overridden (YAML's own rule)
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:  # a list or mapping as a key
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain name, not {type(key).__name__}", key_node.start_mark
            )
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
