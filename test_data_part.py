"""Tests of data.py (to be merged into test_mal.py)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import data


def _write_coco(path, images, annotations):
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=[{"id": 1, "name": "x"}]), f)
    return str(path)


def _ann(i, image_id, bbox, iscrowd=0):
    return dict(id=i, image_id=image_id, category_id=1, bbox=bbox, area=1.0, iscrowd=iscrowd)


def _rect_image(path, size=(200, 150), rect=(50, 40, 120, 90), bg=(30, 60, 200), fg=(230, 200, 20)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = bg
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = fg
    Image.fromarray(a).save(path)  # PNG: exact colours
    return a


def _check_mask_matches_colour(crop, mask, fg, bg):
    """Pixels clearly of fg colour must be in the mask, clearly bg outside; disagreements only in
    the 1-px band around the mask border."""
    c = crop.permute(1, 2, 0).float()
    d_fg = (c - torch.tensor(fg, dtype=torch.float)).norm(dim=-1)
    d_bg = (c - torch.tensor(bg, dtype=torch.float)).norm(dim=-1)
    is_fg = d_fg < d_bg
    m = mask > 0.5
    assert m.any() and is_fg.any()
    wrong = is_fg != m
    mf = m.float()[None, None]
    dil = torch.nn.functional.max_pool2d(mf, 3, 1, 1)[0, 0] > 0
    ero = -torch.nn.functional.max_pool2d(-mf, 3, 1, 1)[0, 0] > 0
    band = dil & ~ero
    assert not (wrong & ~band).any(), int((wrong & ~band).sum())


def test_normalize_uint8_and_float():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    y = data.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y, data.normalize(x.float()))
    ref = (x.float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(y, ref, atol=1e-5)


def test_load_rgb_all_modes(tmp_path):
    g = np.tile(np.linspace(0, 1, 64), (16, 1))
    cases = {
        "L.png": Image.fromarray((g * 255).astype(np.uint8), "L"),
        "RGBA.png": Image.new("RGBA", (64, 16), (10, 20, 30, 0)),
        "LA.png": Image.new("LA", (64, 16), (100, 50)),
        "P.png": Image.new("RGB", (64, 16), (5, 200, 9)).convert("P", palette=Image.ADAPTIVE),
        "1.png": Image.fromarray(g > 0.5).convert("1"),
        "CMYK.jpg": Image.new("CMYK", (64, 16), (0, 255, 255, 0)),
        "I16.png": Image.fromarray((g * 65535).astype(np.uint16)),
        "I.tif": Image.fromarray((g * 65535).astype(np.int32), "I"),
        "F.tif": Image.fromarray(g.astype(np.float32), "F"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = data.load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (64, 16), name
        if name[:2] in ("I1", "I.", "F."):  # high bit depth: scaled to the full 0..255, not clipped
            a = np.asarray(out)[..., 0].astype(int)
            assert a.min() <= 2 and a.max() >= 250 and 100 < a[0, 32] < 160, (name, a.min(), a.max())
    assert np.asarray(data.load_rgb(tmp_path / "P.png"))[0, 0].tolist() == [5, 200, 9]


def test_load_rgb_errors_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    for name in ("missing.jpg", "trunc.jpg", "garbage.jpg"):
        with pytest.raises(data.ImageError) as e:
            data.load_rgb(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name) + ": ") and "\n" not in msg


def test_roi_crop_mapping_identity_and_tiny_box():
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    crop, mask, used = data.roi_crop(img, (8, 4, 24, 20), (0, 0, 48, 32), 16)
    assert used == (0.0, 0.0, 48.0, 32.0) and crop.dtype == torch.uint8 and crop.shape == (3, 16, 16)
    # pixel centres x = (u+0.5)*3 -> inside [8, 24] for u = 3..7; y = (v+0.5)*2 in [4, 20] for v = 2..9
    assert mask.nonzero()[:, 1].unique().tolist() == [3, 4, 5, 6, 7]
    assert mask.nonzero()[:, 0].unique().tolist() == list(range(2, 10))
    _, m, _ = data.roi_crop(img, (10.2, 10.2, 10.3, 10.25), (0, 0, 48, 32), 8)  # thinner than a pixel
    assert m.sum() == 1
    _, _, used = data.roi_crop(img, (40, 20, 46, 30), (30, 10, 60, 40), 8)  # clamped, not padded
    assert used == (30.0, 10.0, 48.0, 32.0)


def test_roi_crop_exact_at_scale_one():
    a = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop, _, _ = data.roi_crop(Image.fromarray(a), (5, 5, 10, 10), (7, 3, 27, 23), 20)
    assert torch.equal(crop, torch.from_numpy(a[3:23, 7:27]).permute(2, 0, 1))


@pytest.fixture
def rect_set(tmp_path):
    fg, bg = (230, 200, 20), (30, 60, 200)
    _rect_image(tmp_path / "a.png", rect=(50, 40, 120, 90), fg=fg, bg=bg)
    _rect_image(tmp_path / "b.png", rect=(0, 100, 30, 150), fg=fg, bg=bg)  # touches the border
    js = _write_coco(tmp_path / "a.json",
                     [dict(id=1, file_name="a.png", width=200, height=150),
                      dict(id=2, file_name="b.png", width=200, height=150)],
                     [_ann(1, 1, [50, 40, 70, 50]), _ann(2, 2, [0, 100, 30, 50])])
    return js, str(tmp_path), fg, bg


def test_box_mask_lines_up_with_crop_eval_and_train(rect_set):
    js, root, fg, bg = rect_set
    ev = data.BoxDataset(js, root, size=64, train=False)
    for i in range(2):
        s = ev[i]
        assert s["valid"] and not s["flipped"] and torch.equal(s["image"], s["teacher_image"])
        _check_mask_matches_colour(s["teacher_image"], s["box_mask"], fg, bg)
    tr = data.BoxDataset(js, root, size=64, train=True, seed=3)
    flips = set()
    for epoch in range(6):
        tr.set_epoch(epoch)
        for i in range(2):
            s = tr[i]
            flips.add(s["flipped"])
            _check_mask_matches_colour(s["teacher_image"], s["box_mask"], fg, bg)
            x0, y0, x1, y1 = s["crop_box"].tolist()
            assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 150
    assert flips == {True, False}


def test_teacher_image_never_jittered(rect_set):
    js, root, _, _ = rect_set
    tr = data.BoxDataset(js, root, size=48, train=True, seed=0)
    img = data.load_rgb(os.path.join(root, "a.png"))
    differs = 0
    for epoch in range(10):
        tr.set_epoch(epoch)
        s = tr[0]
        ref, mask, _ = data.roi_crop(img, (50, 40, 120, 90), s["crop_box"].tolist(), 48)
        if s["flipped"]:
            ref, mask = ref.flip(-1), mask.flip(-1)
        assert torch.equal(s["teacher_image"], ref) and torch.equal(s["box_mask"], mask)
        differs += not torch.equal(s["image"], s["teacher_image"])
    assert differs >= 3


def test_dataset_skips_and_counts(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.jpg")
    anns = [_ann(1, 1, [10, 10, 50, 50]), _ann(2, 1, [10, 10, 50, 50], iscrowd=1),
            _ann(3, 1, [0, 0, 10, 10]), _ann(4, 1, [10, 10, 0, 5]), _ann(5, 1, [10, 10, 5, -1]),
            _ann(6, 1, [float("nan"), 1, 5, 5]), _ann(7, 1, [150, 10, 10, 10]), _ann(8, 99, [1, 1, 50, 50]),
            _ann(9, 1, [90, 70, 40, 40])]  # partly outside: kept
    js = _write_coco(tmp_path / "a.json", [dict(id=1, file_name="a.jpg", width=100, height=80)], anns)
    ds = data.BoxDataset(js, tmp_path, size=32, min_area=200)
    assert ds.ann_ids.tolist() == [1, 9]
    assert ds.skipped == dict(missing_image_entry=1, iscrowd=1, degenerate=3, outside_image=1, small_area=1)
    assert "skipped 7" in ds.describe()
    assert data.BoxDataset(js, tmp_path, min_area=0).skipped["small_area"] == 0


def test_missing_and_corrupt_images_are_invalid_not_raised(tmp_path):
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(500))
    Image.new("RGB", (50, 48)).save(tmp_path / "wrongsize.jpg")
    names = ["ok.jpg", "missing.jpg", "trunc.jpg", "garbage.jpg", "wrongsize.jpg"]
    images = [dict(id=k + 1, file_name=n, width=64, height=48) for k, n in enumerate(names)]
    anns = [_ann(10 * (k + 1) + j, k + 1, [5, 5, 20, 20]) for k in range(5) for j in range(2)]
    ds = data.BoxDataset(_write_coco(tmp_path / "a.json", images, anns), tmp_path, size=16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))] + [ds[2]]
    assert len(w) == 4 and all(any(n in str(x.message) for x in w) for n in names[1:])
    assert [s["valid"] for s in samples[:10]] == [True, True] + [False] * 8
    assert all(s["image"].shape == (3, 16, 16) and s["box_mask"].shape == (16, 16) for s in samples)
    assert ds.n_invalid == 9 and len(ds.bad_images) == 4
    batch = data.collate_boxes(samples[:4])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["n_invalid"] == 2
    assert batch["ann_id"].tolist() == [10, 11]
    empty = data.collate_boxes(samples[2:4])
    assert empty["image"].shape == (0, 3, 16, 16) and empty["n_invalid"] == 2


def test_training_samples_independent_of_workers(tmp_path):
    out = data.make_demo(tmp_path / "demo", n_train=4, n_val=0)
    ds = data.BoxDataset(out["train_json"], out["train_images"], size=32, train=True, seed=5)
    ds.set_epoch(2)
    sampler = data.ImageGroupedSampler(ds)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    rows = ds.img_rows[order]
    assert (np.diff(rows) != 0).sum() == len(np.unique(rows)) - 1  # boxes of an image consecutive

    def run(workers):
        dl = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler, num_workers=workers,
                                         collate_fn=data.collate_boxes)
        return [b for b in dl]

    a, b = run(0), run(2)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("image", "teacher_image", "box_mask", "crop_box", "ann_id", "flipped"):
            assert torch.equal(x[k], y[k]), k
    ds.set_epoch(3)
    assert not torch.equal(run(0)[0]["crop_box"], a[0]["crop_box"])


def test_demo_deterministic_cached_and_content(tmp_path):
    from pycocotools import mask as mask_utils

    p1 = data.make_demo(tmp_path / "d1", n_train=14, n_val=2, seed=1)
    p2 = data.make_demo(tmp_path / "d2", n_train=14, n_val=2, seed=1)
    for key in ("train_json", "val_json"):
        assert open(p1[key], "rb").read() == open(p2[key], "rb").read()
    for name in ("000000.jpg", "000007.jpg", "000013.jpg"):
        assert open(os.path.join(p1["train_images"], name), "rb").read() == \
            open(os.path.join(p2["train_images"], name), "rb").read()
    mtime = os.path.getmtime(p1["train_json"])
    assert data.make_demo(tmp_path / "d1", n_train=14, n_val=2, seed=1) == p1  # cached
    assert os.path.getmtime(p1["train_json"]) == mtime

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
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
    assert np.mean(np.array(fill) < 0.5) > 0.2  # many clearly non-convex / holed shapes
    img = data.load_rgb(os.path.join(p1["train_images"], "000000.jpg"))
    assert img.size == (256, 192)


def test_image_boxes_reports_errors_and_bad_boxes(tmp_path):
    Image.new("RGB", (100, 80), (200, 10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    images = [dict(id=1, file_name="a.jpg", width=100, height=80),
              dict(id=2, file_name="missing.jpg", width=100, height=80),
              dict(id=3, file_name="bad.jpg", width=100, height=80),
              dict(id=4, file_name="a.jpg", width=90, height=80)]
    boxes = {1: [(1, [10, 10, 30, 20]), (2, [10, 10, 0, 20]), (3, [float("inf"), 1, 2, 2]), (4, [200, 5, 5, 5]),
                 (5, [90, 70, 50, 50])],
             2: [(6, [1, 1, 5, 5])], 3: [(7, [1, 1, 5, 5])], 4: [(8, [1, 1, 5, 5])]}
    ds = data.ImageBoxes(images, boxes, tmp_path, size=24)
    it = ds[0]
    assert it["error"] is None and it["ann_ids"].tolist() == [1, 5] and (it["width"], it["height"]) == (100, 80)
    assert it["crops"].shape == (2, 3, 24, 24) and it["crops"].dtype == torch.uint8
    assert it["box_masks"].shape == (2, 24, 24) and it["crop_boxes"].dtype == torch.float64
    assert [a for a, _ in it["bad"]] == [2, 3, 4] and all(isinstance(r, str) and r for _, r in it["bad"])
    for k, what in ((1, "missing.jpg"), (2, "bad.jpg"), (3, "decoded size")):
        it = ds[k]
        assert what in it["error"] and it["crops"].shape == (0, 3, 24, 24)
        assert it["bad"] == [(6 + k - 1, it["error"])]
    batch = data.collate_images([ds[0], ds[1], ds[0]])
    assert batch["crops"].shape == (4, 3, 24, 24) and batch["image_index"].tolist() == [0, 0, 2, 2]
    assert [m["n"] for m in batch["images"]] == [2, 0, 2] and batch["images"][1]["error"]


def test_blur_on_source_region_matches_blur_at_output():
    rng = np.random.default_rng(2)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC))
    img = Image.fromarray(a)
    crop = (20.5, 10.0, 84.0, 74.0)  # 63.5 x 64 source pixels -> 128: upscaled, blurred on the source
    fast = np.asarray(data._blurred_crop(img, crop, 128, 1.5)).astype(float)
    ref = np.asarray(data._crop_pil(img, crop, 128).filter(ImageFilter.GaussianBlur(1.5))).astype(float)
    assert np.abs(fast - ref)[8:-8, 8:-8].mean() < 2.0
