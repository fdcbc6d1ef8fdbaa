"""Evaluation of labels against GT masks (mIoU by size, mask AP, the baselines drawn from the box
alone, how well mask_score ranks the masks), the clustering score of §4.6, train.py's validation,
and the overlays a person reviews.
"""
import collections
import contextlib
import io
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

import coco
import data
import mal
import predictor
import util

# evaluate's masks drawn from the box alone
BASELINES = (("box", coco.box_mask), ("ellipse", coco.ellipse_mask))



AREA_BINS = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, float("inf")))


def _mask_ap(gt, dets, image_ids):
    """COCOeval segm stats [AP, AP50, AP75, APs, APm, APl] (None where COCOeval has no GT)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not dets:
        return [0.0] * 6
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints freely
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        E = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="segm")
        E.params.imgIds = sorted(image_ids)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return [None if s < 0 else float(s) for s in E.stats[:6]]


def ranks(x):
    """1-based ranks of x, ties sharing their average rank (as Spearman's correlation needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]  # starts of runs of equal values
    first = np.flatnonzero(new)
    last = np.r_[first[1:], len(x)] - 1
    r = np.empty(len(x))
    r[order] = ((first + last) / 2 + 1)[np.cumsum(new) - 1]
    return r


def spearman(a, b):
    """Spearman's rank correlation: Pearson's on average ranks; None where undefined (n < 2 or constant)."""
    if len(a) < 2:
        return None
    ra, rb = ranks(a) - (len(a) + 1) / 2, ranks(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else None


def score_ranking(scores, ious, bad=0.5, shares=(0.1, 0.2)):
    """How well mask_score ranks masks by IoU: Spearman's correlation, and the share of the bad masks
    (IoU < bad) among the lowest-scored 10% and 20% (equal scores in the order given)."""
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    is_bad = ious < bad
    r = {"score_spearman": spearman(scores, ious), "score_n": int(len(scores)),
         "score_n_bad": int(is_bad.sum())}
    order = np.argsort(scores, kind="stable")
    for f in shares:
        low = order[:math.ceil(f * len(scores))]
        r[f"score_bad_in_low{round(f * 100)}"] = (float(is_bad[low].sum() / is_bad.sum()) if is_bad.any()
                                                  else None)
    return r


def evaluate(gt, labeled, *, match_ids=True, image_ids=None):
    """Pseudo-labels `labeled` (the output dict) vs GT masks in `gt` (COCO instances dict).

    mIoU over GT masks (non-crowd) matched by annotation id (match_ids; an unlabeled box counts 0),
    overall and by GT mask area (small < 32², medium < 96², large); mask AP with COCOeval treating
    each pseudo-label as a detection, ranked by the detector's 'score' where the labels carry one, else
    by their mask_score (ap_ranked_by says which). The same for the BASELINES, the filled box and the
    inscribed ellipse (keys prefixed box_, ellipse_), ranked by the same scores. With
    match_ids, also how well the masks' mask_score ranks them by IoU (score_ranking)."""
    images = {im["id"]: im for im in gt["images"]}
    sel = set(images) if image_ids is None else set(image_ids)
    gts, anns = [], []
    for a in gt["annotations"]:
        if a["image_id"] not in sel or "segmentation" not in a:
            continue
        im = images[a["image_id"]]
        a = dict(a, segmentation=coco.segmentation_rle(a["segmentation"], im["height"], im["width"]))
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(mask_utils.area(a["segmentation"])))
        anns.append(a)
        if not a["iscrowd"]:
            gts.append(a)
    res = {"n": len(gts)}
    pred = {a["id"]: a for a in labeled["annotations"] if a["image_id"] in sel}
    if match_ids:
        ious = {name: [] for name in ["mal"] + [b for b, _ in BASELINES]}
        areas, scored = [], []
        for a in gts:
            im = images[a["image_id"]]
            g = coco.to_bytes(a["segmentation"])
            p = pred.get(a["id"])
            iou = 0.0
            if p is not None and "segmentation" in p:
                iou = float(mask_utils.iou([coco.to_bytes(p["segmentation"])], [g], [0])[0, 0])
                if "mask_score" in p:
                    scored.append((a["id"], p["mask_score"], iou))
            ious["mal"].append(iou)
            for name, draw in BASELINES:
                b = coco.encode(draw(coco.xywh_to_xyxy(a["bbox"]), im["height"], im["width"]))
                ious[name].append(float(mask_utils.iou([coco.to_bytes(b)], [g], [0])[0, 0]))
            areas.append(float(mask_utils.area(g)))
        areas = np.array(areas)
        for name, v in ious.items():
            v, prefix = np.array(v), "" if name == "mal" else name + "_"
            res[prefix + "miou"] = float(v.mean()) if len(v) else None
            for bin_name, lo, hi in AREA_BINS:
                m = (areas >= lo) & (areas < hi)
                res[f"{prefix}miou_{bin_name}"] = float(v[m].mean()) if m.any() else None
                if name == "mal":
                    res[f"n_{bin_name}"] = int(m.sum())
        if scored:  # by id: ties in the order of the review file
            res.update(score_ranking(*list(zip(*sorted(scored)))[1:]))
    gt_ds = {"images": [images[i] for i in sorted(sel) if i in images], "annotations": anns,
             "categories": (gt.get("categories")
                            or [{"id": c} for c in sorted({a["category_id"] for a in anns})])}
    dets, base_dets = [], {name: [] for name, _ in BASELINES}
    # What ranks the masks for AP: a detector's own score, else the mask's mask_score, else nothing.
    ranked_by = next((k for k in ("score", "mask_score") if any(k in p for p in pred.values())), None)
    res["ap_ranked_by"] = ranked_by or "none (every mask scores 1)"
    for p in pred.values():
        im = images[p["image_id"]]
        score = float(p.get(ranked_by, 1.0)) if ranked_by else 1.0
        if "segmentation" in p:
            dets.append({"image_id": p["image_id"], "category_id": p["category_id"], "score": score,
                         "segmentation": coco.to_bytes(p["segmentation"])})
        if coco.box_problem(p, im) is None:
            for name, draw in BASELINES:
                b = coco.encode(draw(coco.xywh_to_xyxy(p["bbox"]), im["height"], im["width"]))
                base_dets[name].append({"image_id": p["image_id"], "category_id": p["category_id"],
                                        "score": score, "segmentation": coco.to_bytes(b)})
    for prefix, d in [("", dets)] + [(name + "_", d) for name, d in base_dets.items()]:
        for k, v in zip(("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"), _mask_ap(gt_ds, d, sel)):
            res[prefix + k] = v
    return res


def format_eval(r):
    """A short side-by-side table of evaluate()'s numbers."""
    f = lambda v: "    -" if v is None else f"{v:5.3f}"  # noqa: E731
    cols = ["miou", "miou_small", "miou_medium", "miou_large", "ap", "ap50", "ap75"]
    heads = ["mIoU", "small", "medium", "large", "AP", "AP50", "AP75"]
    lines = ["         " + " ".join(f"{h:>7}" for h in heads)]
    for name, prefix in [("MAL", "")] + [(b, b + "_") for b, _ in BASELINES]:
        lines.append(f"{name:<8} " + " ".join(f"{f(r.get(prefix + c)):>7}" for c in cols))
    lines.append(f"{'boxes':<8} " + " ".join(f"{r.get(k, '-')!s:>7}"
                                             for k in ("n", "n_small", "n_medium", "n_large")))
    if "ap_ranked_by" in r:
        lines.append(f"mask AP ranks the masks by: {r['ap_ranked_by']}")
    if "score_n" in r:
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        lines.append(f"mask_score vs IoU over {r['score_n']} masks: "
                     f"Spearman {f(r['score_spearman']).strip()}; "
                     f"of the {r['score_n_bad']} with IoU < 0.5, {pct(r['score_bad_in_low10'])} are in the "
                     f"lowest-scored 10%, {pct(r['score_bad_in_low20'])} in the lowest 20%")
    return "\n".join(lines)


@torch.inference_mode()
def clustering(net, gt, image_dir, device, batch_size=64):
    """§4.6: the clustering score (Eq. 6) of the network's encoder over the label-time crops of the GT
    boxes of `gt` (a COCO dict or path with GT masks): tokens are FG where over half of their patch
    is GT mask. Returns (score, tokens scored)."""
    net = getattr(net, "module", net)
    enc = net.encoder
    gt = gt if isinstance(gt, dict) else coco.read_instances(gt, "GT JSON")
    gt = dict(gt, annotations=[a for a in gt["annotations"] if "segmentation" in a])
    ds = data.BoxDataset(gt, image_dir, size=predictor.input_size([net]), train=False, gt_masks=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=data.collate_boxes)
    total, n = 0.0, 0
    for b in loader:
        if len(b["image"]) == 0:
            continue
        feats = enc(data.normalize(b["image"].to(device))).float()
        fg = F.avg_pool2d(b["gt_mask"][:, None], enc.patch_size)[:, 0] > 0.5
        s, k = mal.clustering_score(feats, fg)
        if k:
            total, n = total + s * k, n + k
    return (total / n if n else float("nan")), n


VALIDATE_KEYS = ("miou", "miou_small", "miou_medium", "miou_large", "box_miou", "box_miou_small",
                 "box_miou_medium", "box_miou_large", "ap", "ap50", "box_ap", "box_ap50")


def validate(net, src, val_images, device, settings, max_images=None, **kw):
    """train.py's per-epoch validation, through the same path as label.py: label the GT boxes of the
    first `max_images` images (sorted ids) of `src` (a COCO instances dict with GT masks) with the
    LabelSettings and evaluate them. kw: LabelStream's options."""
    ids = sorted({a["image_id"] for a in src["annotations"]})
    ids = ids[:max_images] if max_images else ids
    images = {im["id"]: im for im in src["images"]}
    ids = [i for i in ids if i in images]
    todo = collections.defaultdict(list)
    for a in src["annotations"]:
        if a["image_id"] in images and coco.box_problem(a, images[a["image_id"]]) is None:
            todo[a["image_id"]].append(a)
    todo = {i: todo[i] for i in ids if todo.get(i)}
    nets = net if isinstance(net, (list, tuple)) else [net]
    was = [getattr(n, "training", False) for n in nets]
    for n in nets:
        if hasattr(n, "eval"):
            n.eval()
    try:
        results = predictor.label_dataset(nets, [images[i] for i in todo], todo, val_images, device,
                                          settings, **kw)
    finally:
        for n, w in zip(nets, was):
            if w:
                n.train()
    sel = set(ids)
    anns = [a for a in src["annotations"] if a["image_id"] in sel]
    labeled = coco.apply_labels({k: v for k, v in src.items() if k != "annotations"}, anns, results)
    r = evaluate(src, labeled, image_ids=ids)
    # Floats only (train.py logs them with :.3f); NaN where a bin is empty.
    return {k: float("nan") if r.get(k) is None else float(r[k]) for k in VALIDATE_KEYS}


PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)])
TINT = 0.15  # how much of its colour a mask's pixels take: light, so that the image under it stays readable


def outline(m):
    """The mask pixels with a 4-neighbour outside the mask (the array's edge counts as outside)."""
    inner = np.pad(m, 1)
    inner = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return m & ~inner


def _mask_of(a, shape):
    """A's mask as np.bool_ at the image's shape, or None (no mask, or another size)."""
    if "segmentation" not in a:
        return None
    m = mask_utils.decode(coco.to_bytes(a["segmentation"])).astype(bool)
    return m if m.shape == shape else None


def _load(image_dir, image):
    try:
        return np.asarray(data.load_rgb(os.path.join(image_dir, image["file_name"])))  # RGB [H, W, 3]
    except data.ImageError:
        return None


def _save_png(path, pixels):
    with util.atomic_file(path, "wb") as f:
        Image.fromarray(pixels).save(f, format="PNG")


def write_overlays(index, image_dir, vis_dir, n):
    """PNGs of masks over their images, one per image with masks (the first n whose image loads, in image
    id order, named IMAGE_ID.png), from the labels' index (coco.box_index), one image's annotations at a
    time: each mask's outline in its colour over the image as it is, its pixels lightly tinted, and its
    box's rectangle. A mask that covers what it should not, or misses what it should cover, shows on the
    image's own pixels."""
    os.makedirs(vis_dir, exist_ok=True)
    written = []
    for k in index.img_id_order:
        if len(written) >= n:
            break
        rows = index.ann_by_image[index.img_start[k]:index.img_start[k + 1]]
        if not index.ann_has_seg[rows].any():
            continue
        image = index.image(k)
        img = _load(image_dir, image)
        if img is None:
            continue
        anns = [index.annotation(r) for r in rows]  # in input order
        canvas = img.astype(np.float32)
        masks = [(j, _mask_of(a, img.shape[:2])) for j, a in enumerate(anns)]
        for j, m in masks:
            if m is not None:
                canvas[m] = (1 - TINT) * canvas[m] + TINT * PALETTE[j % len(PALETTE)]
        for j, m in masks:  # outlines after every tint: an overlapping mask does not dim another's
            if m is not None:
                canvas[outline(m)] = PALETTE[j % len(PALETTE)]
        pil = Image.fromarray(canvas.round().astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for j, a in enumerate(anns):
            x0, y0, x1, y1 = (coco.xywh_to_xyxy(a["bbox"]) if coco.box_problem(a, image) is None
                              else (0, 0, 0, 0))
            if x1 > x0:
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(map(int, PALETTE[j % len(PALETTE)])))
        written.append(os.path.join(vis_dir, f"{image['id']}.png"))
        _save_png(written[-1], np.asarray(pil))
    return written


def review_sheet(img, a, image, min_height=192, gap=4):
    """The three panels a person checks a mask with, side by side: the crop of the image around its box
    (a quarter of the box's size added on each side), as it is; the mask (white) on that crop; the
    mask's outline (red) and the box (yellow) over the crop. Enlarged by whole pixels to at least
    min_height. None where the annotation has no mask of the image's size or no usable box."""
    m = _mask_of(a, img.shape[:2])
    if m is None or coco.box_problem(a, image) is not None:
        return None
    x0, y0, x1, y1 = coco.xywh_to_xyxy(a["bbox"])
    pad = max(2.0, 0.25 * max(x1 - x0, y1 - y0))
    H, W = m.shape
    cx0, cy0 = max(0, math.floor(x0 - pad)), max(0, math.floor(y0 - pad))
    cx1, cy1 = min(W, math.ceil(x1 + pad)), min(H, math.ceil(y1 + pad))
    crop, mk = img[cy0:cy1, cx0:cx1], m[cy0:cy1, cx0:cx1]
    s = max(1, math.ceil(min_height / max(1, crop.shape[0])))

    def big(p):
        return np.repeat(np.repeat(p, s, 0), s, 1)

    h, w = crop.shape[0] * s, crop.shape[1] * s
    sheet = np.full((h, 3 * w + 2 * gap, 3), 128, np.uint8)
    for i, p in enumerate((crop, np.repeat(mk[..., None] * np.uint8(255), 3, 2), crop)):
        sheet[:, i * (w + gap):i * (w + gap) + w] = big(p)
    pil = Image.fromarray(sheet)
    bx0, by0 = 2 * (w + gap) + (x0 - cx0) * s, (y0 - cy0) * s
    ImageDraw.Draw(pil).rectangle([bx0, by0, bx0 + (x1 - x0) * s - 1, by0 + (y1 - y0) * s - 1],
                                  outline=(255, 225, 25))
    sheet = np.array(pil)
    sheet[:, 2 * (w + gap):][big(outline(mk))] = (255, 0, 0)  # over the box: the outline is what is checked
    return sheet


REVIEW_PNG = re.compile(r"\d+_score\d\.\d+_ann-?\d+\.png")


def review_list(index):
    """The annotation rows of every scored mask in the labels' index, lowest mask_score first (then by
    id): what label.py's review list holds."""
    rows = np.flatnonzero(~np.isnan(index.ann_mask_score))
    return rows[np.lexsort((index.ann_id[rows], index.ann_mask_score[rows]))]


def write_review(index, review, image_dir, review_dir, n):
    """A review sheet (review_sheet: crop, mask, outline) for each of the first n masks of review
    (review_list's rows of the labels' index) whose image loads, named RANK_scoreS_annID.png so that a
    file browser lists them worst first. Earlier review sheets in review_dir go first: their scores would
    interleave with these."""
    if os.path.isdir(review_dir):
        for f in os.listdir(review_dir):
            if REVIEW_PNG.fullmatch(f):
                os.remove(os.path.join(review_dir, f))
    os.makedirs(review_dir, exist_ok=True)
    w = len(str(max(1, min(n, len(review)))))
    written, loaded = [], (None, None, None)
    for rank, row in enumerate(review):
        if len(written) >= n:
            break
        k = int(index.ann_img_row[row])
        if k < 0:  # on no listed image: nothing to draw it on
            continue
        if loaded[0] != k:  # the review list is by score: consecutive masks rarely share an image
            image = index.image(k)
            loaded = (k, image, _load(image_dir, image))
        if loaded[2] is None:  # this mask passes its turn on
            continue
        a = index.annotation(row)
        sheet = review_sheet(loaded[2], a, loaded[1])
        if sheet is not None:  # else this mask passes its turn on too
            name = f"{rank + 1:0{w}d}_score{a['mask_score']:.4f}_ann{a['id']}.png"
            written.append(os.path.join(review_dir, name))
            _save_png(written[-1], sheet)
    return written
