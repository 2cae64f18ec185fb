"""Helpers shared by the tests of bad input: one-line errors, small image folders, hostile files, replays."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch

from rr_alloc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_error(capsys, code: int) -> str:
    """Assert the CLI's bad-input contract (exit 2, one ``error:`` line, no traceback); return the line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def bad_search(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "out" / "plan.json"
    code = main(["search", *args, "--out", str(out)])
    err = one_error(capsys, code)
    assert not out.parent.exists() or not list(out.parent.iterdir())
    return err


def file_mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


class RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def hostile_checkpoint(kind: str, path: Path, marker: Path) -> None:
    if kind == "runs-code":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode(marker)}, path)
    elif kind == "custom-class":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": Custom()}, path)
    elif kind == "plain-object":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 16)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(64)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def strict_json(text: str):
    import json

    def refuse(token: str):
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def image_folder(root: Path, per_class: int = 8, size: int = 32, classes: int = 2, seed: int = 0) -> Path:
    """A synthetic ImageFolder: ``classes`` subfolders of random RGB images, alternating PNG and JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(px).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


def corrupt(path: Path, how: str) -> Path:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, "PNG" if path.suffix == ".png" else "JPEG")
    data = buf.getvalue()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not an image" * 8, "empty": b""}[how])
    return path


def touch_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def payloads(marker: Path) -> dict[str, str]:
    code = touch_code(marker)
    return {
        "newline": f"x\n{code}\n",
        "cr": f"x\r{code}\r",
        "u2028": f"x\u2028{code}",
        "docstring": f'x"""; {code}; """',
        "yaml-key": "x\ninjected: 1\nmodifiers: []",
    }


def simple_plan(**kw):
    from rr_alloc.plans.plan import LayerPlan, Plan

    layers = [LayerPlan(kw.pop("layer", "conv"), 5, 10, (2, 5)), LayerPlan("fc", 3, 10, (10,))]
    return Plan(
        layers,
        0.5,
        kw.pop("allocator", "global"),
        "bn",
        budget_unit=kw.pop("budget_unit", "weights"),
        source={"model": kw.pop("model", "digits_resnet")},
    )


# the smallest variant of each family, random weights; VGG-11-BN with a narrow classifier (the stock one
# holds 119 M weights and takes ~5 min on 2 cores, tests/factories.py); convnext_tiny takes ~30 s
SLOW_FAMILIES = {"convnext_tiny"}


TV_FAMILIES = [
    "resnet18",
    "factories:vgg11_bn_small",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
]


EVIL_FACTORY = """import os, pathlib
pathlib.Path(os.environ["RR_EVIL_MARKER"]).touch()  # importing this module is the attack


def factory(num_classes=10):
    pathlib.Path(os.environ["RR_EVIL_MARKER"] + ".called").touch()
    raise SystemExit("called")
"""


def with_model(plan: Path, model: str, dest: Path) -> Path:
    import json

    d = json.loads(plan.read_text())
    d["source"]["model"] = model
    dest.write_text(json.dumps(d))
    return dest


def replay_argv(cmd: str, plan: Path, out: Path, *extra: str) -> list[str]:
    if cmd == "verify":
        return ["verify", "--plan", str(plan), *extra]
    if cmd == "apply":
        return ["apply", "--plan", str(plan), "--out", str(out), *extra]
    return ["export", "--plan", str(plan), "--format", cmd.split(":")[1], "--out", str(out), *extra]


EXPORT_FORMATS = [
    "masks",
    "torch-pruning",
    "csv",
    "markdown",
    "torch-prune",
    "nni",
    "nni-v2",
    "sparseml",
    "llm-compressor",
]


REPLAY_CMDS = ["verify", "apply"] + [f"export:{f}" for f in EXPORT_FORMATS]


def unwritable(tmp_path: Path, where: str) -> Path:
    """An output path that cannot be written: under a file, or under /proc."""
    if where == "under-file":
        f = tmp_path / "a_file"
        f.write_text("x")
        return f / "sub" / "result"
    return Path("/proc") / "rr_alloc_test" / "result"


OPTUNA_ARGS = ["--allocator", "optuna", "--calib-size", "64", "--selection-size", "32", "--no-verify"]


QUICK = ("--calib-size", "64", "--selection-size", "32")


def copy_plan(plan: Path, tmp_path: Path, **changes) -> Path:
    d = json.loads(plan.read_text())
    d.update(changes)
    p = tmp_path / "changed.json"
    p.write_text(json.dumps(d))
    return p


def refused(capsys, argv: list[str]) -> str:
    return one_error(capsys, main(argv))


def small_folder(tmp_path):

    root = tmp_path / "imgs"
    return root if root.exists() else image_folder(root, per_class=4)
