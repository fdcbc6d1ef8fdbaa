"""label.py: a mask for every box. Turns COCO boxes (ground truth or detector output) into a COCO
instances JSON with an RLE mask per box, using a trained MAL checkpoint.

  python label.py --ckpt demo/run/last.pt --json boxes.json --images DIR --out labels.json [--eval]
  torchrun --nproc_per_node 8 label.py ...          # shards images over ranks; rank 0 merges
  python label.py                                   # the demo: label demo/data's val set, evaluate

Work is committed in chunks (a fixed block of sorted image ids each) under OUT.parts/, so a rerun of
the same command after a crash or kill -9 skips what is done, with any world size, and the merged
output is byte-identical to an uninterrupted run. No box is lost silently: one that cannot be labeled
keeps its box, gets no `segmentation`, and is listed with its reason in OUT's .report.json.

Every mask gets a `mask_score` in [0, 1], an estimate of its IoU with the object (see mask_score);
OUT's .review.json lists the masks lowest score first, --review N draws the N lowest for a person to
check, and --eval says how well the score ranks the masks by their true IoU.

The test-time settings come from the checkpoint's recipe (train.py's label_defaults) unless given;
the demo's were chosen on the demo's validation set and checked on two other sets (QUALITY.md).
"""
import argparse
import collections
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import data
import mal
import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
# Test-time settings for a checkpoint without a recipe of its own (see test_time_settings).
TEST_TIME = dict(net="task", expand=0.2, thr=0.5, flip=False, crf_refine=False, crf_iters=100, crf_size=128,
                 crf_zeta=0.5, crf_omega=2.0, crf_unary=1.0)
AREA_BINS = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, float("inf")))

# ----------------------------------------------------------------------------------------------
# Geometry: crop probabilities -> full-image mask, exact w.r.t. data.py's crop mapping
# (crop pixel (u, v) of an S×S crop of box (x0, y0, x1, y1) sits at x = x0 + (u + 0.5)(x1 - x0)/S).
# An image pixel (x, y) belongs to a box iff its centre (x + 0.5, y + 0.5) lies in [x0, x1) × [y0, y1).


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


BASELINES = (("box", box_mask), ("ellipse", ellipse_mask))  # evaluate's masks drawn from the box alone


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


def xywh_to_xyxy(b):
    return (float(b[0]), float(b[1]), float(b[0]) + float(b[2]), float(b[1]) + float(b[3]))


# ----------------------------------------------------------------------------------------------
# Input: a COCO instances JSON, or a COCO results list (+ --images-json for the image entries)


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"label.py: {what} {path} not found")
    except json.JSONDecodeError as e:
        raise SystemExit(f"label.py: {what} {path} is not valid JSON ({e})")


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
    problem = data.bbox_problem(*b, W or None, H or None)
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


def load_boxes(json_path, images_json=None, score_thr=None):
    """Read the boxes to label. Returns dict(out, anns, images, todo, problems, n_filtered, gt, kind):
    out the output skeleton (input minus annotations), anns the kept annotations in output order,
    images {id: image dict}, todo {image_id: [ann, ...]} the labelable boxes, problems
    {ann_id: reason} those that are not, gt the dict to --eval against (None if no GT masks)."""
    src = _read_json(json_path, "--json")
    if isinstance(src, list):  # detector output: results list
        if not images_json:
            raise SystemExit(f"label.py: {json_path} is a COCO results list; pass --images-json with the image entries")
        imgs = _read_json(images_json, "--images-json")
        imgs = {"images": imgs} if isinstance(imgs, list) else imgs
        if "images" not in imgs:
            raise SystemExit(f"label.py: {images_json} has no 'images' key")
        out = {k: v for k, v in imgs.items() if k != "annotations"}
        anns = []
        for i, r in enumerate(src):
            if not isinstance(r, dict) or "image_id" not in r:
                raise SystemExit(f"label.py: {json_path}: result #{i} has no image_id")
            if not _is_id(r["image_id"]):
                raise SystemExit(f"label.py: {json_path}: result #{i} has a non-integer image_id {r['image_id']!r}")
            a = dict(r)
            a["id"] = i + 1  # ids 1..N in input order, stable under --score-thr
            a.setdefault("iscrowd", 0)
            anns.append(a)
        gt = imgs if any("segmentation" in a for a in imgs.get("annotations", [])) else None
        kind = "results"
    elif isinstance(src, dict) and "images" in src and "annotations" in src:
        out = {k: v for k, v in src.items() if k != "annotations"}
        anns = [dict(a) for a in src["annotations"]]
        for i, a in enumerate(anns):
            if "id" not in a or "image_id" not in a:
                raise SystemExit(f"label.py: {json_path}: annotation #{i} lacks 'id' or 'image_id'")
            for k in ("id", "image_id"):
                if not _is_id(a[k]):
                    raise SystemExit(f"label.py: {json_path}: annotation #{i} has a non-integer {k} {a[k]!r}")
        if len({a["id"] for a in anns}) != len(anns):
            raise SystemExit(f"label.py: {json_path}: annotation ids are not unique")
        gt = src if any("segmentation" in a for a in src["annotations"]) else None
        kind = "instances"
    else:
        raise SystemExit(f"label.py: {json_path} is neither a COCO instances JSON nor a results list")
    n_in = len(anns)
    if score_thr is not None:  # only boxes that carry a score are filtered
        anns = [a for a in anns if a.get("score") is None or float(a["score"]) >= score_thr]
    images = {}
    for i, im in enumerate(out["images"]):
        if "id" not in im:
            raise SystemExit(f"label.py: an image entry of {images_json or json_path} has no id")
        if not _is_id(im["id"]):
            raise SystemExit(f"label.py: {images_json or json_path}: image #{i} has a non-integer id {im['id']!r}")
        images[im["id"]] = im
    todo, problems = collections.defaultdict(list), {}
    for a in anns:
        im = images.get(a["image_id"])
        why = f"image_id {a['image_id']} not in images" if im is None else box_problem(a, im)
        if why:
            problems[a["id"]] = why
        else:
            todo[a["image_id"]].append(a)
    return dict(out=out, anns=anns, images=images, todo=dict(todo), problems=problems,
                n_filtered=n_in - len(anns), gt=gt, kind=kind)


# ----------------------------------------------------------------------------------------------
# Model and the one inference path (label.py, train.py's validation and the tests all use it)


def load_checkpoint(ckpt, mmap=False):
    """A train.py checkpoint as a dict (on CPU); any failure is a one-line SystemExit naming it."""
    try:
        ck = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise SystemExit(f"label.py: checkpoint {ckpt} not found")
    except Exception as e:  # truncated file, not a checkpoint, unpicklable objects, ...
        raise SystemExit(f"label.py: {ckpt}: cannot load checkpoint ({' '.join(str(e).split())[:300]})")
    if not isinstance(ck, dict):
        raise SystemExit(f"label.py: {ckpt}: not a train.py checkpoint (a {type(ck).__name__}, not a dict)")
    return ck


def load_nets(ckpt, net="task", device="cpu"):
    """Build the network(s) of a train.py checkpoint: ([task], [teacher] or both for 'avg'),
    its model arguments and its training arguments."""
    ck = load_checkpoint(ckpt)
    keys = {"task": ["task"], "teacher": ["teacher"], "avg": ["task", "teacher"]}[net]
    nets = []
    for k in keys:
        if k not in ck or "model_args" not in ck:
            raise SystemExit(f"label.py: checkpoint {ckpt} lacks key {k!r} or 'model_args'")
        try:
            m = mal.MAL(**ck["model_args"])
            m.load_state_dict(ck[k])
        except Exception as e:  # model_args or weights that do not fit this mal.py
            raise SystemExit(f"label.py: {ckpt}: cannot build the {k!r} network "
                             f"({' '.join(str(e).split())[:300]})")
        nets.append(m.eval().to(device))
    return nets, dict(ck["model_args"]), dict(ck.get("args", {}))


def input_size(nets):
    """The crop size S the network(s) were built for."""
    n = nets[0]
    n = getattr(n, "module", n)  # DDP
    n = getattr(n, "_orig_mod", n)  # torch.compile
    enc = getattr(n, "encoder", None)
    if enc is not None:  # a MAL: its position grid × patch size
        return int(round(math.sqrt(enc.pos_embed.shape[1] - 1))) * enc.patch_size
    return int(getattr(n, "img_size"))


# What a chunk's mask_score means; part of the fingerprint, so change it with mask_score().
MASK_SCORE = "(1 - mean |max p - crosses box| over row and column bags) * mean |2p - 1| in box, pre-CRF"


def mask_score(prob, box_mask):
    """An estimate of each mask's IoU with its object, in [0, 1], from the network's own probabilities
    prob [B,h,w] and the box box_mask [B,h,w] (1 inside) of its crop: MIL consistency × confidence.

    MIL consistency: Eq. 2's bags, the rows and columns of the crop, should hold foreground (their max
    p) iff they cross the box; it is 1 − the mean |max p − crosses| over the rows, averaged with the
    same over the columns. A mask that misses part of the object, or spills over the box, loses it.
    Confidence: the mean |2p − 1| inside the box, low where the network hesitates. Both come free
    with the forward pass. Measured on the demo's val set (README), their product ranks the masks by
    IoU better than either alone, than their agreement with the CRF's refinement, the teacher's mask
    or the flipped crop's, and than products with those."""
    rows = (prob.amax(2) - box_mask.amax(2)).abs().mean(1)
    cols = (prob.amax(1) - box_mask.amax(1)).abs().mean(1)
    conf = ((2 * prob - 1).abs() * box_mask).flatten(1).sum(1) / box_mask.flatten(1).sum(1).clamp_min(1)
    return ((1 - (rows + cols) / 2) * conf).clamp(0, 1)


@torch.inference_mode()
def predict(nets, crops, box_masks, device, *, flip=False, crf_iters=0, crf_size=128, crf_zeta=0.5, crf_omega=2.0,
            crf_unary=1.0):
    """uint8 crops [B,3,S,S] and box masks [B,S,S] (pinned, on CPU) -> (mask probabilities [B,h,w],
    mask_score [B]), float32 on `device`. The mean of sigmoid(logits) over the nets (and their horizontal
    flips), optionally CRF-refined; the score is taken before the CRF (see mask_score).
    A net is any callable: normalised float [B,3,S,S] -> logits [B,h,w] (tests inject oracles)."""
    x = data.normalize(crops.to(device, non_blocking=True))
    bm = box_masks.to(device, non_blocking=True).float()
    if flip:  # one forward over [x; flip(x)]: bigger batches are cheaper than two calls
        x = torch.cat([x, x.flip(-1)])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        probs = [net(x).float().sigmoid() for net in nets]
    prob = torch.stack(probs).mean(0)
    if flip:
        B = crops.shape[0]
        prob = (prob[:B] + prob[B:].flip(-1)) / 2
    score = mask_score(prob, F.adaptive_max_pool2d(bm[:, None], prob.shape[-2:])[:, 0])
    if crf_iters:
        # The CRF sees the crop as in training: image area-down, box max-pooled to crf_size.
        img, bm = mal.crop_to_loss_size(x[:crops.shape[0]].float(), bm, crf_size)
        prob = F.interpolate(prob[:, None], size=(crf_size, crf_size), mode="bilinear", align_corners=False)[:, 0]
        prob = mal.refine(img, prob, bm, iters=crf_iters, zeta=crf_zeta, omega=crf_omega, unary_weight=crf_unary)
    return prob, score


def _paste_batch(prob, score, event, metas, thr):
    """Runs on a worker thread: wait for the device->host copy, then paste and RLE-encode each crop."""
    if event is not None:
        event.synchronize()
    out = {}
    for p, s, (ann_id, crop_box, box, H, W) in zip(prob, score.tolist(), metas):
        ya, xa, region = paste_region(p, crop_box, H, W, thr, box)
        # 4 decimals: an estimate needs no more, and the last float bits may differ between batchings.
        out[ann_id] = {"segmentation": encode_region(ya, xa, region, H, W), "area": int(region.sum()),
                       "mask_score": round(s, 4)}
    return out


class Progress:
    """Prints 'images i/I boxes b/B (l labeled) r boxes/s ETA' to stderr every `every` seconds. B: the
    labelable boxes (those that passed the box checks), b: those done, labeled or not (their image failed)."""

    def __init__(self, n_images, n_boxes, prefix="label", every=5.0, quiet=False):
        self.N, self.B, self.prefix, self.every, self.quiet = n_images, n_boxes, prefix, every, quiet
        self.i = self.b = self.labeled = 0
        self.t0 = self.last = time.time()

    def update(self, images=0, labeled=0, unlabeled=0, force=False):
        self.i += images
        self.labeled += labeled
        self.b += labeled + unlabeled
        now = time.time()
        if self.quiet or not (force or now - self.last >= self.every):
            return
        self.last = now
        rate = self.b / max(now - self.t0, 1e-9)
        eta = (self.B - self.b) / rate if rate > 0 else float("nan")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        print(f"{self.prefix}: images {self.i}/{self.N} boxes {self.b}/{self.B} ({self.labeled} labeled) "
              f"{rate:.1f} boxes/s ETA {eta_s}", file=sys.stderr, flush=True)


def _image_boxes(images, todo, image_dir, size, expand):
    """data.ImageBoxes over `images` (labeling order) with their labelable boxes."""
    boxes = {iid: [(a["id"], a["bbox"]) for a in anns] for iid, anns in todo.items()}
    return data.ImageBoxes(images, boxes, image_dir, size, t=expand)


def label_stream(nets, images, todo, image_dir, *, device, size=None, groups=None, expand=0.2, thr=0.5,
                 flip=False, crf_iters=0, crf_size=128, crf_zeta=0.5, crf_omega=2.0, crf_unary=1.0, batch_size=32,
                 workers=0, threads=4, progress=None):
    """Label the boxes `todo` {image_id: [ann, ...]} of `images` (image dicts, in this order).

    groups: a key per image (default: one group); images of a group must be consecutive. Yields
    (group, {ann_id: {'segmentation', 'area', 'mask_score'} or {'reason'}}) as each group completes.
    Crop batches never span groups, so a group's masks do not depend on which rank or run labels it."""
    device = torch.device(device)
    nets = nets if isinstance(nets, (list, tuple)) else [nets]
    size = size or input_size(nets)
    groups = groups if groups is not None else [0] * len(images)
    cuda = device.type == "cuda"
    ds = _image_boxes(images, todo, image_dir, size, expand)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    boxes = {a["id"]: xywh_to_xyxy(a["bbox"]) for anns in todo.values() for a in anns}
    opts = dict(flip=flip, crf_iters=crf_iters, crf_size=crf_size, crf_zeta=crf_zeta, crf_omega=crf_omega,
                crf_unary=crf_unary)
    pool = ThreadPoolExecutor(max(1, threads))
    buf = []  # (crop [3,S,S] u8, box mask [S,S], meta) waiting for a full batch
    finished = collections.deque()  # (group, results, futures) whose pastes may still be running
    cur = dict(group=None, res={}, futs=[])

    def run_batch(items):
        crops = torch.empty((len(items), 3, size, size), dtype=torch.uint8, pin_memory=cuda)
        torch.stack([it[0] for it in items], out=crops)
        bms = torch.empty((len(items), size, size), dtype=torch.bool, pin_memory=cuda)
        torch.stack([it[1] for it in items], out=bms)
        prob, score = predict(nets, crops, bms, device, **opts)
        if cuda:  # async copy into pinned memory; the paste thread waits on the event, not us
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (prob, score)]
            for h, t in zip(host, (prob, score)):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = (prob, score), None
        cur["futs"].append(pool.submit(_paste_batch, *host, event, [it[2] for it in items], thr))
        if progress:
            progress.update(labeled=len(items))

    def close_group():
        while buf:
            run_batch(buf[:batch_size])
            del buf[:batch_size]
        if cur["group"] is not None or cur["res"] or cur["futs"]:
            finished.append((cur["group"], cur["res"], cur["futs"]))
        cur.update(group=None, res={}, futs=[])

    def ready(block):
        while finished and (block or all(f.done() for f in finished[0][2])):
            g, res, futs = finished.popleft()
            for f in futs:
                res.update(f.result())
            yield g, res

    try:
        for i, item in enumerate(loader):
            g = groups[i]
            if i == 0:
                cur["group"] = g
            elif g != cur["group"]:
                close_group()
                cur["group"] = g
                yield from ready(False)
            im = images[i]
            if item["image_id"] != im["id"]:
                raise RuntimeError(f"label.py: data order mismatch at image {im['id']}")
            ids = [int(a) for a in item["ann_ids"]]
            bad = {int(a): why for a, why in item.get("bad") or []}
            failed = [a["id"] for a in todo.get(im["id"], []) if a["id"] not in ids]
            for aid in failed:  # every box without a crop gets its reason, never silence
                cur["res"][aid] = {"reason": bad.get(aid) or item.get("error") or "no crop produced"}
            if ids:  # only a decoded image has crops; a failed one may have no size at all (JSON w/h optional)
                H, W = int(item["height"]), int(item["width"])  # the decoded size (== the JSON's, else error)
            for j, aid in enumerate(ids):
                cb = tuple(float(v) for v in item["crop_boxes"][j])
                buf.append((item["crops"][j], item["box_masks"][j], (aid, cb, boxes[aid], H, W)))
            while len(buf) >= batch_size:
                run_batch(buf[:batch_size])
                del buf[:batch_size]
            if progress:
                progress.update(images=1, unlabeled=len(failed))
            yield from ready(False)
        close_group()
        yield from ready(True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def label_dataset(nets, images, todo, image_dir, device, **kw):
    """Label everything in one go: {ann_id: {'segmentation', 'area', 'mask_score'} or {'reason'}}
    (see label_stream)."""
    res = {}
    for _, r in label_stream(nets, images, todo, image_dir, device=device, **kw):
        res.update(r)
    return res


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


# ----------------------------------------------------------------------------------------------
# Evaluation: pseudo-label mIoU (by COCO area of the GT mask) and mask AP, vs the filled-box baseline


def _to_bytes(rle):
    c = rle["counts"]
    return {"size": rle["size"], "counts": c.encode("ascii") if isinstance(c, str) else c}


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
    r = {"score_spearman": spearman(scores, ious), "score_n": int(len(scores)), "score_n_bad": int(is_bad.sum())}
    order = np.argsort(scores, kind="stable")
    for f in shares:
        low = order[:math.ceil(f * len(scores))]
        r[f"score_bad_in_low{round(f * 100)}"] = float(is_bad[low].sum() / is_bad.sum()) if is_bad.any() else None
    return r


def evaluate(gt, labeled, *, match_ids=True, image_ids=None):
    """Pseudo-labels `labeled` (the output dict) vs GT masks in `gt` (COCO instances dict).

    mIoU over GT masks (non-crowd) matched by annotation id (match_ids; an unlabeled box counts 0),
    overall and by GT mask area (small < 32², medium < 96², large); mask AP with COCOeval treating
    each pseudo-label as a detection (score: its 'score' or 1). The same for the BASELINES, the filled
    box and the inscribed ellipse (keys prefixed box_, ellipse_). With
    match_ids, also how well the masks' mask_score ranks them by IoU (score_ranking)."""
    images = {im["id"]: im for im in gt["images"]}
    sel = set(images) if image_ids is None else set(image_ids)
    gts, anns = [], []
    for a in gt["annotations"]:
        if a["image_id"] not in sel or "segmentation" not in a:
            continue
        im = images[a["image_id"]]
        a = dict(a, segmentation=data.segmentation_rle(a["segmentation"], im["height"], im["width"]))
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
            g = _to_bytes(a["segmentation"])
            p = pred.get(a["id"])
            iou = 0.0
            if p is not None and "segmentation" in p:
                iou = float(mask_utils.iou([_to_bytes(p["segmentation"])], [g], [0])[0, 0])
                if "mask_score" in p:
                    scored.append((a["id"], p["mask_score"], iou))
            ious["mal"].append(iou)
            for name, draw in BASELINES:
                b = encode(draw(xywh_to_xyxy(a["bbox"]), im["height"], im["width"]))
                ious[name].append(float(mask_utils.iou([_to_bytes(b)], [g], [0])[0, 0]))
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
             "categories": gt.get("categories") or [{"id": c} for c in sorted({a["category_id"] for a in anns})]}
    dets, base_dets = [], {name: [] for name, _ in BASELINES}
    for p in pred.values():
        im = images[p["image_id"]]
        score = float(p.get("score", 1.0))
        if "segmentation" in p:
            dets.append({"image_id": p["image_id"], "category_id": p["category_id"], "score": score,
                         "segmentation": _to_bytes(p["segmentation"])})
        if box_problem(p, im) is None:
            for name, draw in BASELINES:
                b = encode(draw(xywh_to_xyxy(p["bbox"]), im["height"], im["width"]))
                base_dets[name].append({"image_id": p["image_id"], "category_id": p["category_id"],
                                        "score": score, "segmentation": _to_bytes(b)})
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
    lines.append(f"{'boxes':<8} " + " ".join(f"{r.get(k, '-')!s:>7}" for k in ("n", "n_small", "n_medium", "n_large")))
    if "score_n" in r:
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        lines.append(f"mask_score vs IoU over {r['score_n']} masks: Spearman {f(r['score_spearman']).strip()}; "
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
    gt = gt if isinstance(gt, dict) else _read_json(gt, "GT json")
    gt = dict(gt, annotations=[a for a in gt["annotations"] if "segmentation" in a])
    ds = data.BoxDataset(gt, image_dir, size=input_size([net]), train=False, gt_masks=True)
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


def validate(net, val_json, val_images, device, max_images=None, **kw):
    """train.py's per-epoch validation, through the same path as label.py: label the GT boxes of the
    first `max_images` val images (sorted ids) and evaluate them. kw: label_stream options."""
    src = val_json if isinstance(val_json, dict) else _read_json(val_json, "val json")
    ids = sorted({a["image_id"] for a in src["annotations"]})
    ids = ids[:max_images] if max_images else ids
    images = {im["id"]: im for im in src["images"]}
    ids = [i for i in ids if i in images]
    todo = collections.defaultdict(list)
    for a in src["annotations"]:
        if a["image_id"] in images and box_problem(a, images[a["image_id"]]) is None:
            todo[a["image_id"]].append(a)
    todo = {i: todo[i] for i in ids if todo.get(i)}
    nets = net if isinstance(net, (list, tuple)) else [net]
    was = [getattr(n, "training", False) for n in nets]
    for n in nets:
        if hasattr(n, "eval"):
            n.eval()
    try:
        results = label_dataset(nets, [images[i] for i in todo], todo, val_images, device, **kw)
    finally:
        for n, w in zip(nets, was):
            if w:
                n.train()
    sel = set(ids)
    anns = [a for a in src["annotations"] if a["image_id"] in sel]
    labeled = apply_labels({k: v for k, v in src.items() if k != "annotations"}, anns, results)
    r = evaluate(src, labeled, image_ids=ids)
    # Floats only (train.py logs them with :.3f); NaN where a bin is empty.
    return {k: float("nan") if r.get(k) is None else float(r[k]) for k in VALIDATE_KEYS}


# ----------------------------------------------------------------------------------------------
# Overlays


def write_overlays(labeled, image_dir, vis_dir, n, pages=None):
    """PNGs of masks over their images: box rectangle, mask outline and translucent fill. pages:
    [(file name, image_id, [ann, ...])], of which the first n whose image loads are drawn; default
    one page per image with masks, in image id order, named IMAGE_ID.png."""
    from PIL import Image, ImageDraw
    os.makedirs(vis_dir, exist_ok=True)
    if pages is None:
        by_img = collections.defaultdict(list)
        for a in labeled["annotations"]:
            by_img[a["image_id"]].append(a)
        pages = [(f"{iid}.png", iid, anns) for iid, anns in sorted(by_img.items())
                 if any("segmentation" in a for a in anns)]
    images = {im["id"]: im for im in labeled["images"]}
    palette = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)])
    written = []
    for name, iid, anns in pages:
        if len(written) >= n:
            break
        try:
            img = np.asarray(data.load_rgb(os.path.join(image_dir, images[iid]["file_name"])))  # RGB [H, W, 3]
        except data.ImageError:
            continue
        canvas = img.astype(np.float32)
        for k, a in enumerate(anns):
            if "segmentation" not in a:
                continue
            m = mask_utils.decode(_to_bytes(a["segmentation"])).astype(bool)
            if m.shape != canvas.shape[:2]:
                continue
            c = palette[k % len(palette)]
            canvas[m] = 0.55 * canvas[m] + 0.45 * c
            inner = m.copy()  # outline: mask pixels with a 4-neighbour outside the mask
            inner[1:] &= m[:-1]
            inner[:-1] &= m[1:]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            canvas[m & ~inner] = c
        pil = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for k, a in enumerate(anns):
            x0, y0, x1, y1 = xywh_to_xyxy(a["bbox"]) if box_problem(a, images[iid]) is None else (0, 0, 0, 0)
            if x1 > x0:
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(int(v) for v in palette[k % len(palette)]))
        path = os.path.join(vis_dir, name)
        with data.atomic_file(path, "wb") as f:
            pil.save(f, format="PNG")
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# Review: masks by mask_score, lowest first

REVIEW_PNG = re.compile(r"\d+_score\d\.\d+_ann-?\d+\.png")


def review_list(labeled):
    """[{'id', 'image_id', 'mask_score'}] of every scored mask, lowest score first (then by id)."""
    scored = [a for a in labeled["annotations"] if "mask_score" in a]
    return [{"id": a["id"], "image_id": a["image_id"], "mask_score": a["mask_score"]}
            for a in sorted(scored, key=lambda a: (a["mask_score"], a["id"]))]


def write_review(labeled, review, image_dir, review_dir, n):
    """An overlay per mask (that mask and its box alone) for the first n entries of review_list,
    named RANK_scoreS_annID.png so that a file browser lists them worst first. Earlier review
    overlays in review_dir go first: their scores would interleave with these."""
    if os.path.isdir(review_dir):
        for f in os.listdir(review_dir):
            if REVIEW_PNG.fullmatch(f):
                os.remove(os.path.join(review_dir, f))
    anns = {a["id"]: a for a in labeled["annotations"]}
    w = len(str(max(1, min(n, len(review)))))
    pages = ((f"{k + 1:0{w}d}_score{r['mask_score']:.4f}_ann{r['id']}.png", r["image_id"], [anns[r["id"]]])
             for k, r in enumerate(review))  # lazily: an image that fails to load passes its turn on
    return write_overlays(labeled, image_dir, review_dir, n, pages)


# ----------------------------------------------------------------------------------------------
# Files: JSON output, fingerprint, chunks


def write_json(path, obj):
    """Atomic: a crash never leaves a half-written file under `path`."""
    with data.atomic_file(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 22), b""):
            h.update(blk)
    return h.hexdigest()


# Options that change the labels; a parts folder made with other values must not be merged.
FINGERPRINT_OPTS = ("net", "expand", "thr", "flip", "crf_refine", "crf_iters", "crf_size", "crf_zeta",
                    "crf_omega", "crf_unary", "score_thr", "chunk_images")


def fingerprint(args, device):
    cfg = {k: getattr(args, k) for k in FINGERPRINT_OPTS}
    cfg["mask_score"] = MASK_SCORE  # parts scored otherwise (or not at all) do not mix with these
    cfg["device"] = torch.device(device).type  # cpu float32 and cuda bf16 give different pixels
    cfg["ckpt_sha256"] = file_sha256(args.ckpt)
    cfg["json_sha256"] = file_sha256(args.json)
    cfg["images_json_sha256"] = file_sha256(args.images_json) if args.images_json else None
    cfg["images"] = os.path.realpath(args.images)
    return cfg


def chunk_path(parts, k):
    return os.path.join(parts, f"chunk{k:06d}.json")


# ----------------------------------------------------------------------------------------------
# The CLI


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="Label every box of a COCO JSON with a MAL mask. No arguments: the demo "
                    "(label demo/data's val set with demo/run/last.pt, training it first if absent; "
                    "--vis 8 --review 8 --eval; output demo/labels.json).", formatter_class=data.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="train.py checkpoint (e.g. RUN/last.pt)")
    p.add_argument("--json", required=True, help="COCO instances JSON (GT boxes) or COCO results list")
    p.add_argument("--images", required=True, help="image folder (file_name is relative to it)")
    p.add_argument("--out", required=True, help="output instances JSON (also OUT.report.json, OUT.parts/)")
    p.add_argument("--images-json", help="for a results list: JSON with the image entries (its categories "
                                         "are copied; its GT masks, if any, are used by --eval)")
    p.add_argument("--score-thr", type=float, help="keep results with score >= this (others are dropped and counted)")
    # Test-time settings: a flag given here wins, then the checkpoint's recipe (`label_defaults`, written
    # by train.py), then TEST_TIME. --crf-iters / --crf-size default to the training loss's values.
    # Their default is None on purpose (unset: from the checkpoint); the help says what that means.
    recipe = lambda v: f" (default: the checkpoint's recipe, else {v})"  # noqa: E731
    p.add_argument("--net", choices=["task", "teacher", "avg"], help="which weights label: the task net, the EMA "
                   "teacher, or the mean of both" + recipe(TEST_TIME["net"]))
    p.add_argument("--expand", type=float,
                   help="test-time box expansion t (each side ×(1+t))" + recipe(TEST_TIME["expand"]))
    p.add_argument("--thr", type=float, help="mask = probability > thr" + recipe(TEST_TIME["thr"]))
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="average with the horizontally flipped crop" + recipe("off"))
    p.add_argument("--crf-refine", action=argparse.BooleanOptionalAction,
                   help="mean-field CRF refinement of each mask" + recipe("off"))
    p.add_argument("--crf-iters", type=int,
                   help="mean-field iterations" + recipe(f"its training loss's, else {TEST_TIME['crf_iters']}"))
    p.add_argument("--crf-size", type=int,
                   help="resolution the CRF runs at" + recipe(f"its training loss size, else {TEST_TIME['crf_size']}"))
    p.add_argument("--crf-zeta", type=float, help="CRF colour bandwidth ζ (Eq. 4)" + recipe(TEST_TIME["crf_zeta"]))
    p.add_argument("--crf-omega", type=float, help="CRF pairwise weight ω (Eq. 4)" + recipe(TEST_TIME["crf_omega"]))
    p.add_argument("--crf-unary", type=float, help="CRF unary weight τ (Eq. 3 with E = τ·unary + pairwise; below 1 "
                   "the colour edges overrule the mask more)" + recipe(TEST_TIME["crf_unary"]))
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward (across images)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (decode + crop)")
    p.add_argument("--threads", type=int, default=4, help="threads that paste and RLE-encode masks")
    p.add_argument("--chunk-images", type=int, default=64, help="images per resumable chunk")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda")
    p.add_argument("--fresh", action="store_true", help="discard OUT.parts/ and start over")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after the merge")
    p.add_argument("--unlabeled-as", choices=["none", "box"], default="none",
                   help="mask of a box that could not be labeled: none (no segmentation key) or its filled box, "
                        "empty where the box covers no pixel (for trainers that need a mask on every box); "
                        "the report lists them either way, and says which mask each got")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 when any box is unlabeled (for pipelines; OUT is written all the same)")
    p.add_argument("--eval", action="store_true", help="evaluate against GT masks: mIoU, mask AP, vs box")
    p.add_argument("--vis", type=int, default=0, help="write N overlay PNGs")
    p.add_argument("--vis-dir", help="overlay folder (default OUT without .json + '.vis')")
    p.add_argument("--review", type=int, default=0, metavar="N",
                   help="write an overlay of each of the N lowest-scored masks (mask_score in the file name) "
                        "to OUT without .json + '.review/'")
    p.add_argument("--dist-timeout", type=float, default=24.0, help="hours ranks wait for each other")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def demo_argv():
    """The demo's command line; trains demo/run/last.pt first (python train.py) if it is absent."""
    d = synthetic.make_demo(os.path.join(HERE, "demo", "data"))
    ckpt = os.path.join(HERE, "demo", "run", "last.pt")
    if not os.path.exists(ckpt) and int(os.environ.get("RANK", "0")) == 0:
        print(f"label.py: {ckpt} not found; training it with `python train.py`", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(HERE, "train.py")], cwd=HERE, check=True)
    return ["--ckpt", ckpt, "--json", d["val_json"], "--images", d["val_images"],
            "--out", os.path.join(HERE, "demo", "labels.json"), "--vis", "8", "--review", "8", "--eval",
            "--crf-refine"]


def test_time_settings(args):
    """Fill the test-time flags left unset from the checkpoint's recipe, then TEST_TIME; say which."""
    ck = load_checkpoint(args.ckpt, mmap=True)  # mapped, not read: only its small entries are used
    recipe, targs = dict(ck.get("label_defaults") or {}), ck.get("args") or {}
    recipe.setdefault("crf_iters", targs.get("crf_iters", 100))
    recipe.setdefault("crf_size", targs.get("loss_size", 128))
    given = [k for k in TEST_TIME if getattr(args, k) is not None]
    for k, v in TEST_TIME.items():
        if getattr(args, k) is None:
            setattr(args, k, recipe.get(k, v))
    if not args.crf_refine:
        args.crf_iters = 0
    print(f"label.py: net {args.net}, thr {args.thr:g}, expand {args.expand:g}, flip {'on' if args.flip else 'off'}, "
          + (f"CRF refinement {args.crf_iters} iterations at {args.crf_size}px (ζ {args.crf_zeta:g}, ω {args.crf_omega:g}, τ {args.crf_unary:g})"
             if args.crf_refine else "no CRF refinement")
          + (f"; from the checkpoint's recipe except {', '.join('--' + k.replace('_', '-') for k in given)}" if given
             else "; from the checkpoint's recipe" if ck.get("label_defaults") else ""), file=sys.stderr)


def dist_setup(args):
    """(rank, world, device) from torchrun's env; one process without torchrun works too."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda":
        import train
        device = train.local_cuda_device(local if device.index is None else device.index)
    if world > 1:
        import datetime
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=args.dist_timeout),
            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def check_inputs(args):
    """A missing input is a one-line error naming it, before anything reads (or hashes) it."""
    for flag, path, folder in (("--ckpt", args.ckpt, False), ("--json", args.json, False),
                               ("--images-json", args.images_json, False), ("--images", args.images, True)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise SystemExit(f"label.py: {flag} {path} not found")
        if os.path.isdir(path) != folder:
            raise SystemExit(f"label.py: {flag} {path} is {'not ' if folder else ''}a folder")


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv if argv else demo_argv())
    check_inputs(args)
    test_time_settings(args)
    if args.chunk_images < 1 or args.batch_size < 1:
        raise SystemExit("label.py: --chunk-images and --batch-size must be >= 1")
    t0 = time.time()
    rank, world, device = dist_setup(args)
    try:
        n_unlabeled = run(args, rank, world, device, t0)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if args.strict and n_unlabeled:
        sys.exit(3)


def run(args, rank, world, device, t0):
    """Label, merge on rank 0, write OUT and its report; returns the number of unlabeled boxes (0 off rank 0)."""
    inp = load_boxes(args.json, args.images_json, args.score_thr)
    images, todo = inp["images"], inp["todo"]
    ids = sorted(todo)
    chunks = [ids[i:i + args.chunk_images] for i in range(0, len(ids), args.chunk_images)]
    parts = args.out + ".parts"

    # One configuration per parts folder: rank 0 records it, every rank checks it.
    cfg = fingerprint(args, device)
    if rank == 0:
        if args.fresh and os.path.isdir(parts):
            shutil.rmtree(parts)
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(os.path.join(parts, "fingerprint.json")):
            write_json(os.path.join(parts, "fingerprint.json"), cfg)
    barrier(world)
    with open(os.path.join(parts, "fingerprint.json")) as f:
        old = json.load(f)
    if old != cfg:
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        raise SystemExit(f"label.py: {parts} holds parts of another configuration (differs in: "
                         f"{', '.join(diff)}); rerun with --fresh or delete it")
    done = {k for k in range(len(chunks)) if os.path.exists(chunk_path(parts, k))}
    barrier(world)  # everyone has listed `done` before anyone writes a new chunk
    pending = [k for k in range(len(chunks)) if k not in done]
    mine = pending[rank::world]
    tag = "label" if world == 1 else f"label[rank {rank}]"
    if done and rank == 0:
        print(f"label.py: resuming: {len(done)}/{len(chunks)} chunks already done", file=sys.stderr)

    if mine:
        nets = load_nets(args.ckpt, args.net, device)[0]
        order = [iid for k in mine for iid in chunks[k]]
        groups = [k for k in mine for _ in chunks[k]]
        prog = Progress(len(order), sum(len(todo[i]) for i in order), tag, quiet=args.quiet)
        stop_after = int(os.environ.get("MAL_LABEL_STOP_AFTER", "0"))  # test hook: simulate a kill
        n_written = 0
        for k, res in label_stream(
                nets, [images[i] for i in order], {i: todo[i] for i in order}, args.images, device=device,
                groups=groups, expand=args.expand, thr=args.thr, flip=args.flip, crf_iters=args.crf_iters,
                crf_size=args.crf_size, crf_zeta=args.crf_zeta, crf_omega=args.crf_omega, crf_unary=args.crf_unary,
                batch_size=args.batch_size, workers=args.workers, threads=args.threads, progress=prog):
            write_json(chunk_path(parts, k), {"chunk": k, "results": {str(a): r for a, r in sorted(res.items())}})
            n_written += 1
            if stop_after and n_written >= stop_after:
                print(f"label.py: MAL_LABEL_STOP_AFTER={stop_after}: exiting hard", file=sys.stderr, flush=True)
                os._exit(75)
        prog.update(force=True)
    barrier(world)
    if rank != 0:
        return 0

    # Merge (rank 0): every chunk must be there; every kept annotation ends up in the output.
    results = {}
    for k in range(len(chunks)):
        p = chunk_path(parts, k)
        if not os.path.exists(p):
            raise SystemExit(f"label.py: {p} missing after all ranks finished (a rank failed?); rerun to resume")
        with open(p) as f:
            results.update({int(a): r for a, r in json.load(f)["results"].items()})
    for aid, why in inp["problems"].items():
        results[aid] = {"reason": why}
    missing = [a["id"] for a in inp["anns"] if a["id"] not in results]
    if missing:
        raise SystemExit(f"label.py: internal error: annotations {missing[:10]} got no result")
    out = apply_labels(inp["out"], inp["anns"], results, args.unlabeled_as)
    unlabeled, given = [], collections.Counter()
    for a in out["annotations"]:
        if "reason" in results[a["id"]]:
            u = {"id": a["id"], "image_id": a["image_id"], "reason": results[a["id"]]["reason"]}
            if args.unlabeled_as == "box":  # the mask it got instead of MAL's
                u["mask"] = ("none: image size unknown" if "segmentation" not in a
                             else "filled box" if a["area"] else "empty")
                given[u["mask"]] += 1
            unlabeled.append(u)
    empty = [a["id"] for a in out["annotations"]
             if a.get("area") == 0 and "segmentation" in a and "reason" not in results[a["id"]]]
    n_boxes, n_labelable = len(inp["anns"]), len(inp["anns"]) - len(inp["problems"])
    n_lab = n_boxes - len(unlabeled)
    summary = {"input": args.json, "boxes": n_boxes, "labelable": n_labelable, "labeled": n_lab,
               "unlabeled": len(unlabeled), "empty_masks": len(empty), "filtered_by_score": inp["n_filtered"]}
    if given:
        summary["unlabeled_masks"] = dict(given)
    write_json(args.out, out)
    review = review_list(out)
    write_json(_side(args.out, ".review.json"), review)
    report_path = _side(args.out, ".report.json")
    write_json(report_path, {"summary": summary, "unlabeled": unlabeled, "empty_masks": empty})
    if not args.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    if args.eval:
        if inp["gt"] is None:
            print("label.py: --eval: no GT masks in the input; skipped", file=sys.stderr)
        else:
            r = evaluate(inp["gt"], out, match_ids=inp["kind"] == "instances")
            net = load_nets(args.ckpt, "task", device)[0][0]
            r["clustering_score"], r["clustering_tokens"] = clustering(net, inp["gt"], args.images, device)
            write_json(_side(args.out, ".eval.json"), r)
            print(format_eval(r))
            print(f"clustering score (Eq. 6) of the task network's encoder on the GT boxes: "
                  f"{r['clustering_score']:.4f} over {r['clustering_tokens']} tokens (lower: FG and BG apart)",
                  flush=True)  # before the summary line, which ends the output
    if args.vis:
        vis_dir = args.vis_dir or _side(args.out, ".vis")
        n = len(write_overlays(out, args.images, vis_dir, args.vis))
        print(f"label.py: {n} overlays in {vis_dir}", file=sys.stderr)
    if args.review:
        review_dir = _side(args.out, ".review")
        n = len(write_review(out, review, args.images, review_dir, args.review))
        print(f"label.py: the {n} lowest-scored masks in {review_dir} (all {len(review)} by mask_score in "
              f"{_side(args.out, '.review.json')})", file=sys.stderr)
    # Last, so that the unlabeled count ends the output. Labelable: the boxes that passed the box checks
    # (the progress lines' total); those of them whose image then failed are unlabeled too.
    print(f"label.py: wrote {args.out}: {n_boxes} boxes ({n_labelable} labelable): {n_lab} labeled "
          f"({len(empty)} empty masks), {len(unlabeled)} unlabeled"
          + (f" (masks: {', '.join(f'{c} {k}' for k, c in given.items())})" if given else "")
          + (f", reasons in {report_path}" if unlabeled else "")
          + (f"; {inp['n_filtered']} below --score-thr dropped" if inp["n_filtered"] else "")
          + f"; {time.time() - t0:.1f}s" + ("; --strict: exit status 3" if args.strict and unlabeled else ""),
          file=sys.stderr, flush=True)
    return len(unlabeled)


def _side(out, suffix):
    """labels.json -> labels<suffix> (e.g. labels.report.json)."""
    return (out[:-5] if out.endswith(".json") else out) + suffix


if __name__ == "__main__":
    main()
