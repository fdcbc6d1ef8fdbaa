"""The synthetic sets: deterministic, cached, and what each promises to hold."""
import json
import os

import numpy as np
import pytest
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


@pytest.mark.slow  # makes the textured set four times: 12-14 s on 2 shared cores
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


@pytest.mark.slow  # 12 textured images, decoded and measured: ~12 s on 2 shared cores
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


def _grow(m, px=1):
    for _ in range(px):
        m = m | np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1)
    return m


def test_clutter_set_deterministic_cached_and_split(tmp_path, capsys):
    p1 = synthetic.make_clutter(tmp_path / "c1", n_train=6, n_val=3, seed=2)
    assert capsys.readouterr().err.startswith(f"making the clutter set in {tmp_path / 'c1'}")
    p2 = synthetic.make_clutter(tmp_path / "c2", n_train=6, n_val=3, seed=2)
    for split, n in (("train", 6), ("val", 3)):
        assert open(p1[f"{split}_json"], "rb").read() == open(p2[f"{split}_json"], "rb").read()
        d1, d2 = p1[f"{split}_images"], p2[f"{split}_images"]
        names = sorted(os.listdir(d1))
        assert len(names) == n and all(open(os.path.join(d1, f), "rb").read() ==
                                       open(os.path.join(d2, f), "rb").read() for f in names)
    train, val = (json.load(open(p1[k])) for k in ("train_json", "val_json"))
    assert train["annotations"][0]["segmentation"] != val["annotations"][0]["segmentation"]  # two draws
    capsys.readouterr()
    assert synthetic.make_clutter(tmp_path / "c1", n_train=6, n_val=3, seed=2) == p1
    assert capsys.readouterr().err == ""  # cached: silent
    other = json.load(open(synthetic.make_clutter(tmp_path / "c3", n_train=6, n_val=3, seed=3)["train_json"]))
    assert other["annotations"] != train["annotations"]


def test_clutter_objects_touch_overlap_and_reach_the_edge(tmp_path):
    """Boxes hold parts of their neighbours (objects touch or overlap), shapes are non-convex, sizes
    run from small to large, and some objects are cut by the image's edge."""
    p = synthetic.make_clutter(tmp_path / "c", n_train=24, n_val=0, seed=0)
    coco = json.load(open(p["train_json"]))
    assert {c["name"] for c in coco["categories"]} >= {"C", "ell", "ring", "star"}
    masks = _annotations_are_tight(coco)
    by_image = {}
    for a, m in zip(coco["annotations"], masks):
        by_image.setdefault(a["image_id"], []).append(m)
    touching = boxes_shared = 0
    for ms in by_image.values():
        for i, a in enumerate(ms):
            touching += any((_grow(a) & b).any() for j, b in enumerate(ms) if j != i)
            ys, xs = np.nonzero(a)
            box = np.zeros_like(a)
            box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            boxes_shared += any((box & b).any() for j, b in enumerate(ms) if j != i)
    n = len(masks)
    assert n >= 100 and touching >= 0.5 * n and boxes_shared >= 0.5 * n  # the demo: about half touch
    areas = np.array([m.sum() for m in masks])
    assert (areas < 32 ** 2).mean() > 0.3 and (areas >= 32 ** 2).any()
    fill = np.array([m.sum() / np.ptp(np.nonzero(m)[0] + 1) / np.ptp(np.nonzero(m)[1] + 1) for m in masks])
    assert np.mean(fill < 0.5) > 0.2  # C, L, rings, stars
    edge = sum(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks)
    assert edge >= 0.3 * n  # the demo: a quarter


def test_clutter_distractors_share_the_objects_colours_outside_the_masks(tmp_path):
    """Unlabelled shapes in an object's colour lie outside every mask: pixels near an object's
    mean colour, far from all masks, are common."""
    p = synthetic.make_clutter(tmp_path / "c", n_train=8, n_val=0, seed=1)
    coco = json.load(open(p["train_json"]))
    masks = _annotations_are_tight(coco)
    found = 0
    for im in coco["images"]:
        pixels = np.asarray(data.load_rgb(os.path.join(p["train_images"], im["file_name"])), dtype=np.float64)
        ms = [m for a, m in zip(coco["annotations"], masks) if a["image_id"] == im["id"]]
        outside = ~_grow(np.any(ms, 0), 3)
        for m in ms:
            if m.sum() >= 100:
                near = np.linalg.norm(pixels - pixels[m].mean(0), axis=2) < 25
                found += (near & outside).sum() >= 0.2 * m.sum()
    assert found >= 5


def test_glow_set_is_deterministic_and_glows(tmp_path):
    """The same seed gives the same set; objects are bright on a dark background and fade out across
    their outline (no colour edge marks it: the rim is dimmer than the inside, and a halo of light lies
    outside it), and some touch a neighbour."""
    p = synthetic.make_glow(tmp_path / "g1", n_train=6, n_val=1, seed=4)
    again = synthetic.make_glow(tmp_path / "g2", n_train=6, n_val=1, seed=4)
    assert open(p["train_json"], "rb").read() == open(again["train_json"], "rb").read()
    coco = json.load(open(p["train_json"]))
    masks = _annotations_are_tight(coco)
    assert len(masks) >= 30
    soft = touching = 0
    for im in coco["images"]:
        grey = np.asarray(data.load_rgb(os.path.join(p["train_images"], im["file_name"])), float).max(2)
        ms = [m for a, m in zip(coco["annotations"], masks) if a["image_id"] == im["id"]]
        anything = np.any(ms, 0)
        background = np.median(grey[~_grow(anything, 6)])
        for i, m in enumerate(ms):
            touching += any((_grow(m) & b).any() for j, b in enumerate(ms) if j != i)
            inner = m & ~_grow(~m, 2)
            rim, halo = m & _grow(~m), _grow(m, 2) & ~anything
            if inner.sum() >= 20:
                assert grey[inner].mean() > background + 20  # bright on dark
                soft += grey[rim].mean() < grey[inner].mean() - 5 and grey[halo].mean() > background + 5
    assert soft >= 10 and touching >= 5
