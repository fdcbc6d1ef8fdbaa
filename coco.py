"""COCO helpers: reading the boxes to label (an instances JSON or a results list), why a box cannot
be labeled, mask geometry (a crop's probabilities pasted into the image, exact with respect to
data.py's crop mapping), compressed RLE, and the labeled output.

Coordinates: boxes are xyxy float pixels; pixel (i, j) covers [j, j+1) × [i, i+1), its centre is
(j + 0.5, i + 0.5); an image pixel belongs to a box iff its centre lies in [x0, x1) × [y0, y1).
COCO's bbox is xywh. Crop pixel (u, v) of an S × S crop of box (x0, y0, x1, y1) sits at
x = x0 + (u + 0.5)(x1 - x0)/S.
"""
import collections
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import util


def bbox_problem(x, y, w, h, width, height):
    """None if the xywh box is usable on a width x height image (None: size unknown), else
    (kind, reason). label.py applies the same rule before labeling."""
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "degenerate", "non-finite bbox"
    if w <= 0 or h <= 0:
        return "degenerate", f"zero/negative size {w:g}x{h:g}"
    if width is not None and height is not None:
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return "outside_image", "bbox does not overlap the image"
    return None


def segmentation_rle(seg, h, w):
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    return seg



def xywh_to_xyxy(b):
    return (float(b[0]), float(b[1]), float(b[0]) + float(b[2]), float(b[1]) + float(b[3]))


def _pixel_span(a, b, n):
    """Pixels x in [0, n) whose centre x + 0.5 lies in [a, b)."""
    return max(0, math.ceil(a - 0.5)), min(n, max(0, math.ceil(b - 0.5)))


def box_mask(box_xyxy, img_h, img_w):
    """The box rasterised as a mask (the box baseline): np.bool_ [img_h, img_w]."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    m = np.zeros((img_h, img_w), dtype=bool)
    xa, xb = _pixel_span(x0, x1, img_w)
    ya, yb = _pixel_span(y0, y1, img_h)
    m[ya:yb, xa:xb] = True
    return m


def ellipse_mask(box_xyxy, img_h, img_w):
    """The ellipse inscribed in the box as a mask (a baseline): the pixels whose centre lies in it."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    a, b = (x1 - x0) / 2, (y1 - y0) / 2
    if a <= 0 or b <= 0:
        return np.zeros((img_h, img_w), dtype=bool)
    xs = (np.arange(img_w) + 0.5 - (x0 + a)) / a
    ys = (np.arange(img_h) + 0.5 - (y0 + b)) / b
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1


def paste_region(prob, crop_box, img_h, img_w, thr=0.5, box=None):
    """prob [h, w] (any resolution) over crop_box (x0, y0, x1, y1, image pixels) -> the mask it
    pastes into an [img_h, img_w] image, as (ya, xa, region): np.bool_ region holds the pixels it can
    set (the crop box within `box` and the image) from row ya, column xa; all others are off.

    Image pixel (x, y) samples prob bilinearly (edges clamped) at crop coordinates
    u = (x + 0.5 - x0)·w/(x1 - x0) - 0.5, the inverse of the crop mapping; it is on iff that
    probability is > thr, its centre lies inside the crop box, and inside `box` (xyxy) when given.
    """
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    bx0, by0, bx1, by1 = (x0, y0, x1, y1) if box is None else (float(v) for v in box)
    xa, xb = _pixel_span(max(x0, bx0), min(x1, bx1), img_w)
    ya, yb = _pixel_span(max(y0, by0), min(y1, by1), img_h)
    if xa >= xb or ya >= yb or x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    # grid_sample with align_corners=False maps -1/+1 to the outer edges of the map: exactly our mapping.
    grid = torch.empty(1, yb - ya, xb - xa, 2)
    grid[..., 0] = (torch.arange(xa, xb, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
    grid[..., 1] = ((torch.arange(ya, yb, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1)[:, None]
    p = F.grid_sample(prob.float()[None, None].cpu(), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)[0, 0]
    return ya, xa, (p > thr).numpy()


def encode(mask):
    """np.bool_ [H, W] -> COCO compressed RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_region(ya, xa, region, img_h, img_w):
    """encode() of the [img_h, img_w] mask that is `region` at (ya, xa) and off elsewhere (as
    paste_region gives it), without making that mask: COCO's RLE runs down the columns, so its runs
    are those of the on pixels' positions x·img_h + y, read off their gaps: work for the region's
    pixels, not the image's."""
    xs, ys = np.nonzero(region.T)  # column-major order
    pos = (xs.astype(np.int64) + xa) * img_h + ys + ya
    if pos.size == 0:
        counts = [img_h * img_w]
    else:
        cut = np.flatnonzero(np.diff(pos) != 1) + 1
        starts, ends = pos[np.r_[0, cut]], pos[np.r_[cut - 1, pos.size - 1]] + 1
        counts = np.empty(2 * starts.size + 1, np.int64)  # off, on, off, on, ..., on, off
        counts[0], counts[1::2], counts[-1] = starts[0], ends - starts, img_h * img_w - ends[-1]
        counts[2:-1:2] = starts[1:] - ends[:-1]
        counts = counts.tolist()[:-1] if counts[-1] == 0 else counts.tolist()
    rle = mask_utils.frPyObjects({"size": [img_h, img_w], "counts": counts}, img_h, img_w)
    return {"size": [img_h, img_w], "counts": rle["counts"].decode("ascii")}


def to_bytes(rle):
    c = rle["counts"]
    return {"size": rle["size"], "counts": c.encode("ascii") if isinstance(c, str) else c}


def box_problem(ann, image):
    """Why this annotation's box cannot be labeled, or None."""
    b = ann.get("bbox")
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return f"no valid bbox (got {b!r})"
    try:
        b = [float(v) for v in b]
    except (TypeError, ValueError):
        return f"non-numeric bbox {b!r}"
    W, H = image.get("width"), image.get("height")
    problem = bbox_problem(*b, W or None, H or None)
    if problem:
        return f"{problem[1]} ({problem[0].replace('_', ' ')} box {b})"
    x0, y0, x1, y1 = xywh_to_xyxy(b)
    if W and H:
        xa, xb = _pixel_span(x0, x1, int(W))
        ya, yb = _pixel_span(y0, y1, int(H))
        if xa >= xb or ya >= yb:
            return f"box {b} covers no pixel centre of the {W}x{H} image"
    return None


def _is_id(v):
    """COCO ids are ints; strings would break sorting, chunk keys and the merge far from the cause."""
    return isinstance(v, int) and not isinstance(v, bool)


class Boxes(NamedTuple):
    """The boxes to label, as load_boxes reads them."""
    out: dict  # the output's skeleton: the input without its annotations
    anns: list  # the kept annotations, in output order
    images: dict  # {image id: image entry}
    todo: dict  # {image id: [annotation, ...]}: the boxes that can be labeled
    problems: dict  # {annotation id: reason}: those that cannot
    n_filtered: int  # results dropped by score_thr
    gt: dict  # what --eval compares against (None without GT masks)
    kind: str  # "instances" or "results"


def read_instances(path, what="COCO instances JSON"):
    """A COCO instances JSON as a dict; InputError naming the file and the missing key otherwise."""
    return util.read_json(path, what, keys=("images", "annotations"))


def load_boxes(json_path, images_json=None, score_thr=None):
    """Read the boxes to label: a COCO instances JSON, or a COCO results list with the image entries
    in images_json. Every problem with the input is an InputError naming the file and what is wrong."""
    src = util.read_json(json_path, "--json")
    if isinstance(src, list):  # detector output: results list
        if not images_json:
            raise util.InputError(f"{json_path} is a COCO results list; pass --images-json with the "
                                  f"image entries")
        imgs = util.read_json(images_json, "--images-json")
        imgs = {"images": imgs} if isinstance(imgs, list) else imgs
        if not isinstance(imgs, dict) or "images" not in imgs:
            raise util.InputError(f"--images-json {images_json}: no 'images' key")
        out = {k: v for k, v in imgs.items() if k != "annotations"}
        anns = []
        for i, r in enumerate(src):
            if not isinstance(r, dict) or "image_id" not in r:
                raise util.InputError(f"{json_path}: result #{i} has no image_id")
            if not _is_id(r["image_id"]):
                raise util.InputError(f"{json_path}: result #{i} has a non-integer image_id "
                                      f"{r['image_id']!r}")
            a = dict(r)
            a["id"] = i + 1  # ids 1..N in input order, stable under --score-thr
            a.setdefault("iscrowd", 0)
            anns.append(a)
        gt = imgs if any("segmentation" in a for a in imgs.get("annotations", [])) else None
        kind = "results"
    elif isinstance(src, dict):
        for k in ("images", "annotations"):
            if k not in src:
                raise util.InputError(f"--json {json_path}: no {k!r} key (a COCO instances JSON has "
                                      f"'images' and 'annotations'; a results list is a list)")
        out = {k: v for k, v in src.items() if k != "annotations"}
        anns = [dict(a) for a in src["annotations"]]
        for i, a in enumerate(anns):
            if "id" not in a or "image_id" not in a:
                raise util.InputError(f"{json_path}: annotation #{i} lacks 'id' or 'image_id'")
            for k in ("id", "image_id"):
                if not _is_id(a[k]):
                    raise util.InputError(f"{json_path}: annotation #{i} has a non-integer {k} {a[k]!r}")
        if len({a["id"] for a in anns}) != len(anns):
            raise util.InputError(f"{json_path}: annotation ids are not unique")
        gt = src if any("segmentation" in a for a in src["annotations"]) else None
        kind = "instances"
    else:
        raise util.InputError(f"--json {json_path}: holds a {type(src).__name__}, neither a COCO "
                              f"instances JSON (a dict) nor a results list")
    n_in = len(anns)
    if score_thr is not None:  # only boxes that carry a score are filtered
        anns = [a for a in anns if a.get("score") is None or float(a["score"]) >= score_thr]
    images = {}
    for i, im in enumerate(out["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise util.InputError(f"{images_json or json_path}: image #{i} has no id")
        if not _is_id(im["id"]):
            raise util.InputError(f"{images_json or json_path}: image #{i} has a non-integer id {im['id']!r}")
        images[im["id"]] = im
    todo, problems = collections.defaultdict(list), {}
    for a in anns:
        im = images.get(a["image_id"])
        why = f"image_id {a['image_id']} not in images" if im is None else box_problem(a, im)
        if why:
            problems[a["id"]] = why
        else:
            todo[a["image_id"]].append(a)
    return Boxes(out, anns, images, dict(todo), problems, n_in - len(anns), gt, kind)


def apply_labels(out, anns, results, unlabeled_as="none"):
    """The output dict: `out` with `anns` in order, each with its mask and mask_score, or (if
    unlabeled) its box, no segmentation, no mask_score and area = box area; unlabeled_as="box" gives
    those a mask instead (for trainers that need one on every box, e.g. detectron2's mapper): the filled
    box, or an empty mask of the image's size where the box covers none of its pixels; only where the
    image entry has no size can no mask be drawn. Results: {ann_id: {'segmentation', 'area',
    'mask_score'} or {'reason'}}."""
    images = {im.get("id"): im for im in out.get("images", [])}
    res_anns = []
    for a in anns:
        a = dict(a)
        r = results.get(a["id"])
        if r is not None and "segmentation" in r:
            a["segmentation"], a["area"], a["mask_score"] = r["segmentation"], r["area"], r["mask_score"]
        else:
            a.pop("segmentation", None)  # never pass a GT mask off as a label
            a.pop("mask_score", None)  # nor an earlier run's score off as this one's
            b = a.get("bbox")
            try:
                a["area"] = max(0.0, float(b[2])) * max(0.0, float(b[3]))
            except (TypeError, ValueError, IndexError):
                a["area"] = 0.0
            im = images.get(a.get("image_id")) or {}
            h, w = im.get("height"), im.get("width")
            if unlabeled_as == "box" and h and w:
                m = box_mask(xywh_to_xyxy(b), int(h), int(w)) if box_problem(a, im) is None else \
                    np.zeros((int(h), int(w)), dtype=bool)  # zero-width, non-finite or outside: empty
                a["segmentation"], a["area"] = encode(m), float(m.sum())
        res_anns.append(a)
    return {**out, "annotations": res_anns}
