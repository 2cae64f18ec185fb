"""Image folders: labels follow class names, every PIL mode decodes by its meaning, sizes and file kinds
are checked as images are decoded, and files left out are named."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import bad_search, image_folder
from PIL import Image

from rr_alloc.cli import main
from rr_alloc.data.images import decode
from rr_alloc.data.splits import DataSpec, load_splits
from rr_alloc.data.transforms import TransformSpec
from rr_alloc.errors import UserError

TF = TransformSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _spec(train: Path, test: Path, **kw) -> DataSpec:
    base = {"calib_size": 4, "selection_size": 2, "transform": TF}
    return DataSpec(kind="imagefolder", train=str(train), test=str(test), **{**base, **kw})


def test_a_test_folder_missing_a_class_keeps_the_training_labels(tmp_path):
    train = image_folder(tmp_path / "train", per_class=4, classes=3)
    test = image_folder(tmp_path / "test", per_class=3, classes=3, seed=1)
    for f in (test / "class0").iterdir():  # the first class: every later label would shift by one
        f.unlink()
    (test / "class0").rmdir()
    splits = load_splits(_spec(train, test))
    assert sorted(set(splits.test.y.tolist())) == [1, 2]  # class1 -> 1, class2 -> 2, as in training
    assert splits.test.y.tolist() == [1, 1, 1, 2, 2, 2]


def test_a_test_class_unknown_to_training_is_refused(tmp_path):
    train = image_folder(tmp_path / "train", per_class=4, classes=2)
    test = image_folder(tmp_path / "test", per_class=2, classes=2, seed=1)
    (test / "class1").rename(test / "zebra")
    with pytest.raises(UserError, match="zebra"):
        load_splits(_spec(train, test))


def test_16_bit_greyscale_decodes_to_its_grey_level_not_white(tmp_path):
    grey = np.full((8, 8), 32768, np.uint16)  # half of full scale
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    px = np.asarray(decode(str(path)))
    assert px.shape == (8, 8, 3) and np.all(px == 128)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_image_with_pixels_that_are_not_finite_is_refused(tmp_path, bad):
    path = tmp_path / "float.tif"
    px = np.full((8, 8), 0.5, np.float32)
    px[3, 4] = bad
    Image.fromarray(px).save(path)
    with pytest.raises(UserError, match="not finite"):
        decode(str(path))


def test_a_broken_link_named_like_an_image_is_named_as_one(tmp_path):
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="broken link"):
        decode(str(link))


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        decode(str(fifo))


def test_an_image_of_another_size_is_named(tmp_path):
    data = image_folder(tmp_path / "data", per_class=4)
    odd = data / "class0" / "odd.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd)
    with pytest.raises(UserError, match="odd.png decodes to \\(3, 40, 40\\)"):
        load_splits(_spec(data, data, calib_size=7, selection_size=2))


def test_gifs_are_read_and_other_files_are_named(tmp_path, capsys):
    data = image_folder(tmp_path / "data", per_class=3)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "class0" / "anim.gif")
    (data / "class1" / "README.txt").write_text("not an image")
    splits = load_splits(_spec(data, data, calib_size=5, selection_size=2))
    assert splits.calib.n + splits.selection.n == 7  # 3 + 3 + the GIF
    out = capsys.readouterr().out
    assert "left out 1 files that are not images (1 .txt)" in out


def test_a_transform_that_does_not_fit_the_channels_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    data = image_folder(tmp_path / "data", per_class=4)
    cfg.write_text("transform: {mean: [0.5, 0.5], std: [0.2, 0.2]}\n")
    err = bad_search(
        tmp_path,
        capsys,
        *("--budget", "0.9", "--config", str(cfg), "--model", "cifar_resnet20", "--dataset", "imagefolder"),
        *("--train-data", str(data), "--test-data", str(data), "--calib-size", "4", "--selection-size", "2"),
    )
    assert "transform mean (2 values)" in err


def test_grayscale_images_for_an_rgb_model_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    data = image_folder(tmp_path / "data", per_class=4)
    cfg.write_text("transform: {mean: [0.5], std: [0.2], grayscale: true}\n")
    code = main(
        [
            "search",
            *("--budget", "0.9", "--config", str(cfg), "--model", "cifar_resnet20", "--dataset", "imagefolder"),
            *("--train-data", str(data), "--test-data", str(data), "--calib-size", "4", "--selection-size", "2"),
            *("--out", str(tmp_path / "out" / "plan.json")),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "cannot run on" in err


@pytest.mark.parametrize("link", ["c", "b/x"])
def test_a_folder_link_that_loops_back_is_refused_at_once(tmp_path, link):
    from rr_alloc.data.images import check_no_link_loop

    data = image_folder(tmp_path / "data", per_class=4)
    (data / "b").mkdir()
    target = data if link == "c" else data / "b"
    (data / link).symlink_to(target, target_is_directory=True)

    with pytest.raises(UserError, match="links back into"):
        check_no_link_loop(data, "--train-data")


@pytest.mark.parametrize(("second", "says"), [("loop outside", "links back into"), ("two links", "a second time")])
def test_a_folder_reached_twice_through_links_is_refused(tmp_path, second, says):
    from rr_alloc.data.images import check_no_link_loop

    data = image_folder(tmp_path / "data", per_class=4)
    outside = image_folder(tmp_path / "outside", per_class=2)
    (data / "c").symlink_to(outside, target_is_directory=True)
    if second == "loop outside":  # a loop that never passes through the data folder
        (outside / "self").symlink_to(outside, target_is_directory=True)
    else:
        (data / "d").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UserError, match=says):
        check_no_link_loop(data, "--train-data")


def test_a_class_folder_linked_once_from_outside_is_read(tmp_path):
    """A class folder that is a link to a folder elsewhere (a common layout) is neither a loop nor a repeat."""
    from rr_alloc.data.images import check_no_link_loop

    data = image_folder(tmp_path / "data", per_class=4)
    elsewhere = image_folder(tmp_path / "elsewhere", per_class=2)
    (data / "class2").symlink_to(elsewhere / "class0", target_is_directory=True)

    check_no_link_loop(data, "--train-data")
