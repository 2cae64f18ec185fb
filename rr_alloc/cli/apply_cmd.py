"""``apply`` and ``export``: turn a plan into pruned weights, or into a downstream tool's format."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..evaluation import repaired_model
from ..nn.metrics import compare_logits, logits_of
from ..plans.export import FORMAT_HELP, check_exportable, export_plan, exporter, reconstruction_note
from ..plans.plan import Plan
from ..plans.replay import model_from_plan, session_for_plan
from ..repair.persist import save_pruned, spec_path
from ..system.files import atomic_path
from .flags import REPLAY_GROUPS, add_plan_flags, add_run_flags, config_for_plan
from .outputs import check_command_output, outputs_in_place

__all__ = ["register"]


def register(sub: Any) -> None:  # argparse's subparsers object (its class is not public)
    a = sub.add_parser(
        "apply",
        help="rebuild a plan's model, prune, repair, and save the pruned weights",
        description="Rebuild the dense model and data from the plan's source block (the "
        "checkpoint's SHA-256 must match), prune by the plan, repair, check the "
        "per-layer sparsity, evaluate, and save a plain state_dict.",
    )
    add_plan_flags(a)
    a.add_argument("--out", required=True, help="output file (.pt)")
    a.add_argument(
        "--format",
        choices=["state_dict", "torchscript"],
        default="state_dict",
        help="state_dict (default) or a TorchScript module",
    )
    add_run_flags(a, REPLAY_GROUPS)
    a.set_defaults(handler=cmd_apply)

    e = sub.add_parser(
        "export",
        help="write a plan in a downstream tool's format",
        description="Formats: torch-prune (Python module applying torch.nn.utils.prune), "
        "torch-pruning (channel ratios; see the unit conversion in the file), "
        "llm-compressor and sparseml (recipe YAML), nni / nni-v2 (config_list JSON), "
        "masks (per-layer boolean masks, .pt), csv, markdown.",
    )
    add_plan_flags(e)
    e.add_argument("--format", required=True, help=FORMAT_HELP)
    e.add_argument("--out", required=True, help="output file")
    add_run_flags(e, REPLAY_GROUPS)
    e.set_defaults(handler=cmd_export)


def cmd_apply(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    cfg = config_for_plan(args, plan)
    # before any work, not after it: never the plan or the checkpoint, never a link or a device
    check_command_output(args.out, "--out", args, cfg, plan, siblings=(spec_path(args.out),))
    session = session_for_plan(plan, cfg)
    model, report = repaired_model(session, session.pruning(plan.counts), cfg.repair)
    _print_zeros(plan, model)
    dense_logits, labels = session.dense_logits("test")
    m = compare_logits(logits_of(model, session.splits.test, session.device)[0], labels, dense_logits)
    print(
        f"repair {cfg.repair}: test {f'top-1 {100 * m.top1:.2f}% ' if m.top1 is not None else ''}on {m.n} images "
        f"(agreement {100 * m.agreement:.2f}%, KL {m.kl:.4f})"
    )
    out = Path(args.out)
    if args.format == "torchscript":
        _save_torchscript(model, out, session.splits.calib.x[:2].to(session.device))
        return 0
    spec = save_pruned(model, out, args.plan)
    outputs_in_place()
    if spec is None:
        print(
            f"wrote {out}: plain state_dict, every correction folded into existing parameters; "
            f"load it into the unmodified {cfg.model} with load_state_dict"
        )
    else:
        print(
            f"wrote {out} and {spec.name}: corrections at {len(report.affine_sites)} sites "
            f"({', '.join(report.affine_sites[:3])}{'...' if len(report.affine_sites) > 3 else ''}) cannot fold "
            "into existing parameters and live in small per-channel affine modules; load with "
            "rr_alloc.load_pruned(model, path), which re-attaches them from the spec"
        )
    return 0


def _print_zeros(plan: Plan, model: nn.Module) -> None:
    """Each layer's zeros against the plan's counts (a layer with fewer zeros than planned is a bug)."""
    rows, ok = [], True
    for l in plan.layers:
        zeros = int((model.get_submodule(l.name).weight == 0).sum())
        rows.append(
            {
                "layer": l.name,
                "weights": l.n_weights,
                "planned": l.n_pruned,
                "zeros": zeros,
                "sparsity": round(zeros / l.n_weights, 4),
            }
        )
        ok &= zeros >= l.n_pruned
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    total = table.zeros.sum() / table.weights.sum()
    print(f"achieved global sparsity {total:.4f} (plan {plan.weight_sparsity:.4f})")
    if not ok:
        raise RuntimeError("a layer has fewer zeros than planned: this is a bug, please report it")


def _save_torchscript(model: nn.Module, out: Path, example: torch.Tensor) -> None:
    """``model`` as TorchScript at ``out`` (scripted, or traced on ``example`` when it does not script)."""
    with warnings.catch_warnings():  # torch.jit's deprecation notices say nothing about this file
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
            how = "scripted"
        except Exception:
            scripted = torch.jit.trace(model, example)
            how = "traced (the model does not script)"
        with atomic_path(out) as tmp:
            torch.jit.save(scripted, str(tmp))
    spec_path(out).unlink(missing_ok=True)  # a state_dict's repair spec from an earlier run does not apply
    outputs_in_place()
    print(f"wrote {out} (TorchScript, {how}; load with torch.jit.load)")


def cmd_export(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    ex = exporter(args.format)
    check_exportable(plan, args.format)  # before the output check and any model is built
    cfg = config_for_plan(args, plan)
    check_command_output(args.out, "--out", args, cfg, plan)
    note = reconstruction_note(plan)  # parses the plan's repair: a bad one fails before anything is written
    # every format, not only those that read the model: the README promises that an export checks the
    # plan against its model (layers and shapes) and its checkpoint (SHA-256)
    model = model_from_plan(plan, cfg)
    # a FLOP plan's MAC totals need the images' size: the data are loaded to check them
    loaded = session_for_plan(plan, cfg, progress=False) if plan.budget_unit == "flops" else None

    def obs_masks() -> dict:
        session = loaded or session_for_plan(plan, cfg)
        _, report = repaired_model(session, session.pruning(plan.counts), cfg.repair)
        return report.masks

    path = export_plan(
        plan, args.format, args.out, model=model, masks_fn=obs_masks if ex.binary and plan.mask_rule == "obs" else None
    )
    outputs_in_place()
    print(f"wrote {path} ({args.format})")
    if note:
        print(f"note: {note}")
    return 0
