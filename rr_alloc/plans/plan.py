"""The sparsity plan: a versioned, validated, replayable JSON document.

Schema (version 1), unit ``weight_fraction``::

    {
      "schema": "rr_alloc.plan", "version": 1, "unit": "weight_fraction",
      "budget": 0.9, "budget_unit": "weights" | "flops", "achieved_sparsity": 0.9,
      "allocator": "rr-greedy", "repair": "bn>asr@block+logits",
      "layers": [{"name": "layer1.0.conv1", "sparsity": 0.93, "n_pruned": 2143,
                  "n_weights": 2304, "shape": [16, 16, 3, 3]}, ...],
      "source": {"model": ..., "num_classes": ..., "checkpoint": ..., "checkpoint_sha256": ...,
                 "data": {DataSpec}, "device": ...},
      "calibration": {"size": 1024, "selection_size": 1024, "seed": 0},
      "profile": {"grid": [...], "s_max": 0.99, "lambda": "mean", ...},
      "verify": {"split": "test", "n": ..., "top1": ..., "agreement": ..., "kl": ...,
                 "dense_top1": ..., "reference": {"allocator": "global", ...}},
      "tool": {"name": "rr_alloc", "version": "0.1.0"}, "created": "ISO-8601"
    }

``sparsity`` = ``n_pruned / n_weights``; ``achieved_sparsity`` is parameter-weighted
over the listed layers (or MAC-weighted when ``budget_unit`` is ``flops``).

Version 2 adds ``pattern`` (``"2:4"``: N:M masks, N kept of every M input
channels at one kernel position; ``n_pruned`` is what that pattern prunes) and
``mask_rule``: ``magnitude`` (each layer's ``n_pruned`` smallest ``|w|``, what every
downstream tool does) or ``obs`` (the repair pipeline chooses which weights to prune,
keeping the counts; only ``rr_alloc apply`` / ``verify`` reproduce those masks). Plans
with magnitude masks are still written as version 1 (with ``mask_rule`` beside it), so older readers keep reading them;
an ``obs`` plan is version 2, so an older reader refuses it instead of
re-pruning it by magnitude.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from ..nn.pruning import Pruning, parse_pattern
from ..system.files import check_input_file, write_text_atomic
from ..version import __version__
from .paths import paths_relative_to, paths_resolved_from
from .schema import Violation, schema_violations

__all__ = ["Plan", "LayerPlan", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA = "rr_alloc.plan"
SCHEMA_VERSION = 2  # the newest version this code reads and writes
READ_VERSIONS = (1, 2)
MASK_RULES = ("magnitude", "obs")
BUDGET_UNITS = ("weights", "flops")
UNIT = "weight_fraction"


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (``float`` and its subclasses, e.g. numpy.float64) as ``None``, recursively."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# line breaks (also U+2028/2029, NEL) and other control characters: plan strings are one line of text
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _check_text(obj: Any, where: str, key: str) -> None:
    """Refuse any string (value or key, at any depth) that holds a control character, naming its key."""
    if isinstance(obj, str):
        m = _CONTROL.search(obj)
        if m:
            raise UserError(
                f"{where}: {key or 'a value'} holds the control character {m.group()!r}: plan strings "
                "are one line of plain text; regenerate the plan with `rr_alloc search`"
            )
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_text(
                k,
                where,
                f"{key}.{k}".lstrip(".") if isinstance(k, str) and not _CONTROL.search(k) else (key or "a key"),
            )
            _check_text(v, where, f"{key}.{k}".lstrip("."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_text(v, where, f"{key}[{i}]")


@dataclass(frozen=True)
class LayerPlan:
    name: str
    n_pruned: int
    n_weights: int
    shape: tuple[int, ...]

    @property
    def sparsity(self) -> float:
        return self.n_pruned / self.n_weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sparsity": self.sparsity,
            "n_pruned": self.n_pruned,
            "n_weights": self.n_weights,
            "shape": list(self.shape),
        }


@dataclass
class Plan:
    """Per-layer pruned counts plus everything needed to rebuild and verify them."""

    layers: list[LayerPlan]
    budget: float
    allocator: str
    repair: str
    budget_unit: str = "weights"
    mask_rule: str = "magnitude"
    pattern: str | None = None  # "N:M" plans: keep N of every M input channels at one kernel position
    achieved_sparsity: float | None = None
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)  # provenance of a searched plan (optimiser, scores, fallback)
    rule_choice: dict[str, Any] = field(default_factory=dict)  # best-rule: every rule's selection score, the winner
    tool: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if self.achieved_sparsity is None:
            self.achieved_sparsity = self.weight_sparsity

    @property
    def weight_sparsity(self) -> float:
        total = sum(l.n_weights for l in self.layers)
        return sum(l.n_pruned for l in self.layers) / total if total else 0.0

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M plan, else ``None``."""
        return parse_pattern(self.pattern) if self.pattern else None

    def pruning(self) -> Pruning:
        """What the plan removes: its N:M pattern over its layers, else its per-layer counts."""
        if self.pattern:
            return Pruning(nm=self.nm, layers=tuple(layer.name for layer in self.layers))
        return Pruning(counts=self.counts)

    @property
    def counts(self) -> dict[str, int]:
        return {l.name: l.n_pruned for l in self.layers}

    @property
    def sparsities(self) -> dict[str, float]:
        return {l.name: l.sparsity for l in self.layers}

    def to_dict(self) -> dict[str, Any]:
        version = 1 if self.mask_rule == "magnitude" and not self.pattern else SCHEMA_VERSION
        return {
            "schema": SCHEMA,
            "version": version,
            "unit": UNIT,
            "mask_rule": self.mask_rule,
            **({"pattern": self.pattern} if self.pattern else {}),
            "budget": self.budget,
            "budget_unit": self.budget_unit,
            "achieved_sparsity": self.achieved_sparsity,
            "allocator": self.allocator,
            "repair": self.repair,
            "layers": [l.to_dict() for l in self.layers],
            "source": self.source,
            "calibration": self.calibration,
            "profile": self.profile,
            "verify": self.verify,
            **({"search": self.search} if self.search else {}),
            **({"rule_choice": self.rule_choice} if self.rule_choice else {}),
            "tool": self.tool or {"name": "rr_alloc", "version": __version__},
            "created": self.created,
        }

    def save(self, path: str | Path, folder: str | Path | None = None) -> Path:
        """Write the plan atomically (a failed write never replaces a good plan).

        Relative checkpoint and data paths are written relative to ``folder`` (default: the plan's own
        folder), so a replay from any working directory finds them. Non-finite numbers (a NaN metric) are
        written as ``null``: bare ``NaN`` is not JSON.
        """
        d = self.to_dict()
        d["source"] = paths_relative_to(self.source, folder if folder is not None else Path(path).parent)
        return write_text_atomic(path, json.dumps(_finite(d), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> "Plan":
        """Validate against the JSON Schema, then what a schema cannot express; one-line ``UserError``."""
        if not isinstance(d, dict):
            raise UserError(f"{where} is not a JSON object: pass a plan written by rr_alloc")
        _check_text(d, where, "")
        violations = schema_violations(d)
        if violations:
            raise UserError(_explain(min(violations, key=_priority), d, where))
        layers = _layers(d["layers"], where)
        mask_rule, pattern = d.get("mask_rule", "magnitude"), d.get("pattern")
        if d["version"] == 1 and (mask_rule != "magnitude" or pattern is not None):
            raise UserError(
                f"{where} has mask_rule {mask_rule!r} or an N:M pattern: version-1 plans use "
                "magnitude masks; that needs plan version 2"
            )
        if pattern is not None:
            parse_pattern(pattern)
        _check_totals(layers, d, where)
        return cls(
            layers,
            float(d["budget"]),
            str(d["allocator"]),
            str(d["repair"]),
            d.get("budget_unit", "weights"),
            mask_rule,
            pattern,
            d.get("achieved_sparsity"),
            d.get("source", {}),
            d.get("calibration", {}),
            d.get("profile", {}),
            d.get("verify", {}),
            search=d.get("search", {}),
            rule_choice=d.get("rule_choice", {}),
            tool=d.get("tool", {}),
            created=d.get("created", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        check_input_file(p, "plan", "--plan", "the JSON written by `rr_alloc search --out`")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"plan {p} is not UTF-8 text (byte {e.start}): pass the JSON written by `rr_alloc search`")
        except OSError as e:
            raise UserError(f"cannot read plan {p} ({e.strerror}): check the path and its permissions")

        def no_nan(token: str) -> None:  # bare NaN / Infinity are not JSON
            raise ValueError(f"{token} is not a JSON number")

        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:  # a repeated key: which value would win?
            keys = [k for k, _ in pairs]
            twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if twice is not None:
                raise ValueError(f"key {twice!r} appears twice in one object")
            return dict(pairs)

        try:
            d = json.loads(text, parse_constant=no_nan, object_pairs_hook=unique)
        except RecursionError:
            raise UserError(f"plan {p} is nested too deeply to be a plan: pass the JSON written by `rr_alloc search`")
        except json.JSONDecodeError as e:
            raise UserError(f"plan {p} is not valid JSON (line {e.lineno}): regenerate it")
        except ValueError as e:
            raise UserError(f"plan {p} is not valid JSON ({e}): regenerate it")
        try:
            plan = cls.from_dict(d, where=f"plan {p}")
        except RecursionError:
            raise UserError(f"plan {p} is nested too deeply to be a plan: pass the JSON written by `rr_alloc search`")
        if plan.source.get("paths") == "plan":  # written relative to the plan's folder: back to usable paths
            plan.source = paths_resolved_from(plan.source, p.parent)
        return plan

    def check_model(self, model: nn.Module) -> None:
        """Every plan layer exists in ``model`` with the recorded weight shape."""
        mods = dict(model.named_modules())
        for l in self.layers:
            m = mods.get(l.name)
            if m is None or not hasattr(m, "weight"):
                raise UserError(
                    f"plan layer {l.name} is not a layer of this model: use the model the plan was made for"
                )
            if tuple(m.weight.shape) != l.shape:
                raise UserError(
                    f"plan layer {l.name} has shape {list(l.shape)} but the model's is "
                    f"{list(m.weight.shape)}: use the model the plan was made for"
                )


# the schema's top-level keys in the order their problems are reported (identity first, then the core fields)
_ORDER = ("schema", "version", "mask_rule", "unit", "", "layers", "budget", "budget_unit", "achieved_sparsity")


def _priority(v: Violation) -> tuple[int, list[str]]:
    head = str(v.path[0]) if v.path else ""
    return (_ORDER.index(head) if head in _ORDER else len(_ORDER), list(map(str, v.path)))


def _explain(v: Violation, d: dict[str, Any], where: str) -> str:
    """The schema violation in the words of the field it concerns, with the fix."""
    head = v.path[0] if v.path else None
    regen = "regenerate it with `rr_alloc search`"
    if head == "schema":
        return f"{where} is not an rr_alloc plan (schema {d.get('schema')!r}): pass a plan written by `rr_alloc search`"
    if head == "version":
        return (
            f"{where} has plan schema version {d.get('version')!r}; this rr_alloc reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}: regenerate it or upgrade rr_alloc"
        )
    if head == "unit":
        return f"{where} has unit {d.get('unit')!r}, expected {UNIT!r}"
    if head == "mask_rule":
        return f"{where} has mask_rule {d.get('mask_rule')!r}: use one of {', '.join(MASK_RULES)}"
    if head is None and v.rule == "required":
        return f"{where} lacks the key {v.message.split(' is a required')[0]}: {regen}"
    if v.path == ("layers",):
        return f"{where} lists no layers: {regen}"
    if head == "layers" and len(v.path) == 2:
        return f"{where}: layer entry {v.path[1]} needs name, sparsity, n_weights and shape"
    if head == "layers" and v.path[2] == "sparsity":
        entry = d["layers"][v.path[1]]
        return f"{where}: layer {entry.get('name')} has sparsity {entry.get('sparsity')!r} outside [0, 1)"
    if head == "budget":
        return f"{where}: budget {d.get('budget')!r} outside (0, 1): {regen}"
    if head == "budget_unit":
        return f"{where} has budget_unit {d.get('budget_unit')!r}: use one of {', '.join(BUDGET_UNITS)}"
    if head == "achieved_sparsity":
        return f"{where}: achieved_sparsity {d.get('achieved_sparsity')!r} is not a fraction in [0, 1): {regen}"
    return f"{where}: {v} (see docs/plan.schema.json): {regen}"


def _check_totals(layers: list[LayerPlan], d: dict[str, Any], where: str) -> None:
    """A weight-budget plan's totals agree with its layers: ``achieved_sparsity`` is their weight sparsity,
    and the budget is met to the weight (an N:M plan's budget is its achieved sparsity). FLOP plans need
    the model's MACs for this and are checked where they are verified."""
    if d.get("budget_unit", "weights") != "weights":
        if d.get("achieved_sparsity") is None:  # a MAC sparsity cannot be derived from the file alone
            raise UserError(
                f"{where} counts its budget in FLOPs but has no achieved_sparsity (its layers' MAC sparsity): "
                "regenerate it with `rr_alloc search`"
            )
        return
    n = sum(layer.n_weights for layer in layers)
    sparsity = sum(layer.n_pruned for layer in layers) / n
    achieved = d.get("achieved_sparsity")
    if achieved is not None and abs(achieved - sparsity) > 1e-9:
        raise UserError(
            f"{where}: achieved_sparsity {achieved} contradicts its layers, which prune {sparsity:.6f} of their "
            "weights: regenerate it with `rr_alloc search` (or drop the key: it is computed from the layers)"
        )
    if abs(float(d["budget"]) - sparsity) > 1.0 / n + 1e-12:
        raise UserError(
            f"{where}: budget {d['budget']} contradicts its layers, which prune {sparsity:.6f} of their weights: "
            "regenerate it with `rr_alloc search`"
        )


def _layers(entries: list[dict[str, Any]], where: str) -> list[LayerPlan]:
    """The layer entries (schema-valid) checked for what the schema cannot say: unique names, a shape that
    holds ``n_weights``, and ``n_pruned`` within one weight of ``sparsity * n_weights``."""
    layers, seen = [], set()
    for entry in entries:
        name, n_w, shape = entry["name"], int(entry["n_weights"]), tuple(int(v) for v in entry["shape"])
        sp = float(entry["sparsity"])
        if name in seen:
            raise UserError(f"{where}: layer {name} is listed twice")
        seen.add(name)
        if math.prod(shape) != n_w:
            raise UserError(f"{where}: layer {name} has n_weights {n_w} but shape {list(shape)}")
        k = int(entry["n_pruned"]) if "n_pruned" in entry else int(round(sp * n_w))
        if not k < n_w or abs(k / n_w - sp) > 1.0 / n_w + 1e-9:
            raise UserError(f"{where}: layer {name} has n_pruned {k} inconsistent with sparsity {sp}")
        layers.append(LayerPlan(name, k, n_w, shape))
    return layers
