"""Rebuilding what a plan was made from: its model (checkpoint hash checked), data and session."""

from __future__ import annotations

import copy
import glob
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..config.run_config import RunConfig
from ..errors import UserError
from ..models import build_model, load_checkpoint
from ..models.sources import parse_model_name
from ..nn.pruning import apply_masks
from ..profiling.store import fingerprint_model
from ..session import Session
from ..system.files import check_input_file, sha256_file
from .plan import Plan

__all__ = [
    "config_from_plan",
    "is_code_spec",
    "check_plan_model",
    "check_checkpoint_hash",
    "model_from_plan",
    "session_for_plan",
    "check_pattern_counts",
    "check_mac_totals",
    "apply_plan",
]


def config_from_plan(plan: Plan) -> dict[str, Any]:
    """``RunConfig`` keyword arguments that rebuild the plan's model and data."""
    src = plan.source
    # the plan's own layer names select its layers (as exact patterns): an include/exclude pattern it was made
    # with may match nothing on a later build, and the layer set is checked against the plan anyway
    layers = {"include": tuple(glob.escape(l.name) for l in plan.layers), "exclude": ()}
    if not src:  # the caller's flags (--model, --dataset, ...) rebuild the model: config_for_plan asks for them
        return {"repair": plan.repair, "unit": plan.budget_unit, "pattern": plan.pattern, **layers}
    data = src.get("data", {})
    kw = {
        "model": src.get("model"),
        "checkpoint": src.get("checkpoint"),
        "num_classes": src.get("num_classes"),
        "pretrained": bool(src.get("pretrained", False)),
        "dataset": data.get("kind"),
        "train_data": data.get("train"),
        "test_data": data.get("test"),
        "transform": data.get("transform"),
        "calib_size": data.get("calib_size"),
        "selection_size": data.get("selection_size"),
        "validation_size": data.get("validation_size", 0),
        "distill_size": data.get("distill_size", 0),
        "eval_size": data.get("eval_size"),
        "seed": data.get("seed", 0),
        "download": data.get("download", False),
        **layers,
        "batch_size": src.get("batch_size", 256),
        "repair": plan.repair,
        "unit": plan.budget_unit,
        "pattern": plan.pattern,
    }
    if plan.profile.get("grid"):
        kw["grid"] = tuple(plan.profile["grid"])
        kw["s_max"] = plan.profile.get("s_max", 0.99)
    return {k: v for k, v in kw.items() if v is not None}


def is_code_spec(name: str) -> bool:
    """Whether naming ``name`` imports and runs code (``package.module:factory``), unlike a zoo, torchvision or
    timm name."""
    return parse_model_name(name)[0].runs_code


def check_plan_model(plan: Plan, cfg_model: str, cli_model: str | None, trust: bool) -> None:
    """Refuse to import a ``package.module:factory`` that only the plan file names.

    A received plan is data: importing code must be the caller's choice (``--model`` with the
    same spec, or ``--trust-plan-model``). Runs before anything is built or imported.
    """
    src_model = plan.source.get("model") if plan.source else None
    if trust or cfg_model != src_model or not isinstance(src_model, str) or not is_code_spec(src_model):
        return
    if cli_model == src_model:
        return
    raise UserError(
        f"the plan's model {src_model!r} is code (package.module:factory) that the plan alone cannot "
        f"make rr_alloc import: pass --model {src_model} if you trust it (or --trust-plan-model)"
    )


def check_checkpoint_hash(plan: Plan, checkpoint: str | None = None) -> None:
    """The checkpoint a replay loads (``checkpoint``, else the plan's own) exists and has the SHA-256 the
    plan recorded: a moved checkpoint passes, other weights do not."""
    own, want = plan.source.get("checkpoint"), plan.source.get("checkpoint_sha256")
    ck = checkpoint or own
    if not (ck and want):
        return
    if ck != own:  # the user's file: missing, a folder or a pipe is named as such
        check_input_file(ck, "checkpoint", "--checkpoint", "a copy of the plan's checkpoint")
    elif not Path(ck).is_file():
        raise UserError(f"the plan's checkpoint {ck} does not exist: pass --checkpoint with its new location")
    if sha256_file(ck) == want:
        return
    if ck == own:
        raise UserError(
            f"checkpoint {ck} changed since the plan was made (SHA-256 differs): re-run search on the new checkpoint"
        )
    raise UserError(
        f"checkpoint {ck} is not the one the plan was made from ({own}; SHA-256 differs): pass that checkpoint "
        "(or a copy of it), or re-run search on this one"
    )


def model_from_plan(plan: Plan, cfg: RunConfig) -> nn.Module:
    """The plan's dense model (checkpoint hash checked), without loading any data."""
    check_checkpoint_hash(plan, cfg.checkpoint)
    model = build_model(cfg.model, cfg.num_classes, cfg.pretrained)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    model = model.eval()
    plan.check_model(model)
    check_model_fingerprint(plan, cfg, fingerprint_model(model))
    check_pattern_counts(plan, model)
    return model


def check_model_fingerprint(plan: Plan, cfg: RunConfig, fingerprint: str) -> None:
    """A plan made without a checkpoint (random weights from the fixed seed, downloaded or factory weights)
    is replayed on the same weights: the model's fingerprint must be the one recorded."""
    src = plan.source
    want = src.get("model_fingerprint")
    if not want or src.get("checkpoint_sha256") or fingerprint == want:
        return
    if cfg.checkpoint:
        raise UserError(
            f"checkpoint {cfg.checkpoint} gives other weights than the model the plan was made from (which had no "
            "checkpoint; its fingerprint differs): leave --checkpoint out, or re-run search on this checkpoint"
        )
    raise UserError(
        f"model {cfg.model} built here has other weights than the one the plan was made from (its fingerprint "
        "differs: another library version, factory or download): pass --checkpoint with the plan's weights, or "
        "re-run search here"
    )


_TRAIN_KEYS = ("kind", "train", "transform", "calib_size", "selection_size", "seed")
_TEST_KEYS = ("kind", "test", "transform", "eval_size")


def _same_spec(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
    def norm(k: str, v: Any) -> Any:
        return os.path.abspath(os.path.expanduser(v)) if k in ("train", "test") and isinstance(v, str) else v

    return all(norm(k, a.get(k)) == norm(k, b.get(k)) for k in keys)


def check_data_fingerprint(plan: Plan, session: Session) -> None:
    """The images a replay decodes are the ones the plan was made from, split by split (a split whose
    source the caller overrode, e.g. another --test-data, is the caller's choice and not compared)."""
    want = plan.source.get("data_fingerprint") or {}
    have = session.data_fingerprints
    spec, rebuilt = plan.source.get("data") or {}, session.data_spec.to_dict()
    for split, keys, flag in (
        ("calib", _TRAIN_KEYS, "--train-data"),
        ("selection", _TRAIN_KEYS, "--train-data"),
        ("test", _TEST_KEYS, "--test-data"),
    ):
        if split in want and _same_spec(spec, rebuilt, keys) and have[split] != want[split]:
            folder = rebuilt.get("train" if flag == "--train-data" else "test")
            fix = (
                f"replay where the plan's paths lead to its data, or pass {flag} with the original images"
                if folder
                else "the plan's data settings (seed, sizes, transform) were edited or the library changed them: "
                "regenerate the plan"
            )
            raise UserError(
                f"the {split} images read from {folder or rebuilt.get('kind')} are not the ones the plan was made "
                f"from (their fingerprint differs): {fix}"
            )


def check_pattern_counts(plan: Plan, model: nn.Module) -> None:
    """An N:M plan's counts are what its pattern prunes on ``model`` (an edited pattern contradicts them)."""
    if plan.pattern and plan.pruning().pruned_counts(model) != plan.counts:
        raise UserError(
            f"the plan's layer counts are not what its pattern {plan.pattern} prunes on this model: regenerate it"
        )


def check_mac_totals(plan: Plan, session: Session) -> None:
    """A FLOP plan's ``achieved_sparsity`` is the MAC sparsity of its layers on this model, and its budget is met
    to one weight of the costliest layer (both are edited in a file, never re-derived from it)."""
    if plan.budget_unit != "flops":
        return
    achieved = session.achieved(plan.counts)
    if abs(achieved - plan.achieved_sparsity) > 1e-6:
        raise UserError(
            f"the plan's achieved_sparsity {plan.achieved_sparsity} is not the MAC sparsity of its layers on this "
            f"model ({achieved:.6f}): regenerate it"
        )
    cost = session.macs_per_weight
    n = [layer.n_weights for layer in session.layers]
    tol = float(cost.max() / (cost * n).sum()) + 1e-9
    if abs(plan.budget - achieved) > tol:
        raise UserError(
            f"the plan's budget {plan.budget} contradicts its layers, which prune {achieved:.6f} of the model's MACs: "
            "regenerate it with `rr_alloc search`"
        )


def session_for_plan(plan: Plan, cfg: RunConfig, progress: bool = True) -> Session:
    """Rebuild the plan's model and data as ``cfg`` says (usually ``config_from_plan`` plus overrides).

    Checks the checkpoint's hash against the plan's record, the layer shapes and the layer set.
    """
    check_checkpoint_hash(plan, cfg.checkpoint)
    made_for = plan.source.get("model") if plan.source else None
    try:
        # the plan records the pipeline it was verified with, bn or not: the calibration check has nothing to choose
        session = Session(cfg, progress=progress, check_calibration=False)
    except UserError as e:
        if not made_for or made_for == cfg.model:
            raise
        # the plan's layers select the model's (as --include patterns): on another model the first error is
        # about a layer, and the cause is the model
        raise UserError(
            f"{e} (the plan was made for model {made_for}, not {cfg.model}: pass --model {made_for}, or make a "
            f"plan for {cfg.model} with `rr_alloc search`)"
        ) from None
    plan.check_model(session.dense)
    if {l.name for l in session.layers} != {l.name for l in plan.layers}:
        raise UserError(
            "the plan's layers differ from the model's prunable layers: use the plan's "
            "--include/--exclude or regenerate the plan"
        )
    check_model_fingerprint(plan, cfg, session.model_fingerprint)
    check_data_fingerprint(plan, session)
    check_pattern_counts(plan, session.dense)
    check_mac_totals(plan, session)
    return session


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False) -> nn.Module:
    """Magnitude-prune ``model`` by ``plan`` (layer-local counts, or its N:M pattern); no repair."""
    plan.check_model(model)
    target = model if inplace else copy.deepcopy(model)
    apply_masks(target, plan.pruning().keep_masks(target))
    return target
