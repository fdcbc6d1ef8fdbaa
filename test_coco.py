"""coco.py: mask pasting and RLE against the crop mapping, reading boxes, the labeled output."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import coco
import data
import util


def paste_mask(prob, crop_box, H, W, thr=0.5, box=None):
    """label.paste_region's mask, in its whole [H, W] image."""
    out = np.zeros((H, W), bool)
    ya, xa, region = coco.paste_region(prob, crop_box, H, W, thr, box)
    out[ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
    return out


def test_paste_region_inverts_data_crop_mapping():
    """Every image pixel samples the crop at data.image_to_crop of its centre (bilinear, clamped)."""
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(12, 9, generator=g)
    crop = (3.3, 5.7, 30.1, 41.9)
    H, W = 50, 40
    got = paste_mask(prob, crop, H, W, thr=0.5)
    p = prob.double().numpy()
    ref, near = np.zeros((H, W), bool), np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            if not (crop[0] <= x + 0.5 < crop[2] and crop[1] <= y + 0.5 < crop[3]):
                continue
            u = data.image_to_crop(x + 0.5, crop, 9)  # the x mapping...
            v = data.image_to_crop(y + 0.5, (crop[1], 0, crop[3], 0), 12)  # ...and the same for y
            u, v = min(max(u, 0), 8), min(max(v, 0), 11)
            u0, v0 = min(int(u), 7), min(int(v), 10)
            fu, fv = u - u0, v - v0
            val = ((1 - fv) * ((1 - fu) * p[v0, u0] + fu * p[v0, u0 + 1])
                   + fv * ((1 - fu) * p[v0 + 1, u0] + fu * p[v0 + 1, u0 + 1]))
            ref[y, x], near[y, x] = val > 0.5, abs(val - 0.5) < 1e-5
    assert ref.any() and (~ref).any()
    assert np.array_equal(got & ~near, ref & ~near)
    # A box restricts the mask to its pixel centres; an identity crop pastes pixel for pixel.
    assert not paste_mask(torch.ones(4, 4), crop, H, W, 0.5, box=(10, 10, 20, 20))[:, :10].any()
    one = torch.zeros(6, 8)
    one[2:4, 1:7] = 1
    m = paste_mask(one, (10, 20, 18, 26), 30, 30, 0.5)
    assert np.array_equal(np.argwhere(m), np.argwhere(np.pad(one.numpy() > 0.5, ((20, 4), (10, 12)))))


def test_encode_region_matches_encoding_the_whole_image():
    """encode_region (what labeling runs) gives encode's RLE of the whole-image mask, on
    random regions of random images, a region that starts at pixel 0 or ends at the last pixel, the
    whole image, an empty one, and the regions paste_region gives for random crops and boxes."""
    rng = np.random.default_rng(0)
    cases = [(5, 7, 0, 0, np.ones((5, 7), bool)), (5, 7, 2, 3, np.ones((3, 4), bool)),
             (5, 7, 0, 0, np.zeros((0, 0), bool)), (5, 7, 1, 1, np.zeros((2, 2), bool))]
    for k in range(400):
        H, W = (int(v) for v in rng.integers(1, 30, 2))
        ya, xa = int(rng.integers(0, H)), int(rng.integers(0, W))
        h, w = int(rng.integers(0, H - ya + 1)), int(rng.integers(0, W - xa + 1))
        cases.append((H, W, ya, xa, rng.random((h, w)) < (0.05, 0.5, 0.95)[k % 3]))
    for H, W, ya, xa, region in cases:
        full = np.zeros((H, W), bool)
        full[ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
        assert coco.encode_region(ya, xa, region, H, W) == coco.encode(full), (H, W, ya, xa, region)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x0, y0 = (float(v) for v in torch.rand(2, generator=g) * 40 - 10)
        crop = (x0, y0, x0 + 5 + 40 * float(torch.rand(1, generator=g)),
                y0 + 5 + 30 * float(torch.rand(1, generator=g)))
        box = (crop[0] + 2, crop[1] + 1, crop[2] - 1, crop[3] - 2)
        prob = torch.rand(6, 7, generator=g)
        full = paste_mask(prob, crop, 30, 40, 0.5, box)
        ya, xa, region = coco.paste_region(prob, crop, 30, 40, 0.5, box)
        assert coco.encode_region(ya, xa, region, 30, 40) == coco.encode(full) and region.sum() == full.sum()


def test_non_integer_ids_are_rejected_by_name(tmp_path):
    base = dict(images=[dict(id=1, file_name="a.png")], categories=[{"id": 1}],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5])])
    for where, key, value, msg in (("annotations", "id", "a7", "annotation #1 has a non-integer id 'a7'"),
                                   ("annotations", "image_id", True,
                                    "annotation #1 has a non-integer image_id True"),
                                   ("images", "id", "1", "image #0 has a non-integer id '1'")):
        src = json.loads(json.dumps(base))
        if where == "annotations":
            src["annotations"].append(dict(src["annotations"][0], id=2))
        src[where][-1][key] = value
        (tmp_path / "b.json").write_text(json.dumps(src))
        with pytest.raises(util.InputError, match=msg):
            coco.box_index(str(tmp_path / "b.json"))


def test_unlabeled_boxes_can_get_their_filled_box():
    out = dict(images=[dict(id=1, width=10, height=8), dict(id=2, file_name="nosize.png")], categories=[])
    anns = [dict(id=1, image_id=1, bbox=[2, 1, 4, 3], segmentation=[[0, 0, 1, 1]], mask_score=0.9),
            dict(id=2, image_id=2, bbox=[0, 0, 2, 2]), dict(id=3, image_id=1, bbox=[2, 1, 0, 3]),
            dict(id=4, image_id=1, bbox=[20, 1, 4, 3]), dict(id=5, image_id=1, bbox=[float("inf"), 1, 4, 3])]
    results = {1: {"reason": "missing image"}, 2: {"reason": "missing image"}, 3: {"reason": "zero width"},
               4: {"reason": "outside"}, 5: {"reason": "non-finite"}}
    plain = coco.apply_labels(out, anns, results)["annotations"]
    assert "segmentation" not in plain[0] and plain[0]["area"] == 12.0  # the GT polygon is never passed on
    assert "mask_score" not in plain[0]  # nor an earlier labeling's score
    boxed = coco.apply_labels(out, anns, results, unlabeled_as="box")["annotations"]
    assert "mask_score" not in boxed[0]  # a filled box is no scored mask
    m = mask_utils.decode({"size": boxed[0]["segmentation"]["size"],
                           "counts": boxed[0]["segmentation"]["counts"].encode()})
    assert m.shape == (8, 10) and m.sum() == 12 and m[1:4, 2:6].all() and boxed[0]["area"] == 12.0
    assert "segmentation" not in boxed[1]  # no image size: no mask can be drawn
    for a in boxed[2:]:  # a box that covers no pixel: an empty mask of the image's size, still a mask on
                         # every box
        m = mask_utils.decode({"size": a["segmentation"]["size"],
                               "counts": a["segmentation"]["counts"].encode()})
        assert m.shape == (8, 10) and m.sum() == 0 and a["area"] == 0
