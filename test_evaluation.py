"""evaluation.py: mIoU, mask AP, the baselines and the score ranking, computed by hand."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import coco
import evaluation
from conftest import bbox, disc, rle_of


def test_evaluate_matches_hand_computation():
    H, W = 100, 100
    g1, g2 = np.zeros((H, W), bool), np.zeros((H, W), bool)
    g1[10:30, 10:30] = True  # 400 px: small
    g2[50:90, 40:80] = True  # 1600 px: medium
    gt = dict(images=[dict(id=1, width=W, height=H)], categories=[{"id": 1}, {"id": 2}], annotations=[
        dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 20, 20], iscrowd=0, area=400,
             segmentation=rle_of(g1)),
        dict(id=2, image_id=1, category_id=2, bbox=[40, 50, 40, 40], iscrowd=0, area=1600,
             segmentation=rle_of(g2))])
    r = evaluation.evaluate(gt, gt)  # perfect pseudo-labels
    assert (r["miou"] == 1 and r["ap"] == pytest.approx(1.0) and r["box_miou"] == 1
            and r["box_ap"] == pytest.approx(1.0))
    half = g2.copy()
    half[:, 60:] = False  # IoU 0.5 exactly
    pred = json.loads(json.dumps(gt))
    pred["annotations"][1]["segmentation"] = rle_of(half)
    r = evaluation.evaluate(gt, pred)
    assert (r["miou"] == pytest.approx(0.75) and r["miou_small"] == 1
            and r["miou_medium"] == pytest.approx(0.5))
    assert r["miou_large"] is None and (r["n_small"], r["n_medium"], r["n_large"]) == (1, 1, 0)
    # Category 1 is right at every IoU threshold, category 2 only at 0.5: AP = (1 + 1/10) / 2.
    assert (r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(0.5)
            and r["ap"] == pytest.approx(0.55))
    del pred["annotations"][1]["segmentation"]  # an unlabeled box counts IoU 0
    assert evaluation.evaluate(gt, pred)["miou"] == pytest.approx(0.5)


def test_ellipse_baseline_is_the_inscribed_ellipse():
    e = coco.ellipse_mask((10, 20, 50, 40), 60, 70)  # centre (30, 30), semi-axes 20 and 10
    ys, xs = np.mgrid[0:60, 0:70]
    inside = ((xs + 0.5 - 30) / 20) ** 2 + ((ys + 0.5 - 30) / 10) ** 2 <= 1
    assert e.dtype == bool and (e == inside).all() and abs(e.sum() - math.pi * 200) < 10
    assert not coco.ellipse_mask((5, 5, 5, 9), 10, 10).any()  # a zero-width box
    gt = dict(images=[dict(id=1, width=70, height=60)], categories=[{"id": 1}], annotations=[
        dict(id=1, image_id=1, category_id=1, bbox=[10, 20, 40, 20], iscrowd=0, segmentation=rle_of(e))])
    r = evaluation.evaluate(gt, gt)
    assert r["ellipse_miou"] == 1 and r["ellipse_ap"] == pytest.approx(1.0)
    assert r["box_miou"] == pytest.approx(e.sum() / 800)
    assert "ellipse" in evaluation.format_eval(r)


def test_spearman_and_score_ranking_by_hand():
    assert evaluation.ranks([3, 1, 3, 3, 2]).tolist() == [4, 1, 4, 4, 2]  # the three 3s share ranks 3, 4, 5
    # Ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: deviations (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5);
    # Σ products 4.5, Σ squares 4.5 and 5: ρ = 4.5 / sqrt(22.5) = 3 / sqrt(10).
    assert evaluation.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10))
    assert evaluation.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert evaluation.spearman([1, 1, 1], [1, 2, 3]) is None and evaluation.spearman([1], [1]) is None
    # Ten masks, three bad (IoU < 0.5): the lowest-scored one (10%) is bad, the next one is not, and
    # the third bad mask has the highest score: 1/3 in the lowest 10%, 1/3 in the lowest 20%.
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    ious = [0.2, 0.9, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.3]
    r = evaluation.score_ranking(scores, ious)
    assert (r["score_n"], r["score_n_bad"]) == (10, 3)
    assert r["score_bad_in_low10"] == pytest.approx(1 / 3) and r["score_bad_in_low20"] == pytest.approx(1 / 3)
    assert r["score_spearman"] == pytest.approx(evaluation.spearman(scores, ious))
    assert evaluation.score_ranking([0.5, 0.6], [0.9, 0.8])["score_bad_in_low10"] is None  # no bad mask


def test_mask_ap_ranks_by_the_detector_score_else_mask_score():
    """Two objects of one category, one labeled well and one badly (IoU 0.5): AP is higher when the good
    mask is ranked first, and a detector's own score wins over mask_score."""
    H, W = 100, 100
    g1, g2 = np.zeros((H, W), bool), np.zeros((H, W), bool)
    g1[10:30, 10:30] = True
    g2[50:90, 40:80] = True
    gt = dict(images=[dict(id=1, width=W, height=H)], categories=[{"id": 1}], annotations=[
        dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 20, 20], iscrowd=0, segmentation=rle_of(g1)),
        dict(id=2, image_id=1, category_id=1, bbox=[40, 50, 40, 40], iscrowd=0, segmentation=rle_of(g2))])
    half = g2.copy()
    half[:, 60:] = False
    labels = json.loads(json.dumps(gt))
    labels["annotations"][1]["segmentation"] = rle_of(half)
    ap = {}
    for good, bad in ((0.9, 0.1), (0.1, 0.9)):
        labels["annotations"][0]["mask_score"], labels["annotations"][1]["mask_score"] = good, bad
        r = evaluation.evaluate(gt, labels)
        assert (r["ap_ranked_by"] == "mask_score"
                and "ranks the masks by: mask_score" in evaluation.format_eval(r))
        ap[good] = r["ap75"]
    assert ap[0.9] > ap[0.1]
    labels["annotations"][0]["score"], labels["annotations"][1]["score"] = 0.9, 0.1  # a detector's, with
                                                                                     # mask_score reversed
    r = evaluation.evaluate(gt, labels)
    assert r["ap_ranked_by"] == "score" and r["ap75"] == ap[0.9]
    for a in labels["annotations"]:
        del a["score"], a["mask_score"]
    assert evaluation.evaluate(gt, labels)["ap_ranked_by"].startswith("none")


def _ring_labeled(tmp_path):
    """A 40 x 60 image of noise with a ring in it, labeled with a disc (the failure a filled tint hides)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    m = disc(40, 60, 30, 20, 12)
    Image.fromarray(img).save(tmp_path / "a.png")
    labeled = dict(images=[dict(id=1, file_name="a.png", width=60, height=40)], annotations=[
        dict(id=7, image_id=1, category_id=1, bbox=bbox(m), iscrowd=0, area=int(m.sum()),
             segmentation=rle_of(m), mask_score=0.5)])
    return img, m, labeled


def test_the_overlay_draws_the_outline_over_the_image_as_it_is(tmp_path):
    img, m, labeled = _ring_labeled(tmp_path)
    (path,) = evaluation.write_overlays(coco.index_of_dict(labeled), str(tmp_path), str(tmp_path / "vis"), 5)
    out = np.asarray(Image.open(path).convert("RGB")).astype(int)
    edge = evaluation.outline(m)
    x, y, w, h = (int(v) for v in labeled["annotations"][0]["bbox"])
    box = np.zeros_like(m)
    box[y:y + h, x:x + w] = True
    box[y + 1:y + h - 1, x + 1:x + w - 1] = False  # the rectangle's own pixels
    colour = evaluation.PALETTE[0]
    assert (out[edge] == colour).all() and edge.sum() > 40
    assert (out[~m & ~box] == img[~m & ~box]).all()  # untouched outside the mask
    inside = m & ~edge & ~box
    tinted = np.round((1 - evaluation.TINT) * img[inside].astype(np.float32)
                      + evaluation.TINT * colour.astype(np.float32))
    assert (out[inside] == tinted).all() and np.abs(out[inside] - img[inside]).max() <= 0.15 * 255 + 1


def test_the_review_sheet_shows_crop_mask_and_outline_side_by_side(tmp_path):
    img, m, labeled = _ring_labeled(tmp_path)
    a = labeled["annotations"][0]
    sheet = evaluation.review_sheet(img, a, labeled["images"][0], min_height=60, gap=4)
    x0, y0, x1, y1 = coco.xywh_to_xyxy(a["bbox"])  # 18, 8, 42, 32: the crop adds 6 a side, clipped
    cy0, cy1, cx0, cx1 = 2, 38, 12, 48
    s = 2  # 36 rows enlarged to at least 60
    w = (cx1 - cx0) * s
    assert sheet.shape == ((cy1 - cy0) * s, 3 * w + 8, 3)
    crop, mask, drawn = (sheet[:, i * (w + 4):i * (w + 4) + w][::s, ::s] for i in range(3))
    assert (crop == img[cy0:cy1, cx0:cx1]).all()
    assert (mask == m[cy0:cy1, cx0:cx1, None] * 255).all()
    edge = evaluation.outline(m[cy0:cy1, cx0:cx1])
    assert (drawn[edge] == (255, 0, 0)).all()
    assert (drawn[~edge] == img[cy0:cy1, cx0:cx1][~edge]).sum(1).astype(bool).mean() > 0.8  # the box aside
    index = coco.index_of_dict(labeled)
    (written,) = evaluation.write_review(index, evaluation.review_list(index), str(tmp_path),
                                         str(tmp_path / "review"), 3)
    # by default enlarged to at least 192 rows: 36 × 6
    assert written.endswith("1_score0.5000_ann7.png") and Image.open(written).size == (3 * 36 * 6 + 8, 216)
