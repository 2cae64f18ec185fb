"""Folders of plain images (no class folders) are unlabelled data: search, verify and compare report agreement
and KL to the dense model and no top-1; labels that cannot be the model's classes are dropped with one note."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import image_folder
from PIL import Image

from rr_alloc.cli import main

RUN = ("--model", "cifar_resnet20", "--dataset", "imagefolder", "--calib-size", "16", "--selection-size", "8")


def _plain_folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"photo{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plain")
    return _plain_folder(root / "pool", 40), _plain_folder(root / "fidelity", 12, seed=1)


def _data(train: Path, test: Path) -> tuple[str, ...]:
    return (*RUN, "--train-data", str(train), "--test-data", str(test))


def test_search_verify_and_compare_on_unlabelled_folders_report_agreement_and_kl(plain, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.5", "--repair", "bn", *_data(*plain), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unlabelled" in text and "top1 %" not in text and "agreement %" in text
    v = json.loads(out.read_text())["verify"]
    assert v["top1"] is None and v["dense_top1"] is None and 0 <= v["agreement"] <= 1 and v["kl"] >= 0
    assert v["reference"]["top1"] is None
    assert main(["verify", "--plan", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top1 %" not in text and f"{v['kl']:.4f}" in text  # the replay gives the same figure
    runs = tmp_path / "compare"
    argv = ["compare", "--budgets", "0.5", "--allocators", "global", "uniform", "--repair", "bn", *_data(*plain)]
    assert main([*argv, "--out-dir", str(runs)]) == 0
    rows = list(csv.DictReader((runs / "compare.csv").open()))
    assert len(rows) == 2 and all(r["top1"] == "" and float(r["agreement"]) > 0 for r in rows)


def test_labels_that_cannot_be_the_models_classes_are_dropped_with_one_note(plain, tmp_path, capsys):
    train = image_folder(tmp_path / "train", per_class=16, classes=2)  # 2 classes, a 10-output model
    test = image_folder(tmp_path / "test", per_class=4, classes=2, seed=1)
    out = tmp_path / "plan.json"
    argv = ["search", "--budget", "0.5", "--repair", "bn", *_data(train, test), "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("note: the data's 2 classes cannot be the model's 10 outputs") == 1
    assert json.loads(out.read_text())["verify"]["top1"] is None


def test_the_top1_objective_needs_labels(plain, tmp_path, capsys):
    argv = ["search", "--budget", "0.5", "--allocator", "optuna", "--objective", "top1", "--n-trials", "2"]
    storage = f"sqlite:///{(tmp_path / 'o.db').resolve()}"
    assert main([*argv, *_data(*plain), "--no-verify", "--storage", storage, "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --objective top1 needs labelled") and "\n" not in err


@pytest.mark.parametrize("layout", ["empty", "one image", "mixed"])
def test_a_folder_that_is_empty_holds_one_image_or_mixes_layouts_is_one_line(plain, tmp_path, capsys, layout):
    bad = tmp_path / "bad"
    if layout == "empty":
        bad.mkdir()
    elif layout == "one image":
        _plain_folder(bad, 1)
    else:
        image_folder(bad, per_class=2, classes=2)
        _plain_folder(bad, 3)
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.5", "--repair", "bn", *_data(bad, plain[1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--train-data" in err
    assert {"empty": "class", "one image": "one image", "mixed": "mixes class folders"}[layout] in err
    assert not out.exists()
