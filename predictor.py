"""The inference engine: a trained checkpoint's networks, and masks with their scores for boxes.
label.py, train.py's validation and the Python API all label through it.
"""
import collections
import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import coco
import data
import mal
import objective
import recipes
import util


def load_checkpoint(path, mmap=False):
    """A train.py checkpoint (a dict, weights only); InputError naming the file when it is not one."""
    ck = util.load_checkpoint(path, "checkpoint", mmap=mmap)
    util.need_keys(ck, ("model_args", "task"), path, "train.py checkpoint")
    return ck


def load_encoder(path):
    """A pretrained encoder (label.py --encoder: a file, or a public encoder's name, downloaded once) in
    a checkpoint's place: its weights, which label through BoxPrompted, and BoxPrompted's label
    settings (recipes.BOX_PROMPTED_LABEL)."""
    path = util.pretrained_file(path)
    enc, _ = mal.read_pretrained(path)
    return {"encoder": enc, "encoder_arch": mal.pretrained_arch(enc, path), "encoder_file": path,
            "label_settings": dataclasses.asdict(recipes.BOX_PROMPTED_LABEL)}


class BoxPrompted(torch.nn.Module):
    """Masks from a pretrained encoder's features and the box alone, with no training: a patch is
    foreground as far as its features are closer (cosine) to the foreground's mean than to the mean of
    the patches outside the box. The foreground starts as the patches near the box's centre and is
    re-estimated from the mask `rounds` times; `prior` favours the inscribed ellipse a little.
    Pretrained ViTs group an object's patches together (the paper's premise, §4.6): on photos this
    beats the CPU recipe trained on the same boxes (QUALITY.md). forward(x normalised [B,3,S,S],
    box_mask [B,S,S]) -> logits [B,S/p,S/p]."""

    def __init__(self, encoder, rounds=3, prior=0.1, temperature=20.0, core=0.3):
        super().__init__()
        self.encoder, self.rounds, self.prior = encoder, rounds, prior
        self.temperature, self.core = temperature, core

    def forward(self, x, box_mask):
        f = F.normalize(self.encoder(x).float(), dim=1)  # [B,C,h,w]
        h, w = f.shape[-2:]
        f = f.flatten(2)
        inside = F.adaptive_avg_pool2d(box_mask[:, None].float(), (h, w)).flatten(1)  # share in the box
        # r: each patch centre's squared radius in the box's frame, 1 on the inscribed ellipse
        r = 0
        for axis, n in ((-2, h), (-1, w)):
            on = box_mask.any(dim=-1 if axis == -2 else -2).float()  # [B,S]: rows (columns) the box spans
            S = on.shape[1]
            at = torch.arange(S, device=x.device, dtype=torch.float32) + 0.5
            span = on.sum(1).clamp_min(1)
            centre, half = (on * at).sum(1) / span, span / 2
            patch = (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) * S / n
            d = ((patch[None] - centre[:, None]) / half[:, None]) ** 2  # [B,n]
            r = r + (d[:, :, None] if axis == -2 else d[:, None, :])
        r = r.flatten(1)
        bg = F.normalize((f * (inside < 0.01)[:, None]).sum(2), dim=1)  # zero where no patch is outside
        prior = self.prior * (1 - r).clamp(-1, 1)
        weight = (r <= self.core).float()
        for _ in range(self.rounds + 1):
            fg = F.normalize((f * weight[:, None]).sum(2), dim=1)
            s = torch.einsum("bcn,bc->bn", f, fg - bg) + prior
            weight = torch.sigmoid(self.temperature * s) * (inside > 0.5)
        return (self.temperature * s).view(-1, h, w)


# The crop size BoxPrompted labels at: 16 × 16 patches of 14 px.
BOX_PROMPTED_SIZE = 224

# LabelSettings.net: whose masks
NETS = {"task": ("task",), "teacher": ("teacher",), "avg": ("task", "teacher")}


def build_nets(ck, net, device, path="checkpoint"):
    """The network(s) of a loaded checkpoint that label for `net` (one of NETS), in eval mode on device;
    for load_encoder's, its BoxPrompted (it has no networks of its own)."""
    if "encoder" in ck:
        a = ck["encoder_arch"]
        encoder = mal.vit(a["arch"], a["patch_size"], img_size=BOX_PROMPTED_SIZE, depth=a["depth"])
        mal.load_pretrained(encoder, ck["encoder_file"], (dict(ck["encoder"]), {}))
        return [BoxPrompted(encoder).eval().to(device)]
    nets = []
    for k in NETS[net]:
        util.need_keys(ck, (k,), path, "train.py checkpoint")
        try:
            m = mal.MAL(**ck["model_args"])
            m.load_state_dict(ck[k])
        except Exception as e:  # model_args or weights that do not fit this mal.py
            raise util.InputError(f"{path}: cannot build the {k!r} network "
                                  f"({' '.join(str(e).split())[:300]})") from None
        nets.append(m.eval().to(device))
    return nets


def input_size(nets):
    """The crop size S the network(s) were built for."""
    n = nets[0]
    n = getattr(n, "module", n)  # DDP
    n = getattr(n, "_orig_mod", n)  # torch.compile
    enc = getattr(n, "encoder", None)
    if enc is not None:  # a MAL: its position grid × patch size
        return int(round(math.sqrt(enc.pos_embed.shape[1] - 1))) * enc.patch_size
    return int(getattr(n, "img_size"))


MASK_SCORE = ("(1 - mean |max p - crosses box| over row and column bags) * mean |2p - 1| in box, of the "
              "network's p; * mean |2q - 1| in box of the CRF-refined q where refined")


def _confidence(prob, box_mask):
    """The mean |2p − 1| inside the box."""
    return ((2 * prob - 1).abs() * box_mask).flatten(1).sum(1) / box_mask.flatten(1).sum(1).clamp_min(1)


def mask_score(prob, box_mask, refined=None, refined_box=None):
    """An estimate of each mask's IoU with its object, in [0, 1], from the network's own probabilities
    prob [B,h,w] and the box box_mask [B,h,w] (1 inside) of its crop: MIL consistency × confidence,
    × the confidence of the CRF's refinement refined [B,h',w'] (box refined_box) where there is one.

    MIL consistency: Eq. 2's bags, the rows and columns of the crop, should hold foreground (their max
    p) iff they cross the box; it is 1 − the mean |max p − crosses| over the rows, averaged with the
    same over the columns. A mask that misses part of the object, or spills over the box, loses it.
    Confidence: the mean |2p − 1| inside the box, low where the network hesitates; after the
    refinement it is also low where the image's colours pull the mask away from the network's.
    Measured against the true IoU on every quality set (QUALITY.md), the refined confidence finds
    more of the bad masks (IoU < 0.5) among the lowest-scored 10% on the photos (21% against 18%),
    as many on the others, and ranks every set as well or better (Spearman); the teacher's or the
    flipped crop's agreement, the mask's holes, pieces or mass on the box's edge or
    outside it, and the refinement in place of the network's confidence each lost on some set."""
    rows = (prob.amax(2) - box_mask.amax(2)).abs().mean(1)
    cols = (prob.amax(1) - box_mask.amax(1)).abs().mean(1)
    score = (1 - (rows + cols) / 2) * _confidence(prob, box_mask)
    if refined is not None:
        score = score * _confidence(refined, refined_box)
    return score.clamp(0, 1)


@torch.inference_mode()
def predict(nets, crops, box_masks, device, *, flip=False, crf_iters=0, crf_size=128, zeta=0.5, omega=2.0,
            tau=1.0, score_size=None):
    """uint8 crops [B,3,S,S] and box masks [B,S,S] (pinned, on CPU) -> (mask probabilities [B,h,w],
    mask_score [B]), float32 on `device`. The mean of sigmoid(logits) over the nets (and their horizontal
    flips), optionally CRF-refined (crf_iters > 0: the mean field with ζ, ω and the unary weight τ of
    objective.weak_unary, at crf_size); mask_score from the network's probabilities (at its own
    resolution, or resampled to score_size: scores of networks with other output grids compare there)
    and the refined ones. A net is any callable: normalised float [B,3,S,S] -> logits [B,h,w] (tests
    inject oracles)."""
    x = data.normalize(crops.to(device, non_blocking=True))
    bm = box_masks.to(device, non_blocking=True).float()
    if flip:  # one forward over [x; flip(x)]: bigger batches are cheaper than two calls
        x = torch.cat([x, x.flip(-1)])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        probs = [(net(x, torch.cat([bm, bm.flip(-1)]) if flip else bm) if isinstance(net, BoxPrompted)
                  else net(x)).float().sigmoid() for net in nets]
    prob = torch.stack(probs).mean(0)
    if flip:
        B = crops.shape[0]
        prob = (prob[:B] + prob[B:].flip(-1)) / 2
    net_prob = prob if score_size is None else F.interpolate(prob[:, None], size=(score_size, score_size),
                                                             mode="bilinear", align_corners=False)[:, 0]
    net_bm = F.adaptive_max_pool2d(bm[:, None], net_prob.shape[-2:])[:, 0]
    if not crf_iters:
        return prob, mask_score(net_prob, net_bm)
    # The CRF sees the crop as in training: image area-down, box max-pooled to crf_size.
    img, bm = mal.crop_to_loss_size(x[:crops.shape[0]].float(), bm, crf_size)
    prob = F.interpolate(prob[:, None], size=(crf_size, crf_size), mode="bilinear", align_corners=False)[:, 0]
    prob = mal.refine(img, objective.weak_unary(prob, tau), bm, iters=crf_iters, zeta=zeta, omega=omega)
    return prob, mask_score(net_prob, net_bm, prob, bm)


def _paste_batch(prob, score, event, metas, thr):
    """Runs on a worker thread: wait for the device->host copy, then paste and RLE-encode each crop."""
    if event is not None:
        event.synchronize()
    out = {}
    for p, s, (ann_id, crop_box, box, H, W) in zip(prob, score.tolist(), metas):
        ya, xa, region = coco.paste_region(p, crop_box, H, W, thr, box)
        # 4 decimals: an estimate needs no more, and the last float bits may differ between batchings.
        out[ann_id] = {"segmentation": coco.encode_region(ya, xa, region, H, W), "area": int(region.sum()),
                       "mask_score": round(s, 4)}
    return out


def _as_is(item):
    """The loader's collate_fn: an ImageCrops holds tensors already (default_convert would walk it)."""
    return item


class _Group(NamedTuple):
    key: object
    results: dict  # {ann_id: {'reason'}} for the boxes without a crop; the pastes add the others
    pastes: list  # futures of _paste_batch


class LabelStream:
    """Labels the boxes `todo` {image_id: [ann, ...]} (read with get() only, one image at a time, so it
    may be coco.BoxesByImage) of `images` (image dicts, a sequence in this order) with
    `nets` (any callables: normalised float [B,3,S,S] -> logits [B,h,w]) and a LabelSettings.

    run() yields (group, {ann_id: {'segmentation', 'area', 'mask_score'} or {'reason'}}) as each
    group of images completes; groups: a key per image (default: one group), the images of a group
    consecutive. Crop batches never span groups, so a group's masks do not depend on which rank or
    run labels it. The forward passes run here; pasting and RLE-encoding run on `threads` threads
    while the next batches are predicted. stop: a function asked after each image; when it is true,
    run() yields what is done (the open group's boxes whose batch has run: all but less than a batch,
    its key then in self.partial) and ends."""

    def __init__(self, nets, settings, device, *, size=None, batch_size=32, threads=4, progress=None,
                 score_size=None):
        self.nets = nets if isinstance(nets, (list, tuple)) else [nets]
        self.settings, self.device, self.score_size = settings, torch.device(device), score_size
        self.size, self.batch_size, self.threads, self.progress = (size or input_size(self.nets), batch_size,
                                                                   threads, progress)

    def run(self, images, todo, image_dir, groups=None, workers=0, stop=None):
        groups = groups if groups is not None else [0] * len(images)
        self.partial = None
        ds = data.ImageBoxes(images, todo, image_dir, self.size, expand=self.settings.expand)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=4 if workers else None, collate_fn=_as_is)
        self._pool = ThreadPoolExecutor(max(1, self.threads))
        self._buf = []  # (crop [3,S,S] u8, box mask [S,S], meta) waiting for a full batch
        self._finished = collections.deque()  # groups whose pastes may still be running
        group = None
        try:
            for i, item in enumerate(loader):
                if i == 0 or groups[i] != group.key:
                    if i:
                        self._close(group)
                        yield from self._ready(block=False)
                    group = _Group(groups[i], {}, [])
                self._add_image(images[i], item, todo, group)
                yield from self._ready(block=False)
                if stop is not None and stop():
                    self._buf.clear()  # crops not yet in a batch: less than one
                    self._finished.append(group)
                    self.partial, group = group.key, None
                    break
            if group is not None:
                self._close(group)
            yield from self._ready(block=True)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _add_image(self, im, item, todo, group):
        if item.image_id != im["id"]:
            raise RuntimeError(f"data order mismatch at image {im['id']}")
        ids = [int(a) for a in item.ann_ids]
        bad = {int(a): why for a, why in item.bad}
        box_of = {a["id"]: coco.xywh_to_xyxy(a["bbox"]) for a in todo.get(im["id"], [])}
        failed = [aid for aid in box_of if aid not in ids]
        for aid in failed:  # every box without a crop gets its reason, never silence
            group.results[aid] = {"reason": bad.get(aid) or item.error or "no crop produced"}
        if ids:  # only a decoded image has crops; a failed one may have no size at all (JSON w/h optional)
            H, W = int(item.height), int(item.width)  # the decoded size (== the JSON's, else error)
        for j, aid in enumerate(ids):
            cb = tuple(float(v) for v in item.crop_boxes[j])
            self._buf.append((item.crops[j], item.box_masks[j], (aid, cb, box_of[aid], H, W)))
        while len(self._buf) >= self.batch_size:
            self._run_batch(self._buf[:self.batch_size], group)
            del self._buf[:self.batch_size]
        if self.progress:
            self.progress.update(images=1, unlabeled=len(failed))

    def _run_batch(self, items, group):
        cuda, S = self.device.type == "cuda", self.size
        crops = torch.empty((len(items), 3, S, S), dtype=torch.uint8, pin_memory=cuda)
        torch.stack([it[0] for it in items], out=crops)
        bms = torch.empty((len(items), S, S), dtype=torch.bool, pin_memory=cuda)
        torch.stack([it[1] for it in items], out=bms)
        prob, score = predict(self.nets, crops, bms, self.device, **self.settings.predict_kw(),
                              score_size=self.score_size)
        if cuda:  # async copy into pinned memory; the paste thread waits on the event, not us
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (prob, score)]
            for h, t in zip(host, (prob, score)):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = (prob, score), None
        group.pastes.append(self._pool.submit(_paste_batch, *host, event, [it[2] for it in items],
                                              self.settings.thr))
        if self.progress:
            self.progress.update(labeled=len(items))

    def _close(self, group):
        while self._buf:
            self._run_batch(self._buf[:self.batch_size], group)
            del self._buf[:self.batch_size]
        self._finished.append(group)

    def _ready(self, block):
        while self._finished and (block or all(f.done() for f in self._finished[0].pastes)):
            group = self._finished.popleft()
            for f in group.pastes:
                group.results.update(f.result())
            yield group.key, group.results


def label_dataset(nets, images, todo, image_dir, device, settings, workers=0, **kw):
    """Label everything in one go: {ann_id: {'segmentation', 'area', 'mask_score'} or {'reason'}}
    (LabelStream; kw: its options)."""
    res = {}
    for _, r in LabelStream(nets, settings, device, **kw).run(images, todo, image_dir, workers=workers):
        res.update(r)
    return res


class Predictor:
    """Masks for boxes from Python, through the same engine as label.py (the same crops, batches
    of the same forward and CRF, the same pasting), so the two give the same masks:

        p = predictor.Predictor("runs/mine/last.pt")       # once: the networks and the checkpoint's settings
        # or Predictor(encoder="dinov2_vits14"): no training, BoxPrompted on a pretrained encoder
        masks, scores = p.predict(image, boxes)             # H×W×3 uint8 array or PIL image; N×4 boxes, xyxy
        # masks: N booleans masks [N, H, W] at the image's size; scores: mask_score [N] (an IoU estimate)

    Settings (recipes.LabelSettings fields, e.g. thr=0.4, expand=0.2, flip=True, crf_refine=False)
    override the checkpoint's, as label.py's flags do. device: auto (CUDA if there is one), cpu, cuda."""

    def __init__(self, ckpt=None, device="auto", batch_size=32, encoder=None, **settings):
        if (ckpt is None) == (encoder is None):
            raise TypeError("Predictor: a checkpoint or a pretrained encoder's file (encoder=), one of them")
        ck = load_checkpoint(ckpt) if encoder is None else load_encoder(encoder)
        unknown = set(settings) - {f.name for f in dataclasses.fields(recipes.LabelSettings)}
        if unknown:
            raise TypeError(f"unknown label settings {sorted(unknown)}; see recipes.LabelSettings")
        self.settings = dataclasses.replace(recipes.checkpoint_settings(ck)[0], **settings)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                                   else device)
        self.nets = build_nets(ck, self.settings.net, self.device, ckpt)
        self.size, self.batch_size = input_size(self.nets), batch_size

    def predict(self, image, boxes):
        """(masks bool [N,H,W], scores float32 [N]) for boxes [N,4] (x0, y0, x1, y1 in pixels, COCO's
        bbox is x, y, w, h) on image; a box that covers no pixel of the image is an InputError."""
        img = image.convert("RGB") if isinstance(image, Image.Image) else _as_image(image)
        W, H = img.size
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise util.InputError(f"boxes: an N×4 array of x0, y0, x1, y1 is needed, not shape {boxes.shape}")
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            problem = coco.xywh_problem(x0, y0, x1 - x0, y1 - y0, W, H)
            if problem:
                raise util.InputError(f"boxes[{i}] = {boxes[i].tolist()}: {problem[1]}")
        xyxy = [tuple(float(v) for v in b) for b in boxes]
        crops, box_masks, crop_boxes = data.box_crops(img, xyxy, self.size, self.settings.expand)
        masks, scores = np.zeros((len(boxes), H, W), dtype=bool), np.zeros(len(boxes), dtype=np.float32)
        for a in range(0, len(boxes), self.batch_size):
            b = slice(a, a + self.batch_size)
            prob, score = predict(self.nets, crops[b], box_masks[b], self.device,
                                  **self.settings.predict_kw())
            for k, p in enumerate(prob.cpu(), a):
                ya, xa, region = coco.paste_region(p, tuple(crop_boxes[k].tolist()), H, W, self.settings.thr,
                                                   xyxy[k])
                masks[k, ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
            scores[b] = score.cpu().numpy()
        return masks, scores


def _as_image(a):
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise util.InputError(f"image: an H×W×3 uint8 array or a PIL image is needed, "
                              f"not {a.dtype} {a.shape}")
    return Image.fromarray(a)
