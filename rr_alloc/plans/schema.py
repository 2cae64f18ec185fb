"""The plan's JSON Schema: the one declared source of what a plan file may hold.

``Plan.from_dict`` validates every plan against it first (explaining a violation of a core field in
that field's words), then checks only what a schema cannot say (unique names, shapes, totals);
``docs/plan.schema.json`` is this schema, written by
``python -m rr_alloc.plans.schema > docs/plan.schema.json`` (a test checks the two match), so
downstream tools can validate plans without rr_alloc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["PLAN_SCHEMA", "schema_errors", "schema_violations", "Violation"]

# one line of text: no control characters, no Unicode line or paragraph separators
_TEXT = {"type": "string", "pattern": "^[^\\u0000-\\u001f\\u007f\\u2028\\u2029]*$"}
_OPT_TEXT = {"anyOf": [_TEXT, {"type": "null"}]}
_FRACTION = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
_OPT_NUMBER = {"type": ["number", "null"]}
_METRICS = {
    "type": "object",
    "properties": {
        "split": _TEXT,
        "n": {"type": "integer", "minimum": 0},
        "repair": _TEXT,
        "top1": _OPT_NUMBER,
        "agreement": _OPT_NUMBER,
        "kl": _OPT_NUMBER,
        "dense_top1": _OPT_NUMBER,
        "achieved_sparsity": _OPT_NUMBER,
        "allocator": _TEXT,
    },
}

PLAN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rr_alloc per-layer sparsity plan",
    "description": "Per-layer pruned counts and everything needed to rebuild and verify them. sparsity = "
    "n_pruned / n_weights (fraction of each layer's weights). Version 2 adds mask_rule 'obs' "
    "(masks chosen by the repair, reproduced only by rr_alloc) and N:M patterns.",
    "type": "object",
    "required": ["schema", "version", "unit", "budget", "allocator", "repair", "layers"],
    "properties": {
        "schema": {"const": "rr_alloc.plan"},
        "version": {"enum": [1, 2]},
        "unit": {"const": "weight_fraction"},
        "mask_rule": {"enum": ["magnitude", "obs"]},
        "pattern": {"type": "string", "pattern": "^[0-9]+:[0-9]+$"},
        "budget": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "budget_unit": {"enum": ["weights", "flops"]},
        "achieved_sparsity": {"anyOf": [_FRACTION, {"type": "null"}]},
        "allocator": _TEXT,
        "repair": _TEXT,
        "layers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "sparsity", "n_weights", "shape"],
                "properties": {
                    "name": {**_TEXT, "minLength": 1},
                    "sparsity": _FRACTION,
                    "n_pruned": {"type": "integer", "minimum": 0},
                    "n_weights": {"type": "integer", "minimum": 1},
                    "shape": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}},
                },
            },
        },
        "source": {
            "type": "object",
            "properties": {
                "model": _TEXT,
                "num_classes": {"type": ["integer", "null"], "minimum": 1},
                "pretrained": {"type": "boolean"},
                "checkpoint": _OPT_TEXT,
                "checkpoint_sha256": {"anyOf": [{"type": "string", "pattern": "^[0-9a-f]{64}$"}, {"type": "null"}]},
                "model_fingerprint": _OPT_TEXT,
                "data_fingerprint": {
                    "type": "object",
                    "description": "SHA-256 of the decoded calibration, selection and test images",
                    "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
                "paths": {
                    "enum": ["plan"],
                    "description": "relative checkpoint and data paths are relative to the plan's folder (else to "
                    "the working directory)",
                },
                "include": {"type": "array", "items": _TEXT},
                "exclude": {"type": "array", "items": _TEXT},
                "batch_size": {"type": "integer", "minimum": 1},
                "data": {
                    "type": "object",
                    "properties": {
                        "kind": _TEXT,
                        "train": _OPT_TEXT,
                        "test": _OPT_TEXT,
                        "transform": {"type": ["object", "null"]},
                        "calib_size": {"type": "integer", "minimum": 1},
                        "selection_size": {"type": "integer", "minimum": 0},
                        "validation_size": {"type": "integer", "minimum": 0},
                        "distill_size": {"type": "integer", "minimum": 0},
                        "eval_size": {"type": ["integer", "null"], "minimum": 1},
                        "seed": {"type": "integer"},
                        "download": {"type": "boolean"},
                    },
                },
            },
        },
        "calibration": {
            "type": "object",
            "properties": {
                "size": {"type": "integer", "minimum": 0},
                "selection_size": {"type": "integer", "minimum": 0},
                "validation_size": {"type": "integer", "minimum": 0},
                "distill_size": {"type": "integer", "minimum": 0},
                "seed": {"type": "integer"},
                "bn_check": {
                    "type": "object",
                    "description": "BatchNorm recalibration of the dense model on the calibration images, "
                    "against the dense model on the selection split; moves: the default repair left bn out",
                    "properties": {
                        "agreement": _OPT_NUMBER,
                        "kl": _OPT_NUMBER,
                        "n": {"type": "integer", "minimum": 0},
                        "min_agreement": _OPT_NUMBER,
                        "moves": {"type": "boolean"},
                    },
                },
            },
        },
        "profile": {
            "type": "object",
            "properties": {
                # a non-finite value is written as null (never bare NaN): still a readable plan
                "grid": {"type": "array", "items": {"anyOf": [_FRACTION, {"type": "null"}]}},
                "s_max": _FRACTION,
            },
        },
        "verify": {
            **_METRICS,
            "properties": {
                **_METRICS["properties"],
                "reference": _METRICS,
                "repair_left": {
                    "type": "object",
                    "description": "layers the repair left as they were: why",
                    "additionalProperties": _TEXT,
                },
                "repair_swept": {
                    "type": "array",
                    "description": "layers re-fitted by SparseGPT's sweep (above the exact re-fit's budget)",
                    "items": _TEXT,
                },
                "repair_distill": {
                    "type": "object",
                    "description": "the kd step's settings, the images it fitted on and its first and last loss",
                },
                "repair_path": {
                    **_TEXT,
                    "description": "how the reconstruction reached its layers: one lockstep pass, or per-layer "
                    "partial passes (a model torch.fx cannot trace, or activations above the memory cap)",
                },
            },
        },
        "search": {
            "type": "object",
            "description": "provenance of a searched plan: optimiser, trials, every anchor rule's selection score "
            "and the best rule the search started from, best selection and validation scores, whether the "
            "fallback to the anchor fired",
            "properties": {
                "optimizer": _TEXT,
                "anchor": _TEXT,
                "trials": {"type": "integer", "minimum": 0},
                "fallback": {"type": ["boolean", "null"]},
                "validation_size": {"type": "integer", "minimum": 0},
            },
        },
        "rule_choice": {
            "type": "object",
            "description": "how allocator best-rule chose: every rule's loss on the selection split (lower is "
            "better) under the repair and objective that scored them, and the rule chosen",
            "properties": {
                "chosen": _TEXT,
                "repair": _TEXT,
                "objective": _TEXT,
                "selection_size": {"type": "integer", "minimum": 0},
                "scores": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
            },
            "required": ["chosen", "scores"],
        },
        "tool": {"type": "object", "properties": {"name": _TEXT, "version": _TEXT}},
        "created": {"type": "string"},
    },
}


@dataclass(frozen=True)
class Violation:
    """One way a document breaks the schema: where (``path``), which rule (``rule``), and the message."""

    path: tuple[str | int, ...]
    rule: str
    message: str

    def __str__(self) -> str:
        where = (
            "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(self.path))
            or "(top level)"
        )
        return f"{where}: {self.message}"


def schema_violations(doc: Any) -> list[Violation]:
    """Every way ``doc`` breaks ``PLAN_SCHEMA``, ordered by path (empty when it is valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(PLAN_SCHEMA)
    found = [
        Violation(tuple(e.absolute_path), str(e.validator), e.message.splitlines()[0][:200])
        for e in validator.iter_errors(doc)
    ]
    return sorted(found, key=lambda v: list(map(str, v.path)))


def schema_errors(doc: Any) -> list[str]:
    """``path: message`` of each way ``doc`` breaks ``PLAN_SCHEMA`` (empty when it is valid)."""
    return [str(v) for v in schema_violations(doc)]


if __name__ == "__main__":
    print(json.dumps(PLAN_SCHEMA, indent=2))
