"""data.py: image decoding, RoI crops, augmentations and the datasets."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils

import data
import synthetic
from conftest import ann, write_coco


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
    ref = ((x.float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1))
           / torch.tensor(data.IMAGENET_STD).view(3, 1, 1))
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
    (tmp_path / "notes.bmp").write_bytes(b"BM" + b"x" * 100)  # a header Pillow knows, then nothing it
                                                              # can read
    for name, says in (("missing.jpg", "file not found"), ("trunc.jpg", "not a readable image (OSError: "),
                       ("garbage.jpg", "not a readable image"),
                       # Pillow's words kept
                       ("notes.bmp", "not a readable image (OSError: Truncated File Read)")):
        with pytest.raises(data.ImageError) as e:
            data.load_rgb(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name) + ": " + says) and "\n" not in msg, msg


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
    # padded, not clamped: 3.2 and 2.1 crop pixels leave the image -> 3 and 2 whole pad pixels,
    # the far edges moved so that the image's edges fall on pixel boundaries
    _, _, used = data.roi_crop(img, (40, 20, 46, 30), (30, 10, 60, 40), 8)
    assert used[:2] == (30.0, 10.0) and used[2:] == pytest.approx((48 + 3 * 18 / 5, 32 + 2 * 22 / 6))


def test_roi_crop_exact_at_scale_one():
    a = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop, _, _ = data.roi_crop(Image.fromarray(a), (5, 5, 10, 10), (7, 3, 27, 23), 20)
    assert torch.equal(crop, torch.from_numpy(a[3:23, 7:27]).permute(2, 0, 1))


def test_roi_crop_pads_outside_the_image():
    """At scale one the crop is the image's pixels where the expanded box is inside the image and the
    pad colour (0 after normalize) elsewhere; the box mask stays on the image's pixels."""
    a = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop, mask, used = data.roi_crop(Image.fromarray(a), (0, 0, 5, 5), (-4, -3, 16, 17), 20)
    assert used == (-4.0, -3.0, 16.0, 17.0)
    want = torch.tensor(data.PAD_RGB, dtype=torch.uint8).view(3, 1, 1).repeat(1, 20, 20)
    want[:, 3:, 4:] = torch.from_numpy(a[:17, :16]).permute(2, 0, 1)
    assert torch.equal(crop, want)
    assert data.normalize(crop)[:, 0, 0].abs().max() < 0.01
    assert mask.nonzero().min(0).values.tolist() == [3, 4] and mask.nonzero().max(0).values.tolist() == [7, 8]


@pytest.fixture
def rect_set(tmp_path):
    fg, bg = (230, 200, 20), (30, 60, 200)
    _rect_image(tmp_path / "a.png", rect=(50, 40, 120, 90), fg=fg, bg=bg)
    _rect_image(tmp_path / "b.png", rect=(0, 100, 30, 150), fg=fg, bg=bg)  # touches the border
    js = write_coco(tmp_path / "a.json",
                     [dict(id=1, file_name="a.png", width=200, height=150),
                      dict(id=2, file_name="b.png", width=200, height=150)],
                     [ann(1, 1, [50, 40, 70, 50]), ann(2, 2, [0, 100, 30, 50])])
    return js, str(tmp_path), fg, bg


def test_box_mask_lines_up_with_crop_eval_and_train(rect_set):
    js, root, fg, bg = rect_set
    ev = data.BoxDataset(js, root, size=64, train=False)
    for i in range(2):
        s = ev[i]
        assert s["valid"] and not s["flipped"] and torch.equal(s["image"], s["teacher_image"])
        _check_mask_matches_colour(s["teacher_image"], s["box_mask"], fg, bg)
    tr = data.BoxDataset(js, root, size=64, train=True, seed=3)
    flips, padded = set(), set()
    for epoch in range(6):
        tr.set_epoch(epoch)
        for i in range(2):
            s = tr[i]
            flips.add(s["flipped"])
            _check_mask_matches_colour(s["teacher_image"], s["box_mask"], fg, bg)  # the pad is nearer bg
            x0, y0, x1, y1 = s["crop_box"].tolist()
            box = ((50, 40, 120, 90), (0, 100, 30, 150))[i]
            assert x0 <= box[0] < box[2] <= x1 and y0 <= box[1] < box[3] <= y1
            padded.add((i, x0 < 0 or y0 < 0 or x1 > 200 or y1 > 150))
    assert flips == {True, False} and padded == {(0, False), (1, True)}  # b.png's box touches the edge


def test_gt_mask_crops_follow_the_image_crops(tmp_path):
    """gt_masks=True: the GT mask goes through the same expansion, crop, resize and flip as the image,
    so a white-on-black image's crop is its mask's crop."""
    m = np.zeros((60, 80), np.uint8)
    m[10:45, 20:70] = 1
    m[20:35, 35:55] = 0  # a hole
    Image.fromarray(m * 255).convert("RGB").save(tmp_path / "a.png")
    rle = mask_utils.encode(np.asfortranarray(m))
    a = dict(ann(1, 1, [20, 10, 50, 35]), segmentation=dict(size=[60, 80], counts=rle["counts"].decode()))
    js = write_coco(tmp_path / "a.json", [dict(id=1, file_name="a.png", width=80, height=60)], [a])
    ds = data.BoxDataset(js, str(tmp_path), size=40, train=True, seed=1, color_aug=False, gt_masks=True)
    flips, pads = set(), set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        s = ds[0]
        flips.add(s["flipped"])
        pad = (s["teacher_image"] == torch.tensor(data.PAD_RGB, dtype=torch.uint8).view(3, 1, 1)).all(0)
        pads.add(bool(pad.any()))  # where the crop leaves the image: the pad colour, and no mask
        assert not s["gt_mask"][pad].any()
        assert torch.allclose(s["gt_mask"][~pad], s["teacher_image"][0][~pad].float() / 255, atol=1 / 255)
        assert 0.2 < s["gt_mask"].mean() < 0.8
    assert flips == {True, False} and pads == {True, False}
    batch = data.collate_boxes([ds[0], ds[0]])
    assert batch["gt_mask"].shape == (2, 40, 40)
    with pytest.raises(ValueError, match="annotation 2: training on GT masks needs a segmentation"):
        data.BoxDataset(write_coco(tmp_path / "b.json", [dict(id=1, file_name="a.png", width=80, height=60)],
                                    [ann(2, 1, [1, 1, 9, 9])]), str(tmp_path), gt_masks=True)


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
    anns = [ann(1, 1, [10, 10, 50, 50]), ann(2, 1, [10, 10, 50, 50], iscrowd=1),
            ann(3, 1, [0, 0, 10, 10]), ann(4, 1, [10, 10, 0, 5]), ann(5, 1, [10, 10, 5, -1]),
            ann(6, 1, [float("nan"), 1, 5, 5]), ann(7, 1, [150, 10, 10, 10]), ann(8, 99, [1, 1, 50, 50]),
            ann(9, 1, [90, 70, 40, 40])]  # partly outside: kept
    js = write_coco(tmp_path / "a.json", [dict(id=1, file_name="a.jpg", width=100, height=80)], anns)
    ds = data.BoxDataset(js, tmp_path, size=32, min_area=200)
    assert ds.ann_ids.tolist() == [1, 9]
    assert ds.skipped == dict(missing_image_entry=1, iscrowd=1, degenerate=3, outside_image=1, small_area=1)
    assert "skipped 7" in ds.describe()
    assert data.BoxDataset(js, tmp_path, min_area=0).skipped["small_area"] == 0


def test_dataset_reads_its_boxes_from_the_mapped_index(tmp_path):
    """From a path the boxes come from the JSON's cached index (the same rows, skips and samples as
    from the dict in memory), and the dataset travels to a spawned worker as the index's path."""
    Image.new("RGB", (100, 80), (90, 40, 20)).save(tmp_path / "a.jpg")
    anns = [ann(1, 1, [10, 10, 50, 50]), ann(2, 1, [10, 10, 50, 50], iscrowd=1), ann(3, 1, [0, 0, 0, 10]),
            ann(4, 1, [150, 10, 10, 10]), ann(5, 7, [1, 1, 50, 50]), ann(6, 1, [90, 70, 40, 40]),
            ann(7, 1, [99.8, 79.8, 0.1, 0.1])]  # on no pixel centre: still trained on, clipped
    js = write_coco(tmp_path / "a.json", [dict(id=1, file_name="a.jpg", width=100, height=80)], anns)
    mapped = data.BoxDataset(js, tmp_path, size=16, seed=2)
    with open(js) as f:
        in_memory = data.BoxDataset(json.load(f), tmp_path, size=16, seed=2)
    assert mapped.index.path == js + ".index" and in_memory.index.path is None
    assert mapped.ann_ids.tolist() == in_memory.ann_ids.tolist() == [1, 6, 7]
    assert mapped.skipped == in_memory.skipped == dict(missing_image_entry=1, iscrowd=1, degenerate=1,
                                                       outside_image=1, small_area=0)
    assert np.array_equal(mapped.boxes, [[10, 10, 60, 60], [90, 70, 130, 110],
                                         [99.8, 79.8, 99.8 + 0.1, 79.8 + 0.1]])
    travelled = pickle.loads(pickle.dumps(mapped))
    for i in range(len(mapped)):
        a, b, c = mapped[i], in_memory[i], travelled[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert a["ann_id"] == c["ann_id"] and torch.equal(a["box_mask"], c["box_mask"])


def test_missing_and_corrupt_images_are_invalid_not_raised(tmp_path, capsys):
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(500))
    Image.new("RGB", (50, 48)).save(tmp_path / "wrongsize.jpg")
    names = ["ok.jpg", "missing.jpg", "trunc.jpg", "garbage.jpg", "wrongsize.jpg"]
    images = [dict(id=k + 1, file_name=n, width=64, height=48) for k, n in enumerate(names)]
    anns = [ann(10 * (k + 1) + j, k + 1, [5, 5, 20, 20]) for k in range(5) for j in range(2)]
    ds = data.BoxDataset(write_coco(tmp_path / "a.json", images, anns), tmp_path, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one plain line per file on stderr, no Python warning
        samples = [ds[i] for i in range(len(ds))] + [ds[2]]
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == sorted(f"data.py: skipping unusable image {r}" for r in ds.bad_images.values())
    assert len(lines) == 4 and all(any(os.path.join(str(tmp_path), n) + ": " in x for x in lines)
                                   for n in names[1:])
    assert [s["valid"] for s in samples[:10]] == [True, True] + [False] * 8
    assert all(s["image"].shape == (3, 16, 16) and s["box_mask"].shape == (16, 16) for s in samples)
    assert ds.n_invalid == 9 and len(ds.bad_images) == 4
    batch = data.collate_boxes(samples[:4])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["n_invalid"] == 2
    assert batch["ann_id"].tolist() == [10, 11]
    empty = data.collate_boxes(samples[2:4])
    assert empty["image"].shape == (0, 3, 16, 16) and empty["n_invalid"] == 2


def test_stats_size_classes_by_annotation_area_and_usable_counts(tmp_path, capsys):
    """data.py stats: COCO's size classes by the annotation's area (box w×h only where it has none), and
    with --check-images one plain line per unusable image and a headline that counts only usable ones."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (200, 150)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    images = [dict(id=k + 1, file_name=n, width=200, height=150)
              for k, n in enumerate(("a.png", "b.png", "bad.png"))]
    anns = [dict(ann(1, 1, [0, 0, 40, 40]), area=900),  # box medium, mask small
            dict(ann(2, 1, [0, 0, 120, 100]), area=5000),  # box large, mask medium
            ann(3, 2, [0, 0, 100, 100]), ann(4, 3, [0, 0, 10, 10]), ann(5, 3, [0, 0, 0, 10])]
    del anns[2]["area"], anns[3]["area"]
    js = write_coco(tmp_path / "a.json", images, anns)
    data.main(["stats", "--json", js, "--images", str(tmp_path)])
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "4 boxes on 3 of 3 images (min_area=0); skipped 1: degenerate=1",
        "boxes by COCO size class (annotation area): small(<32²)=2 medium=1 large(>=96²)=1; "
        "2 without an area, classed by their box w×h"] and out.err == ""
    data.main(["stats", "--json", js, "--images", str(tmp_path), "--check-images"])
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "images checked: 3, unusable: 1",
        "3 boxes on 2 of 3 images (min_area=0); skipped 2: degenerate=1, unusable_image=1",
        "boxes by COCO size class (annotation area): small(<32²)=1 medium=1 large(>=96²)=1; "
        "1 without an area, classed by their box w×h"]
    assert out.err == f"data.py: skipping unusable image {tmp_path / 'bad.png'}: not a readable image " \
                      f"(OSError: Truncated File Read)\n"


def test_training_samples_independent_of_workers(tmp_path):
    out = synthetic.make_demo(tmp_path / "demo", n_train=4, n_val=0)
    ds = data.BoxDataset(out["train_json"], out["train_images"], size=32, train=True, seed=5)
    ds.set_epoch(2)
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    order = list(sampler)  # a fixed order: each run below reads the boxes in it

    def run(workers):
        dl = torch.utils.data.DataLoader(ds, batch_size=5, sampler=order, num_workers=workers,
                                         collate_fn=data.collate_boxes)
        return [b for b in dl]

    a, b = run(0), run(2)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("image", "teacher_image", "box_mask", "crop_box", "ann_id", "flipped"):
            assert torch.equal(x[k], y[k]), k
    ds.set_epoch(3)
    assert not torch.equal(run(0)[0]["crop_box"], a[0]["crop_box"])


def test_image_boxes_reports_errors_and_bad_boxes(tmp_path):
    Image.new("RGB", (100, 80), (200, 10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    images = [dict(id=1, file_name="a.jpg", width=100, height=80),
              dict(id=2, file_name="missing.jpg", width=100, height=80),
              dict(id=3, file_name="bad.jpg", width=100, height=80),
              dict(id=4, file_name="a.jpg", width=90, height=80)]
    boxes = {1: [(1, [10, 10, 30, 20]), (2, [10, 10, 0, 20]), (3, [float("inf"), 1, 2, 2]),
                 (4, [200, 5, 5, 5]), (5, [90, 70, 50, 50])],
             2: [(6, [1, 1, 5, 5])], 3: [(7, [1, 1, 5, 5])], 4: [(8, [1, 1, 5, 5])]}
    boxes = {i: [dict(id=a, bbox=b) for a, b in v] for i, v in boxes.items()}
    ds = data.ImageBoxes(images, boxes, tmp_path, size=24)
    it = ds[0]
    assert it.error is None and it.ann_ids.tolist() == [1, 5] and (it.width, it.height) == (100, 80)
    assert it.crops.shape == (2, 3, 24, 24) and it.crops.dtype == torch.uint8
    assert it.box_masks.shape == (2, 24, 24) and it.box_masks.dtype == torch.bool
    assert it.crop_boxes.dtype == torch.float64
    assert it.bad == [(2, "zero/negative size 0x20"), (3, "non-finite bbox"),
                      (4, "bbox does not overlap the image")]  # each bad box with its own reason
    for k, what in ((1, "missing.jpg"), (2, "bad.jpg"), (3, "decoded size")):
        it = ds[k]
        assert what in it.error and it.crops.shape == (0, 3, 24, 24)
        assert it.bad == [(6 + k - 1, it.error)]


def test_blur_on_source_region_matches_blur_at_output():
    rng = np.random.default_rng(2)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
                   .resize((160, 120), Image.BICUBIC))
    img = Image.fromarray(a)
    crop = (20.5, 10.0, 84.0, 74.0)  # 63.5 x 64 source pixels -> 128: upscaled, blurred on the source
    fast = np.asarray(data._blurred_crop(img, crop, 128, 1.5)).astype(float)
    ref = np.asarray(data._crop_pil(img, crop, 128).filter(ImageFilter.GaussianBlur(1.5))).astype(float)
    assert np.abs(fast - ref)[8:-8, 8:-8].mean() < 2.0


def test_stats_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "text.json").write_text("not json at all")
    (tmp_path / "noimages.json").write_text('{"annotations": []}')
    for name, msg in (("missing.json", "missing.json: no such file$"),
                      ("text.json", r"text.json: not valid JSON \("),
                      ("noimages.json", r"noimages.json: no 'images' key")):
        with pytest.raises(SystemExit, match="^data.py: COCO instances JSON .*" + msg):
            data.main(["stats", "--json", str(tmp_path / name), "--images", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^data.py: --images .*nodir: no such folder$"):
        data.main(["stats", "--json", str(tmp_path / "text.json"), "--images", str(tmp_path / "nodir")])
