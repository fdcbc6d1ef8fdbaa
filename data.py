"""Data for MAL: image loading, RoI crops (§3.1), augmentation (§4.2) and datasets.

Read top to bottom:
  normalize, load_rgb ........ ImageNet normalisation (on the GPU), robust RGB decoding
  roi_crop ................... §3.1 crop of an expanded box + the box mask in crop coordinates
  BoxDataset, collate_boxes .. training: one sample = one box of a COCO instances JSON
  ImageBoxes, collate_images . labeling: one item = one image with all its boxes

Coordinates: boxes are xyxy float pixels, pixel (i, j) covers [j, j+1) x [i, i+1), its centre is
(j + 0.5, i + 0.5). COCO's bbox is xywh and is converted on reading.
"""
import argparse
import math
import os
import sys
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageStat

import coco
import mal
import options
import recipes
import util

# ----------------------------------------------------------------------------------------------
# Normalisation. The loader ships uint8 (4x fewer host->device bytes); the GPU normalises. ImageNet's
# mean/std is also what every encoder mal.load_pretrained reads (MAE, DeiT, DeiT III, DINOv2) was
# trained with.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def normalize(x):
    """uint8 (or float in 0..255) images [..., 3, H, W] -> float, ImageNet mean/std, on x's device."""
    if not torch.is_floating_point(x):
        x = x.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(3, 1, 1) * 255
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Decoding. EXIF orientation is deliberately NOT applied: COCO boxes refer to the pixels as stored
# in the file (COCO's width/height are the stored size), so rotating would misalign every box.


class ImageError(Exception):
    """An image that cannot be used; str(e) is one line: "<path>: <reason>"."""


def _to_uint8_range(a, mode):
    """High-bit-depth pixels -> 0..255 floats. Fixed ranges where the data fits one (so that all
    images of a dataset look alike), a per-image min-max stretch only for unknown ranges."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros_like(a)
    lo, hi = a[finite].min(), a[finite].max()
    a = np.where(finite, a, lo)
    if mode == "F" and lo >= 0 and hi <= 1:
        return a * 255.0  # float image in 0..1
    if lo >= 0 and hi <= 255:
        return a  # 8-bit data in a wide container
    if lo >= 0 and hi <= 65535:
        return a / 257.0  # 16-bit data: full 16-bit range -> 0..255
    return (a - lo) * (255.0 / (hi - lo))  # unknown range: stretch


def _to_rgb(im):
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        g = _to_uint8_range(np.asarray(im), im.mode)
        return Image.fromarray(np.round(g).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # then alpha is dropped (stored colours kept), as COCO has none
    return im.convert("RGB")  # L, 1, P, RGBA, CMYK, YCbCr, ...


def load_rgb(path):
    """Decode an image file fully into an RGB PIL image; raises ImageError on any failure."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try: a truncated file fails here, not later
            return _to_rgb(im)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (corrupt or unknown format)") from None
    except Exception as e:  # truncated data, decoder errors, unsupported modes, bombs:
        msg = " ".join(str(e).split())  # Pillow's words after ours
        raise ImageError(f"{path}: not a readable image "
                         f"({type(e).__name__}{': ' + msg if msg else ''})") from None


# ----------------------------------------------------------------------------------------------
# §3.1 RoI input: crop the expanded box b', resize it to size x size; the box b as a mask.
#
# Mapping (no flip): crop pixel (u, v) has its centre at image coordinates
#     x = x0 + (u + 0.5) * (x1 - x0) / size,      y = y0 + (v + 0.5) * (y1 - y0) / size
# where (x0, y0, x1, y1) is the crop box actually used (crop_used). Inverse (for pasting back):
#     u = (x - x0) * size / (x1 - x0) - 0.5.
# This is exactly PIL's resize(box=...) convention, so the resampled pixels and the mask agree.


def crop_to_image(u, crop, size):
    """Crop pixel index (u along x, or v along y with the y entries) -> image coordinate."""
    x0, _, x1, _ = crop
    return x0 + (u + 0.5) * (x1 - x0) / size


def image_to_crop(x, crop, size):
    """Inverse of crop_to_image: image x coordinate -> fractional crop pixel index."""
    x0, _, x1, _ = crop
    return (x - x0) * size / (x1 - x0) - 0.5


def _clamp_interval(a, b, length, min_side=1.0):
    """Intersect [a, b] with [0, length]; keep at least min_side (or the whole image if smaller)."""
    a, b = max(a, 0.0), min(b, float(length))
    if b - a < min_side:
        side = min(min_side, float(length))
        c = min(max((a + b) / 2, side / 2), length - side / 2)
        a, b = c - side / 2, c + side / 2
    return a, b


def pad_crop(crop_xyxy, width, height, size):
    """The expanded crop box as a size x size crop samples it. Where it leaves the image the crop is
    padded (see roi_crop) by whole crop pixels: those sides move by under half a pixel so that the
    image's edge falls on a pixel boundary. The mapping above holds for the returned box."""
    x0, y0, x1, y1 = (float(v) for v in crop_xyxy)
    x0, x1 = _pad_interval(x0, x1, width, size)
    y0, y1 = _pad_interval(y0, y1, height, size)
    return (x0, y0, x1, y1)


def _pad_interval(a, b, length, size):
    """pad_crop along one axis: [a, b] over `size` pixels -> [a', b'] with whole pixels outside
    [0, length]."""
    ia, ib = _clamp_interval(a, b, length)  # the part inside the image, at least 1 px
    step = (b - a) / size
    before = min(max(round((ia - a) / step), 0), size - 1)
    after = min(max(round((b - ib) / step), 0), size - 1 - before)
    step = (ib - ia) / (size - before - after)
    return ia - before * step, ib + after * step


def _axis_mask(lo, hi, c0, c1, size):
    """Crop pixels along one axis whose centres fall in [lo, hi]; at least the nearest one."""
    centres = c0 + (torch.arange(size, dtype=torch.float64) + 0.5) * ((c1 - c0) / size)
    m = (centres >= lo) & (centres <= hi)
    if not m.any():  # box thinner than a crop pixel: mark the pixel holding its centre
        k = int((((lo + hi) / 2 - c0) / (c1 - c0)) * size)
        m[min(max(k, 0), size - 1)] = True
    return m


def box_mask_in_crop(box_xyxy, crop_xyxy, size):
    """The box rasterised in crop pixels: 1 where the pixel centre is inside the box. [size, size]."""
    bx0, by0, bx1, by1 = (float(v) for v in box_xyxy)
    x0, y0, x1, y1 = crop_xyxy
    mx = _axis_mask(bx0, bx1, x0, x1, size)
    my = _axis_mask(by0, by1, y0, y1, size)
    return (my[:, None] & mx[None, :]).float()


def _pil_to_tensor(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# Outside the image the crop is the mean colour, which the network sees as 0 after normalize().
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)


def _crop_pil(img, crop_used, size):
    # Crop and resize in one call; PIL's bilinear filter widens its support when shrinking,
    # so downscaled crops are antialiased. Where crop_used leaves the image (pad_crop), the part
    # inside is resized onto its whole crop pixels of a canvas in the pad colour (masks: 0).
    x0, y0, x1, y1 = crop_used
    W, H = img.size
    if x0 >= 0 and y0 >= 0 and x1 <= W and y1 <= H:
        return img.resize((size, size), Image.BILINEAR, box=crop_used)
    left, top = round(max(-x0, 0) * size / (x1 - x0)), round(max(-y0, 0) * size / (y1 - y0))
    right, bottom = round(max(x1 - W, 0) * size / (x1 - x0)), round(max(y1 - H, 0) * size / (y1 - y0))
    canvas = Image.new(img.mode, (size, size), PAD_RGB if img.mode == "RGB" else 0)
    inside = img.resize((size - left - right, size - top - bottom), Image.BILINEAR,
                        box=(max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)))
    canvas.paste(inside, (left, top))
    return canvas


def roi_crop(img, box_xyxy, crop_xyxy, size):
    """§3.1: crop `crop_xyxy` (the expanded box) from `img` and resize it to size x size.

    Where the expanded box leaves the image the crop is padded with the mean colour (pad_crop), not
    clamped to the image: clamping would put a box at the image's edge against the crop's edge,
    where the network otherwise sees only neighbours cut off by the crop (background), and it drops
    the object's part there. The pad lies outside the box, so the losses hold it at background.
    Returns (crop uint8 [3,S,S], box_mask float [S,S], crop_used xyxy floats); see the mapping above.
    """
    crop_used = pad_crop(crop_xyxy, *img.size, size)
    crop = _pil_to_tensor(_crop_pil(img, crop_used, size))
    return crop, box_mask_in_crop(box_xyxy, crop_used, size), crop_used


# ----------------------------------------------------------------------------------------------
# §4.2 augmentation. Both networks see the same crop and flip; only the task network gets colour
# jitter, random greyscale and Gaussian blur. Jitter + greyscale are all affine colour maps, so
# they are folded into one 3x3 matrix + offset and applied by PIL in a single uint8 pass.

_GREY = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)

# Colour-jitter strengths (torchvision ColorJitter conventions) and probabilities.
JITTER = dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
P_GREY, P_BLUR, BLUR_SIGMA = 0.2, 0.5, (0.1, 2.0)


def _colour_affine(u, mean_rgb):
    """Random colour map from 6 uniforms u (jitter?, b, c, s, h, grey?) as PIL's 12-tuple
    convert matrix (rows: 3 weights + offset); None when the draw is the identity."""
    ident = torch.eye(3, dtype=torch.float64)
    ones = torch.ones(3, 1, dtype=torch.float64)
    A, off = ident.clone(), torch.zeros(3, dtype=torch.float64)
    if u[0] < JITTER["p"]:
        b = 1 + JITTER["brightness"] * (2 * u[1] - 1)
        c = 1 + JITTER["contrast"] * (2 * u[2] - 1)
        s = 1 + JITTER["saturation"] * (2 * u[3] - 1)
        h = JITTER["hue"] * (2 * u[4] - 1) * 2 * math.pi  # rotation of the chroma plane (YIQ)
        A = b * A  # brightness
        mean_grey = float(_GREY @ torch.as_tensor(mean_rgb, dtype=torch.float64)) * b
        A, off = c * A, torch.full((3,), (1 - c) * mean_grey, dtype=torch.float64)  # contrast
        A = (s * ident + (1 - s) * ones @ _GREY[None]) @ A  # saturation (keeps grey, off unchanged)
        rot = torch.tensor([[1, 0, 0], [0, math.cos(h), -math.sin(h)], [0, math.sin(h), math.cos(h)]],
                           dtype=torch.float64)
        A = _YIQ_INV @ rot @ _YIQ @ A  # hue (grey has no chroma: off unchanged)
    if u[5] < P_GREY:
        A = ones @ _GREY[None] @ A  # greyscale, 3 equal channels
    if torch.equal(A, ident):
        return None
    return tuple(torch.cat([A, off[:, None]], 1).flatten().tolist())


def _blurred_crop(img, crop_used, size, sigma):
    """The crop with a Gaussian blur of `sigma` OUTPUT pixels. When the crop is upscaled (the usual
    case) the blur is done on the smaller source region with sigma scaled per axis, then resized:
    the same blur at a fraction of the cost of blurring size x size pixels."""
    x0, y0, x1, y1 = crop_used
    sx, sy = (x1 - x0) / size, (y1 - y0) / size  # source pixels per output pixel
    if sx * sy >= 1:
        return _crop_pil(img, crop_used, size).filter(ImageFilter.GaussianBlur(sigma))
    m = int(math.ceil(3 * sigma * max(sx, sy))) + 2  # margin so the blur sees real neighbours
    X0, Y0 = max(int(math.floor(x0)) - m, 0), max(int(math.floor(y0)) - m, 0)
    X1, Y1 = min(int(math.ceil(x1)) + m, img.size[0]), min(int(math.ceil(y1)) + m, img.size[1])
    region = img.crop((X0, Y0, X1, Y1)).filter(ImageFilter.GaussianBlur((sigma * sx, sigma * sy)))
    return _crop_pil(region, (x0 - X0, y0 - Y0, x1 - X0, y1 - Y0), size)


# ----------------------------------------------------------------------------------------------
# Box reading shared by both datasets.


def _clip_box(box, width, height):
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
            min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def _sample_seed(*keys):
    """A 63-bit seed from integer keys (seed, epoch, index): independent of workers and order."""
    ss = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])
    return int(ss.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


class BoxDataset(torch.utils.data.Dataset):
    """Training set of MAL: one sample = one box of a COCO-format instances JSON (class-agnostic).

    Only `bbox` is read (annotations need no `segmentation`). Boxes are skipped, and counted in
    `self.skipped`, when: the image entry is missing, iscrowd, non-finite or w<=0/h<=0
    ("degenerate"), not overlapping the image, or w*h < min_area (the public recipe uses
    recipes.MIN_AREA = 2048).

    Sample dict: image (uint8 [3,S,S], task-network input: flip + jitter/grey/blur),
    teacher_image (uint8 [3,S,S], same crop and flip, no colour augmentation), box_mask (float [S,S]),
    valid (bool), ann_id, image_id, index (ints), crop_box (float64 [4], the crop (pad_crop) in image
    coordinates), flipped (bool: image, teacher_image and box_mask are mirrored; u -> S-1-u).

    Randomness: train mode draws the §3.1 expansion (mal.expand_box), flip and augmentation from a
    generator seeded by (seed, epoch, index): samples do not depend on num_workers or order. Call
    set_epoch(e) before creating each epoch's iterator (not compatible with persistent_workers:
    workers keep the dataset copy they were created with). Eval mode (train=False):
    mal.expand_box_fixed(box, expand), no flip, no augmentation; image IS teacher_image (same tensor).

    Unreadable images are only discovered in __getitem__, which never raises for them: it prints
    "data.py: skipping unusable image <path>: <reason>" to stderr once per file (per worker process;
    report=False leaves that to the caller), records it in `self.bad_images` {path: reason} and
    `self.n_invalid`, and returns a sample with valid=False (zero tensors of the same shapes).
    These counters live in each worker; collate_boxes drops invalid samples and reports their
    number as batch['n_invalid'], which is what the training loop should sum.

    Decoding: a small per-process LRU cache holds the last `cache_size` decoded images, so boxes of
    one image read consecutively decode it once.

    gt_masks=True (train.py --gt-masks, the fully supervised upper bound) adds gt_mask (float [S,S]
    in [0, 1]): the annotation's segmentation cropped, resized and flipped exactly like the image.

    `self.areas` holds each kept box's annotation `area` (NaN where it has none), for COCO's size classes.
    """

    SKIP_REASONS = ("missing_image_entry", "iscrowd", "degenerate", "outside_image", "small_area")

    def __init__(self, ann_json, image_dir, size=512, train=True, min_area=0.0, theta=1.2, seed=0,
                 expand=0.2, color_aug=True, cache_size=4, check_size=True, gt_masks=False, report=True):
        self.index = (coco.index_of_dict(ann_json) if isinstance(ann_json, dict)
                      else coco.box_index(ann_json, what="COCO instances JSON", results=False))
        self.image_dir, self.size, self.train = os.fspath(image_dir), int(size), bool(train)
        self.min_area, self.theta, self.seed = float(min_area), float(theta), int(seed)
        self.expand = float(expand)
        self.color_aug, self.cache_size, self.check_size = bool(color_aug), int(cache_size), bool(check_size)
        self.gt_masks, self.report, self.epoch = bool(gt_masks), bool(report), 0

        # Per-image columns of the index: mapped from its file, not copied (forked workers and the
        # ranks of a node share the pages).
        ix = self.index
        self.image_ids, self.widths, self.heights = ix.img_id, ix.img_w, ix.img_h
        self.file_names = FileNames(ix)

        # The boxes kept: index rows, in input order; each skipped one counted under its first reason.
        code, w, h = ix.box_codes(), ix.bbox[:, 2], ix.bbox[:, 3]
        found = code != ix.NO_IMAGE
        crowd = found & (ix.ann_iscrowd != 0)
        left = found & ~crowd
        degenerate, outside = left & (code == ix.DEGENERATE), left & (code == ix.OUTSIDE)
        left &= ~degenerate & ~outside  # a box on no pixel centre still trains (clipped to the image)
        small = left & (w * h < self.min_area)
        left &= ~small
        self.skipped = dict(zip(self.SKIP_REASONS, (int(m.sum()) for m in (~found, crowd, degenerate, outside,
                                                                           small))))
        self.rows = np.flatnonzero(left)
        self.img_rows = ix.ann_img_row[self.rows]
        if self.gt_masks:
            bad = ((ix.ann_has_seg[self.rows] == 0) | (self.widths[self.img_rows] <= 0)
                   | (self.heights[self.img_rows] <= 0))
            if bad.any():
                raise util.InputError(f"annotation {ix.ann_id[self.rows[bad.argmax()]]}: training on GT "
                                      f"masks needs a segmentation and the image's width and height")

        self._cache = OrderedDict()  # path -> decoded RGB image (per process)
        self.bad_images = {}  # path -> reason (per process)
        self.n_invalid = 0  # invalid samples returned (per process)

    def __len__(self):
        return len(self.rows)

    @property
    def boxes(self):
        """The kept boxes, xyxy float64 [n, 4]."""
        b = self.index.bbox[self.rows]
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)

    @property
    def ann_ids(self):
        return self.index.ann_id[self.rows]

    @property
    def areas(self):
        """Each kept box's annotation `area` (NaN where it has none), for COCO's size classes."""
        return self.index.ann_area[self.rows]

    def _box(self, i):
        x, y, w, h = (float(v) for v in self.index.bbox[self.rows[i]])
        return x, y, x + w, y + h

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def describe(self, usable=None):
        """One line: the boxes kept, on how many images, and those skipped by reason. usable (bool per
        kept box): False for the boxes of images found unusable, which are then skipped as unusable_image."""
        skipped, rows = dict(self.skipped), self.img_rows
        if usable is not None:
            skipped["unusable_image"], rows = int((~usable).sum()), rows[usable]
        reasons = ", ".join(f"{r}={n}" for r, n in skipped.items() if n)
        return (f"{len(rows)} boxes on {len(np.unique(rows))} of {len(self.image_ids)} images"
                f" (min_area={self.min_area:g}); skipped {sum(skipped.values())}"
                + (f": {reasons}" if reasons else ""))

    def _image(self, k):
        """Decoded image of row k via the LRU cache; (img, None) or (None, reason)."""
        path = os.path.join(self.image_dir, str(self.file_names[k]))
        img = self._cache.get(path)
        if img is not None:
            self._cache.move_to_end(path)
            return img, None
        if path in self.bad_images:
            return None, self.bad_images[path]
        try:
            img = load_rgb(path)
            W, H = int(self.widths[k]), int(self.heights[k])
            if self.check_size and W > 0 and H > 0 and img.size != (W, H):
                raise ImageError(f"{path}: decoded size {img.size[0]}x{img.size[1]} != annotation {W}x{H}")
        except ImageError as e:
            self.bad_images[path] = str(e)
            if self.report:  # one plain line, not a Python warning with its source line
                print(f"data.py: skipping unusable image {e}", file=sys.stderr, flush=True)
            return None, str(e)
        if self.cache_size > 0:
            self._cache[path] = img
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return img, None

    def _invalid(self, i):
        S = self.size
        self.n_invalid += 1
        z = torch.zeros(3, S, S, dtype=torch.uint8)
        out = dict(image=z, teacher_image=z.clone(), box_mask=torch.zeros(S, S), valid=False,
                   ann_id=int(self.index.ann_id[self.rows[i]]),
                   image_id=int(self.image_ids[self.img_rows[i]]), index=i,
                   crop_box=torch.zeros(4, dtype=torch.float64), flipped=False)
        if self.gt_masks:
            out["gt_mask"] = torch.zeros(S, S)
        return out

    def _gt_mask(self, i, crop_used, flipped):
        """The GT mask of box i through the same crop, resize and flip as the image: float [S,S]."""
        from pycocotools import mask as mask_utils

        k = self.img_rows[i]
        rle = coco.segmentation_rle(self.index.annotation(self.rows[i])["segmentation"], int(self.heights[k]),
                                    int(self.widths[k]))
        rle = dict(rle, counts=(rle["counts"].encode("ascii") if isinstance(rle["counts"], str)
                                else rle["counts"]))
        m = Image.fromarray(mask_utils.decode(rle) * np.uint8(255), "L")
        m = _crop_pil(m, crop_used, self.size)
        if flipped:
            m = m.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(m, dtype=np.float32) / 255.0)

    def __getitem__(self, i):

        i = int(i)
        k = int(self.img_rows[i])
        img, _ = self._image(k)
        if img is None:
            return self._invalid(i)
        box = _clip_box(self._box(i), *img.size)
        if self.train:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, i))
            crop_box = mal.expand_box(box, self.theta, generator=g)  # §3.1 random expansion
            u = torch.rand(9, generator=g, dtype=torch.float64).tolist()
        else:
            crop_box = mal.expand_box_fixed(box, self.expand)
            u = [1.0] * 9  # no flip, no augmentation
        crop_used = pad_crop(crop_box, *img.size, self.size)
        crop_pil = _crop_pil(img, crop_used, self.size)
        mask = box_mask_in_crop(box, crop_used, self.size)
        flipped = u[0] < 0.5
        if flipped:  # §4.2 random flip, identical for both networks and the box mask
            crop_pil = crop_pil.transpose(Image.FLIP_LEFT_RIGHT)
            mask = mask.flip(-1)
        teacher = _pil_to_tensor(crop_pil)
        image = teacher
        if self.train and self.color_aug:  # task network only: blur, colour jitter, greyscale
            aug = crop_pil
            if u[1] < P_BLUR:
                sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[2]
                aug = _blurred_crop(img, crop_used, self.size, sigma)
                if flipped:
                    aug = aug.transpose(Image.FLIP_LEFT_RIGHT)
            matrix = _colour_affine(u[3:9], ImageStat.Stat(crop_pil).mean)
            if matrix is not None:
                aug = aug.convert("RGB", matrix)
            if aug is not crop_pil:
                image = _pil_to_tensor(aug)
        out = dict(image=image, teacher_image=teacher, box_mask=mask, valid=True,
                   ann_id=int(self.index.ann_id[self.rows[i]]), image_id=int(self.image_ids[k]), index=i,
                   crop_box=torch.tensor(crop_used, dtype=torch.float64), flipped=flipped)
        if self.gt_masks:
            out["gt_mask"] = self._gt_mask(i, crop_used, flipped)
        return out


class FileNames:
    """The index's image file names as a sequence, each read when asked (a box index's file holds them:
    a process holds none it has not asked for)."""

    def __init__(self, index):
        self.index = index

    def __len__(self):
        return self.index.n_images

    def __getitem__(self, k):
        return self.index.file_name(int(k))


def collate_boxes(samples):
    """Stack valid samples into a batch dict (tensors only, pin_memory friendly); invalid samples
    are dropped and counted in batch['n_invalid'] (a batch may end up with 0 samples)."""
    good = [s for s in samples if s["valid"]]
    if good:
        stack = lambda key: torch.stack([s[key] for s in good])  # noqa: E731
    else:  # keep shapes: [0, 3, S, S] etc.
        stack = lambda key: samples[0][key].new_empty((0,) + tuple(samples[0][key].shape))  # noqa: E731
    extra = {"gt_mask": stack("gt_mask")} if "gt_mask" in samples[0] else {}
    return dict(
        image=stack("image"), teacher_image=stack("teacher_image"), box_mask=stack("box_mask"),
        crop_box=stack("crop_box"), **extra,
        ann_id=torch.tensor([s["ann_id"] for s in good], dtype=torch.int64),
        image_id=torch.tensor([s["image_id"] for s in good], dtype=torch.int64),
        index=torch.tensor([s["index"] for s in good], dtype=torch.int64),
        flipped=torch.tensor([s["flipped"] for s in good], dtype=torch.bool),
        n_invalid=len(samples) - len(good),
    )


# ----------------------------------------------------------------------------------------------
# Labeling side: one item = one image (decoded once) with all its boxes, deterministic crops.


class ImageCrops(NamedTuple):
    """One image's label-time crops, as ImageBoxes gives them."""
    image_id: int
    file_name: str
    width: int  # the decoded size, or the JSON's when the image failed
    height: int
    ann_ids: torch.Tensor  # int64 [n]
    crops: torch.Tensor  # uint8 [n,3,S,S]
    box_masks: torch.Tensor  # bool [n,S,S]
    crop_boxes: torch.Tensor  # float64 [n,4]: the crops as pad_crop gives them, xyxy (mapping as in roi_crop)
    error: str  # None, or "<path>: <reason>" for a missing/corrupt image or a size that differs from the JSON
    # [(ann_id, reason)] for EVERY box that got no crop: degenerate boxes, all boxes of a failed image
    bad: list


class ImageBoxes(torch.utils.data.Dataset):
    """Labeling: one item (ImageCrops) = one image with the crops of all its boxes. images: a sequence
    of dicts (id, file_name, width, height); boxes_by_image: anything whose get(image_id, []) gives
    that image's annotations (dicts with id and bbox, xywh), e.g. coco.BoxesByImage. Crops use
    mal.expand_box_fixed(box, expand), no flip."""

    def __init__(self, images, boxes_by_image, image_dir, size=512, expand=0.2):
        self.images, self.boxes_by_image = images, boxes_by_image
        self.image_dir, self.size, self.expand = os.fspath(image_dir), int(size), float(expand)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, k):

        entry = self.images[k]
        boxes = [(a["id"], a["bbox"]) for a in self.boxes_by_image.get(entry["id"], [])]
        path = os.path.join(self.image_dir, entry["file_name"])
        W, H = entry.get("width"), entry.get("height")
        img, error = None, None
        try:
            img = load_rgb(path)
            if W is not None and H is not None and img.size != (W, H):
                error = f"{path}: decoded size {img.size[0]}x{img.size[1]} != annotation {W}x{H}"
            W, H = img.size
        except ImageError as e:
            error = str(e)
        S = self.size
        used, ann_ids, bad = [], [], []
        for ann_id, bbox in boxes:
            if error is not None:
                bad.append((ann_id, error))
                continue
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                x = y = w = h = float("nan")
            problem = coco.xywh_problem(x, y, w, h, W, H)
            if problem:
                bad.append((ann_id, problem[1]))
                continue
            ann_ids.append(ann_id), used.append((x, y, x + w, y + h))
        crops, masks, crop_boxes = box_crops(img, used, S, self.expand)
        return ImageCrops(entry["id"], entry["file_name"], W, H, torch.tensor(ann_ids, dtype=torch.int64),
                          crops, masks, crop_boxes, error, bad)


def box_crops(img, boxes, size, expand=0.2):
    """The label-time crops of one decoded image's boxes (xyxy, each covering a pixel of it): crops
    uint8 [n,3,S,S], box masks bool [n,S,S] and the crop boxes float64 [n,4] (pad_crop's, xyxy; the
    mapping as in roi_crop). Each box is clipped to the image, then expanded by `expand`
    (mal.expand_box_fixed)."""
    crops, masks, used = [], [], []
    for b in boxes:
        box = _clip_box(b, *img.size)
        c, m, cu = roi_crop(img, box, mal.expand_box_fixed(box, expand), size)
        # bool: a quarter of float32's bytes through the loader's queue, the batch and the copy to the GPU
        crops.append(c), masks.append(m.bool()), used.append(cu)
    return (torch.stack(crops) if crops else torch.empty(0, 3, size, size, dtype=torch.uint8),
            torch.stack(masks) if masks else torch.empty(0, size, size, dtype=torch.bool),
            torch.tensor(used, dtype=torch.float64).reshape(-1, 4))


# ----------------------------------------------------------------------------------------------
# Command line.


def _stats(args):
    ds = BoxDataset(args.json, args.images, train=False, min_area=args.min_area)
    usable = np.ones(len(ds), dtype=bool)
    if args.check_images:  # decode first, so that the counts below are those of the usable images
        rows = np.unique(ds.img_rows)
        bad = [k for k in rows if ds._image(int(k))[1] is not None]
        usable = ~np.isin(ds.img_rows, bad)
        print(f"images checked: {len(rows)}, unusable: {len(bad)}")
    print(ds.describe(usable))
    # COCO's size classes (and label.py --eval's) go by the annotation's area, the mask's where it has one.
    area, no_area = ds.areas[usable], np.isnan(ds.areas[usable])
    area[no_area] = (ds.boxes[usable, 2:] - ds.boxes[usable, :2]).prod(1)[no_area]
    print(f"boxes by COCO size class (annotation area): "
          f"small(<32²)={int((area < 32 ** 2).sum())} "
          f"medium={int(((area >= 32 ** 2) & (area < 96 ** 2)).sum())} "
          f"large(>=96²)={int((area >= 96 ** 2).sum())}"
          + (f"; {int(no_area.sum())} without an area, classed by their box w×h" if no_area.any() else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description="What BoxDataset keeps and skips for a COCO-format JSON "
                                            "(the synthetic sets: python synthetic.py --help).",
                                formatter_class=options.HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="what BoxDataset keeps and skips for a COCO-format JSON",
                       formatter_class=options.HelpFormatter)
    s.add_argument("--json", required=True, help="COCO-format instances JSON")
    s.add_argument("--images", required=True, help="image folder (file_name is relative to it)")
    s.add_argument("--min-area", type=float, default=0.0,
                   help=f"skip boxes with w*h below this (recipe: {recipes.MIN_AREA:g})")
    s.add_argument("--check-images", action="store_true",
                   help="also decode every used image and report failures")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.images):
            raise util.InputError(f"--images {args.images}: no such folder")
        _stats(args)
    except util.InputError as e:
        util.fail("data.py", e)


if __name__ == "__main__":
    main()
