"""The synthetic sets: deterministic, cached, and what each promises to hold."""
import json
import os

import numpy as np
from pycocotools import mask as mask_utils

import data
import quality
import synthetic


def _annotations_are_tight(coco):
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    masks = []
    for a in coco["annotations"]:
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        ys, xs = np.nonzero(m)
        assert m.shape == sizes[a["image_id"]] and a["iscrowd"] == 0 and a["area"] == m.sum()
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        masks.append(m)
    return masks


def test_textured_set_deterministic_cached_and_content(tmp_path, capsys):
    p1 = synthetic.make_textured(tmp_path / "t1", n_train=16, n_val=2, seed=3)
    assert capsys.readouterr().err.startswith(f"making the textured set in {tmp_path / 't1'}")
    p2 = synthetic.make_textured(tmp_path / "t2", n_train=16, n_val=2, seed=3)
    for key in ("train_json", "val_json"):
        assert open(p1[key], "rb").read() == open(p2[key], "rb").read()
    names = sorted(os.listdir(p1["train_images"]))
    assert len(names) == 16 and all(open(os.path.join(p1["train_images"], n), "rb").read() ==
                                    open(os.path.join(p2["train_images"], n), "rb").read() for n in names)
    capsys.readouterr()
    assert synthetic.make_textured(tmp_path / "t1", n_train=16, n_val=2, seed=3) == p1
    assert capsys.readouterr().err == ""  # cached: silent
    assert (synthetic.make_textured(tmp_path / "t3", n_train=16, n_val=2, seed=4)["train_json"]
            != p1["train_json"])

    coco = json.load(open(p1["train_json"]))
    assert {c["name"] for c in coco["categories"]} >= {"holed", "thin ring", "branch", "worm", "dumbbell"}
    masks = _annotations_are_tight(coco)
    holed = sum(quality.fill_holes(m).sum() > m.sum() for m in masks)
    assert holed >= 3  # objects with holes (rings, holed blobs)
    areas = np.array([m.sum() for m in masks])
    assert (areas < 32 ** 2).any() and (areas >= 32 ** 2).any()
    pixels = [np.asarray(data.load_rgb(os.path.join(p1["train_images"], n)), dtype=np.int16) for n in names]
    grey = [np.abs(p - p.mean(2, keepdims=True)).max() <= 3 for p in pixels]  # JPEG keeps grey images grey
    assert 2 <= sum(grey) <= 14


def test_textured_objects_are_low_contrast_and_soft_edged(tmp_path):
    """The objects differ from what lies around them by less than the demo's (> 110 in RGB), and
    their edges are blurred: pixels just outside a mask are pulled towards the object's colour."""
    p = synthetic.make_textured(tmp_path / "t", n_train=12, n_val=0, seed=5)
    coco = json.load(open(p["train_json"]))
    contrast, pulled = [], []
    for a in coco["annotations"]:
        im = np.asarray(data.load_rgb(os.path.join(p["train_images"], f"{a['image_id'] - 1:06d}.jpg")),
                        dtype=np.float64)
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        ring = quality.fill_holes(m)  # the object and its holes; around it, 1 and 4 px away
        near = ring.copy()
        for _ in range(1):
            near = (near | np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1)
                    | np.roll(near, -1, 1))
        far = near.copy()
        for _ in range(3):
            far = far | np.roll(far, 1, 0) | np.roll(far, -1, 0) | np.roll(far, 1, 1) | np.roll(far, -1, 1)
        near_px, far_px = near & ~ring, far & ~near
        if m.sum() < 200 or not near_px.any() or not far_px.any():
            continue
        obj, n1, n4 = im[m].mean(0), im[near_px].mean(0), im[far_px].mean(0)
        d = obj - n4
        contrast.append(np.linalg.norm(d))
        pulled.append((n1 - n4) @ d / max(d @ d, 1e-9))  # how far 1 px outside is towards the object
    assert len(contrast) >= 10 and np.median(contrast) < 110
    assert np.median(pulled) > 0.15


def test_demo_deterministic_cached_and_content(tmp_path, capsys):
    from pycocotools import mask as mask_utils

    p1 = synthetic.make_demo(tmp_path / "d1", n_train=14, n_val=2, seed=1)
    made = capsys.readouterr().err.splitlines()  # a line when it starts and one when done, with the time
    assert len(made) == 2 and made[0].startswith(f"making the demo set in {tmp_path / 'd1'}")
    assert made[1].startswith(f"made the demo set in {tmp_path / 'd1'} (") and made[1].endswith(" s)")
    p2 = synthetic.make_demo(tmp_path / "d2", n_train=14, n_val=2, seed=1)
    for key in ("train_json", "val_json"):
        assert open(p1[key], "rb").read() == open(p2[key], "rb").read()
    for name in ("000000.jpg", "000007.jpg", "000013.jpg"):
        assert open(os.path.join(p1["train_images"], name), "rb").read() == \
            open(os.path.join(p2["train_images"], name), "rb").read()
    mtime = os.path.getmtime(p1["train_json"])
    capsys.readouterr()
    assert synthetic.make_demo(tmp_path / "d1", n_train=14, n_val=2, seed=1) == p1  # cached: silent
    assert os.path.getmtime(p1["train_json"]) == mtime and capsys.readouterr().err == ""

    coco = json.load(open(p1["train_json"]))
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    counts = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=15)[1:]
    assert counts.min() >= 1 and counts.max() <= 7
    areas, fill = [], []
    for a in coco["annotations"]:
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == sizes[a["image_id"]] and a["iscrowd"] == 0
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum()
        areas.append(a["area"])
        fill.append(a["area"] / (w * h))
    areas = np.array(areas)
    assert ((areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any()
            and (areas >= 96 ** 2).any())
    assert np.mean(np.array(fill) < 0.5) > 0.2  # many clearly non-convex / holed shapes
    img = data.load_rgb(os.path.join(p1["train_images"], "000000.jpg"))
    assert img.size == (256, 192)
