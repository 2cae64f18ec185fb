"""Helpers shared by the study scripts: locating shared/, configs, intervals, atomic outputs.

Studies import the library; nothing here re-implements it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rr_alloc.config.files import load_config_file  # noqa: E402
from rr_alloc.config.run_config import RunConfig  # noqa: E402
from rr_alloc.errors import UserError  # noqa: E402
from rr_alloc.system.runtime import tune_malloc  # noqa: E402

tune_malloc()  # studies are programs, run like the CLI (see rr_alloc/runtime.py)

MODELS = {"resnet20": "configs/cifar10_resnet20.yaml", "resnet32": "configs/cifar10_resnet32.yaml"}


def shared_dir(arg: str | None) -> Path:
    """The shared/ folder: ``--shared``, else ``$RR_ALLOC_SHARED``, else ``../shared`` beside the repo."""
    p = Path(arg or os.environ.get("RR_ALLOC_SHARED") or ROOT.parent / "shared")
    if not (p / "weights" / "cifar10-resnet").is_dir():
        raise SystemExit(f"error: {p} holds no weights/cifar10-resnet: pass --shared PATH or set RR_ALLOC_SHARED")
    os.environ["RR_ALLOC_SHARED"] = str(p)
    return p


def run_main(main: Callable[[], None]) -> None:
    """Run a study's ``main``: bad input ends with the library's one-line ``error: ...`` and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def model_config(model: str, **overrides: Any) -> RunConfig:
    """The model's config file (checkpoint, data, grid) with ``overrides``. The studies verify with
    ``obs>bn>naive@block+logits`` unless they pass ``repair=``; the file's ``distill_size`` (for its ``kd``
    step) goes with a repair that has a ``kd`` step only."""
    kw = load_config_file(ROOT / MODELS[model])
    kw["repair"] = "obs>bn>naive@block+logits"
    kw.update(overrides)
    if "distill_size" not in overrides and not any(p.split(":")[0] == "kd" for p in kw["repair"].split(">")):
        kw.pop("distill_size", None)
    return RunConfig(**kw)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny grid, one model, small splits")


def t_interval(values: list[float] | np.ndarray, conf: float = 0.95) -> tuple[float, float, float]:
    """Mean and the half-width of a Student-t interval over seeds (nan for one value)."""
    from scipy import stats

    v = np.asarray(values, float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + conf / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, half, float(v.std(ddof=1))


def ci_text(values: list[float] | np.ndarray, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± half-width`` of a t interval over seeds, scaled (no interval with one value)."""
    m, h, _ = t_interval(values)
    sign = "+" if signed else ""
    return f"{scale * m:{sign}.{digits}f}" + ("" if np.isnan(h) else f" ± {scale * h:.{digits}f}")


def write_report(path: Path, lines: list[str]) -> None:
    """A study's markdown report: written atomically (its folder made if needed) and printed."""
    from rr_alloc.system.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")
    print("\n".join(lines))


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def peak_rss_mb(setup: str, work: str) -> tuple[float, float]:
    """(peak RSS during ``work``, RSS just before it), MB, measured in a fresh Python process.

    ``setup`` and ``work`` are code lines (``studies/`` is importable). The kernel's high-water mark is
    reset right before ``work`` (``/proc/self/clear_refs``), so the peak is the work's own, not an
    earlier one (decoding, imports); where that reset is not allowed the process-lifetime peak is reported.
    """
    import subprocess
    import textwrap

    code = (
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "studies")!r})
        def status(key):
            return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))
        """)
        + textwrap.dedent(setup)
        + textwrap.dedent("""
        base = status('VmRSS:')
        try:
            open('/proc/self/clear_refs', 'w').write('5')
        except OSError:
            pass
        """)
        + textwrap.dedent(work)
        + "\nprint(status('VmHWM:') / 1024, base / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, base = map(float, out.stdout.split()[-2:])
    return peak, base
