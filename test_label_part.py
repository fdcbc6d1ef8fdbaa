"""Tests for label.py (merged into test_mal.py by the lead): pasting, the labeling path with an
oracle net, the CLI's output and report, resume, 2 gloo ranks, evaluation, results-list input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import data
import label
import mal

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(arch="vit_tiny", patch_size=8, img_size=32, depth=1)


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def _bbox(m):
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint and a small synthetic COCO set with a missing image, a corrupt image,
    a degenerate box, a box on an unknown image and a box sticking out of its image."""
    d = tmp_path_factory.mktemp("label")
    torch.manual_seed(0)
    net = mal.MAL(**TINY)
    sd = net.state_dict()
    torch.save(dict(model_args=TINY, task=sd, teacher=sd, step=0, epoch=0, args={}), d / "tiny.pt")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    images, anns, aid = [], [], 1
    for i in range(1, 8):  # 7 good images, 2 discs each, with GT masks
        H, W = 48, 64
        pix = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
        for cx, cy, r in [(20, 20, 10), (48 + i, 30, 12)]:
            m = _disc(H, W, cx, cy, r)
            pix[m] = (220, 30, 30)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(dict(id=aid, image_id=i, category_id=1 + aid % 2, bbox=_bbox(m), iscrowd=0,
                             area=int(m.sum()), segmentation=dict(size=[H, W], counts=rle["counts"].decode()),
                             extra="kept"))
            aid += 1
        Image.fromarray(pix).save(d / "img" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", width=W, height=H))
    anns[0]["bbox"] = [-5.0, -3.0, 30.0, 30.0]  # sticks out of the image: labeled, mask clipped
    (d / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    images += [dict(id=20, file_name="missing.png", width=64, height=48),
               dict(id=21, file_name="corrupt.png", width=64, height=48)]
    anns += [dict(id=100, image_id=20, category_id=1, bbox=[1, 1, 10, 10], iscrowd=0, area=100),
             dict(id=101, image_id=21, category_id=1, bbox=[1, 1, 10, 10], iscrowd=0, area=100),
             dict(id=102, image_id=1, category_id=1, bbox=[5, 5, 0, 10], iscrowd=0, area=0),
             dict(id=103, image_id=99, category_id=1, bbox=[5, 5, 10, 10], iscrowd=0, area=100)]
    coco = dict(images=images, annotations=anns, categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                info={"note": "test"})
    (d / "boxes.json").write_text(json.dumps(coco))
    return d


def _argv(w, out, *extra):
    return ["--ckpt", str(w / "tiny.pt"), "--json", str(w / "boxes.json"), "--images", str(w / "img"),
            "--out", str(out), "--chunk-images", "2", "--batch-size", "4", "--workers", "0", "--quiet", *extra]


def _run(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=HERE, env=e, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------


def test_paste_mask_inverts_data_crop_mapping():
    """Every image pixel samples the crop at data.image_to_crop of its centre (bilinear, clamped)."""
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(12, 9, generator=g)
    crop = (3.3, 5.7, 30.1, 41.9)
    H, W = 50, 40
    got = label.paste_mask(prob, crop, H, W, thr=0.5)
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
    assert not label.paste_mask(torch.ones(4, 4), crop, H, W, 0.5, box=(10, 10, 20, 20))[:, :10].any()
    one = torch.zeros(6, 8)
    one[2:4, 1:7] = 1
    m = label.paste_mask(one, (10, 20, 18, 26), 30, 30, 0.5)
    assert np.array_equal(np.argwhere(m), np.argwhere(np.pad(one.numpy() > 0.5, ((20, 4), (10, 12)))))


class Oracle(torch.nn.Module):
    """Stands in for MAL: logits from the crop's colour (the object is pure red), at half resolution."""

    img_size = 64

    def forward(self, x):
        mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
        rgb = x * std + mean
        red = ((rgb[:, 0] > 150) & (rgb[:, 1] < 100)).float()
        return torch.nn.functional.avg_pool2d(red[:, None], 2)[:, 0] * 20 - 10


@pytest.mark.parametrize("flip,crf", [(False, 0), (True, 0), (False, 5)])
def test_oracle_masks_land_where_the_objects_are(tmp_path, flip, crf):
    H, W = 80, 96
    objs = [_disc(H, W, 30, 40, 15), _disc(H, W, 88, 12, 14)]  # the second runs off the image
    pix = np.full((H, W, 3), 128, np.uint8)
    for m in objs:
        pix[m] = (255, 0, 0)
    Image.fromarray(pix).save(tmp_path / "a.png")
    images = [dict(id=7, file_name="a.png", width=W, height=H)]
    todo = {7: [dict(id=k + 1, bbox=_bbox(m)) for k, m in enumerate(objs)]}
    res = label.label_dataset(Oracle(), images, todo, str(tmp_path), "cpu", flip=flip, crf_iters=crf,
                              crf_size=32, batch_size=1)
    for k, m in enumerate(objs):
        got = mask_utils.decode(label._to_bytes(res[k + 1]["segmentation"])).astype(bool)
        assert got.shape == (H, W) and res[k + 1]["area"] == got.sum()
        iou = (got & m).sum() / (got | m).sum()
        assert iou > 0.93, iou
        assert np.abs(np.argwhere(got).mean(0) - np.argwhere(m).mean(0)).max() < 0.5


def test_cli_writes_valid_coco_and_reports_every_unlabeled_box(world, tmp_path):
    out = tmp_path / "labels.json"
    label.main(_argv(world, out, "--eval", "--vis", "2"))
    src = json.loads((world / "boxes.json").read_text())
    res = json.loads(out.read_text())
    assert [a["id"] for a in res["annotations"]] == [a["id"] for a in src["annotations"]]
    assert res["images"] == src["images"] and res["categories"] == src["categories"] and res["info"] == src["info"]
    coco = COCO(str(out))  # loads as an instances JSON
    unlabeled = {100, 101, 102, 103}
    ims = {im["id"]: im for im in src["images"]}
    for a, s in zip(res["annotations"], src["annotations"]):
        assert {k: a[k] for k in ("image_id", "bbox", "category_id", "iscrowd")} == \
               {k: s[k] for k in ("image_id", "bbox", "category_id", "iscrowd")}
        if a["id"] in unlabeled:
            assert "segmentation" not in a
            continue
        assert a["extra"] == "kept" and isinstance(a["segmentation"]["counts"], str)
        m = coco.annToMask(a).astype(bool)
        assert m.shape == (ims[a["image_id"]]["height"], ims[a["image_id"]]["width"]) and a["area"] == m.sum()
        x, y, w, h = a["bbox"]
        inside = label.box_mask((x, y, x + w, y + h), *m.shape)
        assert not (m & ~inside).any()  # the mask lies in the box, clipped to the image
    rep = json.loads((tmp_path / "labels.report.json").read_text())
    reasons = {u["id"]: u["reason"] for u in rep["unlabeled"]}
    assert set(reasons) == unlabeled and rep["summary"]["unlabeled"] == 4 and rep["summary"]["labeled"] == 14
    assert "not found" in reasons[100] and "missing.png" in reasons[100]
    assert "corrupt.png" in reasons[101] and "degenerate" in reasons[102] and "not in images" in reasons[103]
    ev = json.loads((tmp_path / "labels.eval.json").read_text())
    assert 0 <= ev["miou"] <= 1 and ev["box_miou"] > 0.5 and ev["n"] == 14
    assert len(os.listdir(tmp_path / "labels.vis")) == 2
    assert not (tmp_path / "labels.json.parts").exists()  # cleaned up after the merge


def test_resume_after_kill_is_byte_identical_and_refuses_other_configs(world, tmp_path):
    ref, out = tmp_path / "ref.json", tmp_path / "out.json"
    r = _run(["label.py", *_argv(world, ref)])
    assert r.returncode == 0, r.stderr
    r = _run(["label.py", *_argv(world, out)], env={"MAL_LABEL_STOP_AFTER": "2"})  # dies like kill -9
    assert r.returncode == 75 and not out.exists()
    assert len([f for f in os.listdir(f"{out}.parts") if f.startswith("chunk")]) == 2
    with pytest.raises(SystemExit, match="another configuration.*thr.*--fresh"):
        label.main(_argv(world, out, "--thr", "0.3"))
    label.main(_argv(world, out, "--batch-size", "3"))  # resumes (batching is not part of the config)
    assert out.read_bytes() == ref.read_bytes()
    label.main(_argv(world, out, "--keep-parts", "--fresh"))
    assert out.read_bytes() == ref.read_bytes() and os.path.exists(f"{out}.parts/fingerprint.json")


def test_two_gloo_ranks_equal_one_process(world, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = _run(["label.py", *_argv(world, one)])
    assert r.returncode == 0, r.stderr
    argv = [a for a in _argv(world, two) if a != "--quiet"]
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "label.py", *argv])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "label[rank 0]" in r.stderr and "label[rank 1]" in r.stderr  # both ranks did work
    assert two.read_bytes() == one.read_bytes()


def _rle(m):
    return label.encode(m)


def test_evaluate_matches_hand_computation():
    H, W = 100, 100
    g1, g2 = np.zeros((H, W), bool), np.zeros((H, W), bool)
    g1[10:30, 10:30] = True  # 400 px: small
    g2[50:90, 40:80] = True  # 1600 px: medium
    gt = dict(images=[dict(id=1, width=W, height=H)], categories=[{"id": 1}, {"id": 2}], annotations=[
        dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 20, 20], iscrowd=0, area=400, segmentation=_rle(g1)),
        dict(id=2, image_id=1, category_id=2, bbox=[40, 50, 40, 40], iscrowd=0, area=1600, segmentation=_rle(g2))])
    r = label.evaluate(gt, gt)  # perfect pseudo-labels
    assert r["miou"] == 1 and r["ap"] == pytest.approx(1.0) and r["box_miou"] == 1 and r["box_ap"] == pytest.approx(1.0)
    half = g2.copy()
    half[:, 60:] = False  # IoU 0.5 exactly
    pred = json.loads(json.dumps(gt))
    pred["annotations"][1]["segmentation"] = _rle(half)
    r = label.evaluate(gt, pred)
    assert r["miou"] == pytest.approx(0.75) and r["miou_small"] == 1 and r["miou_medium"] == pytest.approx(0.5)
    assert r["miou_large"] is None and (r["n_small"], r["n_medium"], r["n_large"]) == (1, 1, 0)
    # Category 1 is right at every IoU threshold, category 2 only at 0.5: AP = (1 + 1/10) / 2.
    assert r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(0.5) and r["ap"] == pytest.approx(0.55)
    del pred["annotations"][1]["segmentation"]  # an unlabeled box counts IoU 0
    assert label.evaluate(gt, pred)["miou"] == pytest.approx(0.5)


def test_results_list_with_score_threshold(world, tmp_path):
    dets = [dict(image_id=1, bbox=[10, 10, 20, 20], score=0.9, category_id=1),
            dict(image_id=2, bbox=[5, 5, 20, 20], score=0.2, category_id=2),
            dict(image_id=3, bbox=[30, 15, 25, 25], score=0.6, category_id=1),
            dict(image_id=3, bbox=[0, 0, 10, 10], score=0.05, category_id=1)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "lab.json"
    argv = _argv(world, out, "--images-json", str(world / "boxes.json"), "--score-thr", "0.5", "--eval")
    argv[argv.index("--json") + 1] = str(tmp_path / "dets.json")
    label.main(argv)
    res = json.loads(out.read_text())
    assert [(a["id"], a["score"]) for a in res["annotations"]] == [(1, 0.9), (3, 0.6)]
    assert all("segmentation" in a for a in res["annotations"]) and res["categories"][0]["name"] == "a"
    COCO(str(out))
    rep = json.loads((tmp_path / "lab.report.json").read_text())
    assert rep["summary"]["filtered_by_score"] == 2 and rep["summary"]["labeled"] == 2
    ev = json.loads((tmp_path / "lab.eval.json").read_text())
    assert "ap" in ev and "miou" not in ev  # detections have no GT ids: AP only
    argv = _argv(world, tmp_path / "x.json")
    argv[argv.index("--json") + 1] = str(tmp_path / "dets.json")
    with pytest.raises(SystemExit, match="results list.*--images-json"):
        label.main(argv)
