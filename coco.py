"""COCO helpers: why a box cannot be labeled, mask geometry (a crop's probabilities pasted into the
image, exact with respect to data.py's crop mapping), compressed RLE, the labeled output (written
annotation by annotation), and the box index: the boxes to label or train on (an instances JSON or a
results list) read once, element by element, into columns mapped from a cache file (box_index).

Coordinates: boxes are xyxy float pixels; pixel (i, j) covers [j, j+1) × [i, i+1), its centre is
(j + 0.5, i + 0.5); an image pixel belongs to a box iff its centre lies in [x0, x1) × [y0, y1).
COCO's bbox is xywh. Crop pixel (u, v) of an S × S crop of box (x0, y0, x1, y1) sits at
x = x0 + (u + 0.5)(x1 - x0)/S.
"""
import array
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import util


def xywh_problem(x, y, w, h, width, height):
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
    problem = xywh_problem(*b, W or None, H or None)
    if problem:
        return f"{problem[1]} ({problem[0].replace('_', ' ')} box {b})"
    x0, y0, x1, y1 = xywh_to_xyxy(b)
    if W and H:
        xa, xb = _pixel_span(x0, x1, int(W))
        ya, yb = _pixel_span(y0, y1, int(H))
        if xa >= xb or ya >= yb:
            return f"box {b} covers no pixel centre of the {W}x{H} image"
    return None


def is_id(v):
    """COCO ids are ints; strings would break sorting, chunk keys and the merge far from the cause."""
    return isinstance(v, int) and not isinstance(v, bool)


def read_instances(path, what="COCO instances JSON"):
    """A COCO instances JSON as a dict; InputError naming the file and the missing key otherwise."""
    return util.read_json(path, what, keys=("images", "annotations"))


def label_annotation(a, r, image, unlabeled_as="none"):
    """Annotation dict `a` (changed in place) with its result r ({'segmentation', 'area', 'mask_score'}
    or {'reason'}; None: no result): with its mask and mask_score, or (if unlabeled) its box, no
    segmentation, no mask_score and area = box area; unlabeled_as="box" gives those a mask instead
    (for trainers that need one on every box, e.g. detectron2's mapper): the filled box, or an empty
    mask of the image's size where the box covers none of its pixels; only where the image entry
    (a dict, {} when unknown) has no size can no mask be drawn."""
    if r is not None and "segmentation" in r:
        a["segmentation"], a["area"], a["mask_score"] = r["segmentation"], r["area"], r["mask_score"]
        return a
    a.pop("segmentation", None)  # never pass a GT mask off as a label
    a.pop("mask_score", None)  # nor an earlier run's score off as this one's
    b = a.get("bbox")
    try:
        a["area"] = max(0.0, float(b[2])) * max(0.0, float(b[3]))
    except (TypeError, ValueError, IndexError):
        a["area"] = 0.0
    h, w = image.get("height"), image.get("width")
    if unlabeled_as == "box" and h and w:
        m = box_mask(xywh_to_xyxy(b), int(h), int(w)) if box_problem(a, image) is None else \
            np.zeros((int(h), int(w)), dtype=bool)  # zero-width, non-finite or outside: empty
        a["segmentation"], a["area"] = encode(m), float(m.sum())
    return a


def apply_labels(out, anns, results, unlabeled_as="none"):
    """The output dict: `out` with `anns` in order, each labeled by label_annotation with
    results {ann_id: result}."""
    images = {im.get("id"): im for im in out.get("images", [])}
    return {**out, "annotations": [label_annotation(dict(a), results.get(a["id"]),
                                                    images.get(a.get("image_id")) or {}, unlabeled_as)
                                   for a in anns]}


def write_instances(f, index, annotations, annotations_last=False):
    """Writes a COCO instances JSON to text file f entry by entry, byte for byte as json.dump (compact)
    writes the index's document with its annotations replaced: its top-level values in their order (the
    image entries read from the index one by one), "annotations" where it stood (annotations_last: after
    the others) holding the annotation dicts of `annotations`, an iterable of (annotation, payload). A
    generator: yields each payload once its annotation is written."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    keys = [k for k in index.head_keys if k != "annotations" or not annotations_last]
    if annotations_last or "annotations" not in keys:
        keys.append("annotations")
    f.write("{")
    for n, key in enumerate(keys):
        f.write(("," if n else "") + dumps(key) + ":")
        if key == "images":
            f.write("[")
            for k in range(index.n_images):
                f.write(("," if k else "") + index.image_json(k).decode("ascii"))
            f.write("]")
        elif key == "annotations":
            f.write("[")
            for k, (a, payload) in enumerate(annotations):
                f.write(("," if k else "") + dumps(a))
                yield payload
            f.write("]")
        else:
            f.write(dumps(index.head[key]))
    f.write("}")


def write_labels(f, index, rows, result_of, unlabeled_as="none"):
    """Writes the labeled COCO JSON to text file f annotation by annotation, byte for byte as json.dump
    (compact) writes apply_labels' dict: the input's top-level values in their order, then the
    annotations of `rows` (index rows, in order), each labeled by label_annotation with result_of(row),
    or with {'reason': its box problem} where that is None. A generator: yields (annotation, result)
    as each is written."""

    def labeled():
        for row in rows:
            row = int(row)
            a = index.annotation(row)
            r = result_of(row)
            if r is None:
                reason = index.unlabelable_reason(row, a)
                if reason is None:
                    raise RuntimeError(f"annotation {a['id']} got no result")
                r = {"reason": reason}
            k = int(index.ann_img_row[row])
            image = index.image(k) if k >= 0 and unlabeled_as == "box" and "segmentation" not in r else {}
            yield label_annotation(a, r, image, unlabeled_as), (a, r)

    yield from write_instances(f, index, labeled(), annotations_last=True)

# ----------------------------------------------------------------------------------------------
# Reading a JSON document piece by piece: a multi-GB COCO file does not fit in memory as Python
# objects, but each image entry and each annotation does. The standard library's decoder parses one
# array element at a time (raw_decode on a sliding buffer), so no extra parser is needed.

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
STREAMED_KEYS = ("images", "annotations")  # the arrays read element by element; other values whole
READ_BLOCK = 1 << 20  # characters read at a time


class NotJson(util.InputError):
    """A file that is not valid JSON (it wins over what is wrong with the entries read before)."""


class _JsonReader:
    """A text file read in blocks, with json's decoder applied at the current position."""

    def __init__(self, f, path, what):
        self.f, self.path, self.what = f, path, what
        self.buf, self.pos, self.eof, self.lines_before, self.col_base = "", 0, False, 0, 0

    def _more(self):
        """Append the next block to the buffer (dropping what is consumed); False at the end."""
        block = self.f.read(max(READ_BLOCK, len(self.buf) - self.pos))  # doubles for a large single value
        if not block:
            self.eof = True
            return False
        done = self.buf[:self.pos]
        nl = done.rfind("\n")
        self.col_base = self.col_base + len(done) if nl < 0 else len(done) - nl - 1
        self.lines_before += done.count("\n")
        self.buf, self.pos = self.buf[self.pos:] + block, 0
        return True

    def error(self, msg, pos):
        line = self.lines_before + self.buf.count("\n", 0, pos) + 1
        nl = self.buf.rfind("\n", 0, pos)
        col = pos - nl if nl >= 0 else self.col_base + pos + 1
        raise NotJson(f"{self.what} {self.path}: not valid JSON ({msg} at line {line}, column {col})")

    def peek(self):
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def take(self, chars, expecting):
        c = self.peek()
        if not c or c not in chars:
            self.error(f"Expecting {expecting}", self.pos)
        self.pos += 1
        return c

    def value(self, raw=False):
        """The next JSON value (raw: and its text). A value that ends where the buffer ends might go
        on (a number), so it counts only with a character after it or at the end of the file."""
        self.peek()
        while True:
            try:
                v, end = _DECODER.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    text = self.buf[self.pos:end] if raw else None
                    self.pos = end
                    return (v, text) if raw else v
            except json.JSONDecodeError as e:
                if self.eof:
                    self.error(e.msg, e.pos)
            self._more()

    def elements(self):
        """The elements of the array that starts here, one at a time, each with its text."""
        self.take("[", "'['")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value(raw=True)
            if self.take(",]", "',' delimiter") == "]":
                return


def _read_document(path, what, on_item):
    """Reads a JSON file piece by piece: on_item(key, value) for each top-level key of a dict (for
    STREAMED_KEYS holding an array the value is an iterator of its elements as (element, its JSON
    text), used up before the next call), on_item(None, elements) for a list. Returns the document's
    type (dict or list)."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise util.InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise util.InputError(f"{what} {path}: a folder, not a file") from None
    with f:
        r = _JsonReader(f, path, what)
        try:
            first = r.peek()
            if first == "[":
                on_item(None, r.elements())
                kind = list
            elif first == "{":
                r.pos += 1
                kind = dict
                if r.peek() == "}":
                    r.pos += 1
                else:
                    while True:
                        if r.peek() != '"':
                            r.error("Expecting property name enclosed in double quotes", r.pos)
                        key = r.value()
                        r.take(":", "':' delimiter")
                        if key in STREAMED_KEYS and r.peek() == "[":
                            elements = r.elements()
                            on_item(key, elements)
                            for _ in elements:  # what on_item left
                                pass
                        else:
                            on_item(key, r.value())
                        if r.take(",}", "',' delimiter") == "}":
                            break
            else:  # a scalar document: json's own message
                value = r.value()
                kind = type(value)
            if r.peek():
                r.error("Extra data", r.pos)
        except UnicodeDecodeError:
            raise util.InputError(f"{what} {path}: not JSON (not even text)") from None
    return kind


# ----------------------------------------------------------------------------------------------
# The box index: the boxes of a COCO JSON as columns (numpy arrays), in one file that is mapped, not
# read: a process holds in memory only the columns it touches. Each image entry and annotation is
# kept as its compact JSON text too (read back with pread, not mapped), so that the output writes
# every annotation with all its keys without the input ever being held whole.

INDEX_MAGIC = b"MAL box index 2\n"  # 2: the mask_score column
_ALIGN = 64


class _Spool:
    """Byte strings appended to a temporary file (or memory); their offsets in an int64 list."""

    def __init__(self, folder):
        self.f = tempfile.TemporaryFile(dir=folder) if folder else io.BytesIO()
        self.offsets, self.n = array.array("q", [0]), 0

    def add(self, b):
        self.f.write(b)
        self.n += len(b)
        self.offsets.append(self.n)


class _Builder:
    """Collects the index's columns from a JSON document's pieces (see _read_document)."""

    def __init__(self, path, what, kind, folder):
        self.path, self.what, self.kind = path, what, kind  # kind: "instances", "results" or "images"
        self.head, self.head_keys, self.has_gt = {}, [], False
        self.img_id, self.img_w, self.img_h = array.array("q"), array.array("q"), array.array("q")
        self.img_names, self.img_json = _Spool(folder), _Spool(folder)
        self.ann = {k: array.array(t) for k, t in (("id", "q"), ("image_id", "q"), ("bbox", "d"),
                                                  ("bbox_ok", "b"), ("iscrowd", "b"), ("area", "d"),
                                                  ("score", "d"), ("mask_score", "d"), ("category", "q"),
                                                  ("has_seg", "b"))}
        self.ann_json, self.seen = _Spool(folder), set()

    def close(self):
        for spool in (self.img_names, self.img_json, self.ann_json):
            spool.f.close()

    def item(self, key, value):
        if key in self.seen:
            return  # json.load keeps a repeated key's last value; repeated keys are not COCO: the first wins
        self.seen.add(key)
        if key is None:
            self.results(value)
        elif key == "annotations":
            self.head_keys.append(key)  # where it stood; the output writes annotations last
            if self.kind == "instances":
                for i, (a, raw) in enumerate(self.pairs(key, value)):
                    self.annotation(i, a, raw)
            else:
                self.has_gt = any(isinstance(a, dict) and "segmentation" in a
                                  for a, _ in self.pairs(key, value))
        elif key == "images":
            self.head_keys.append(key)
            for i, (im, _) in enumerate(self.pairs(key, value)):
                self.image(i, im)
        else:
            self.head_keys.append(key)
            self.head[key] = value

    def pairs(self, key, value):
        """(element, its JSON text or None) of a streamed array, or of a list already parsed."""
        if isinstance(value, list):
            return ((v, None) for v in value)
        if not hasattr(value, "__next__"):
            raise util.InputError(f"{self.what} {self.path}: {key!r} is not a list")
        return value

    def image(self, i, im):
        if not isinstance(im, dict) or "id" not in im:
            raise util.InputError(f"{self.path}: image #{i} has no id")
        if not is_id(im["id"]):
            raise util.InputError(f"{self.path}: image #{i} has a non-integer id {im['id']!r}")
        self.img_id.append(im["id"])
        w, h = im.get("width"), im.get("height")
        self.img_w.append(int(w) if isinstance(w, (int, float)) and math.isfinite(w) else -1)
        self.img_h.append(int(h) if isinstance(h, (int, float)) and math.isfinite(h) else -1)
        self.img_names.add(str(im.get("file_name", "")).encode("utf-8", "surrogatepass"))
        self.img_json.add(json.dumps(im, separators=(",", ":")).encode("ascii"))

    def results(self, elements):
        for i, (r, raw) in enumerate(elements):
            if not isinstance(r, dict) or "image_id" not in r:
                raise util.InputError(f"{self.path}: result #{i} has no image_id")
            if not is_id(r["image_id"]):
                raise util.InputError(f"{self.path}: result #{i} has a non-integer image_id "
                                      f"{r['image_id']!r}")
            self.add_annotation(_as_result(r, i), raw)

    def annotation(self, i, a, raw):
        if not isinstance(a, dict) or "id" not in a or "image_id" not in a:
            raise util.InputError(f"{self.path}: annotation #{i} lacks 'id' or 'image_id'")
        for k in ("id", "image_id"):
            if not is_id(a[k]):
                raise util.InputError(f"{self.path}: annotation #{i} has a non-integer {k} {a[k]!r}")
        self.add_annotation(a, raw)

    def add_annotation(self, a, raw):
        """One annotation's columns, and its JSON text: as read (the output parses it again; a
        result's id and iscrowd are added then), or dumped where it was parsed already."""
        c = self.ann
        c["id"].append(a["id"])
        c["image_id"].append(a["image_id"])
        b = a.get("bbox")
        try:
            b = [float(v) for v in b] if isinstance(b, (list, tuple)) and len(b) == 4 else None
        except (TypeError, ValueError):
            b = None
        c["bbox"].extend(b or (math.nan,) * 4)
        c["bbox_ok"].append(b is not None)
        c["iscrowd"].append(bool(a.get("iscrowd", 0)))
        c["area"].append(_float_or_nan(a.get("area")))
        c["score"].append(_float_or_nan(a.get("score")))
        c["mask_score"].append(_float_or_nan(a.get("mask_score")))
        cat = a.get("category_id")
        c["category"].append(cat if is_id(cat) else -1)
        c["has_seg"].append("segmentation" in a)
        self.ann_json.add((raw if raw is not None else json.dumps(a, separators=(",", ":"))).encode("utf-8"))

    def arrays(self):
        """The columns as numpy arrays, and the per-image tables: each annotation's image row (-1: not
        in images), the annotation rows grouped by image (input order within), each image's start."""
        img_id = np.frombuffer(self.img_id, np.int64)
        c = {k: np.frombuffer(v, np.int8 if v.typecode == "b" else np.dtype(v.typecode))
             for k, v in self.ann.items()}
        if len(np.unique(img_id)) != len(img_id):
            raise util.InputError(f"{self.path}: image ids are not unique")
        if self.kind == "instances" and len(np.unique(c["id"])) != len(c["id"]):
            raise util.InputError(f"{self.path}: annotation ids are not unique")
        img_order = np.argsort(img_id, kind="stable")
        pos = np.minimum(np.searchsorted(img_id, c["image_id"], sorter=img_order), max(len(img_id) - 1, 0))
        img_row = img_order[pos] if len(img_id) else np.full(len(c["image_id"]), -1, np.int64)
        img_row = np.where(img_id[img_row] == c["image_id"], img_row, -1) if len(img_id) else img_row
        by_image = np.lexsort((np.arange(len(img_row)), img_row))
        by_image = by_image[np.searchsorted(img_row[by_image], 0):]  # without those of no image
        counts = np.bincount(img_row[img_row >= 0], minlength=len(img_id))
        out = dict(img_id=img_id, img_id_order=img_order, img_w=np.frombuffer(self.img_w, np.int64),
                   img_h=np.frombuffer(self.img_h, np.int64),
                   img_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   ann_img_row=img_row.astype(np.int64), ann_by_image=by_image.astype(np.int64),
                   ann_id_order=np.argsort(c["id"], kind="stable"),
                   bbox=c.pop("bbox").reshape(-1, 4), **{"ann_" + k: v for k, v in c.items()})
        for name, spool in (("img_name", self.img_names), ("img_json", self.img_json),
                            ("ann_json", self.ann_json)):
            out[name + "_off"] = np.frombuffer(spool.offsets, np.int64)
        return out


def _as_result(r, i):
    """Result #i of a results list as an annotation: ids 1..N in input order (stable under
    --score-thr), iscrowd 0 unless given."""
    r["id"] = i + 1
    r.setdefault("iscrowd", 0)
    return r


def _float_or_nan(v):
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class BoxIndex:
    """The boxes of a COCO instances JSON (or a results list and its images) as columns:

      images:       img_id, img_w, img_h (-1: not given), img_start (annotation rows of image k are
                    ann_by_image[img_start[k]:img_start[k + 1]]), file_name(k), image_json(k)
      annotations:  ann_id, ann_image_id, ann_img_row (-1: image not listed), bbox (xywh float64, NaN
                    where not 4 numbers; ann_bbox_ok), ann_iscrowd, ann_area / ann_score /
                    ann_mask_score (NaN: none), ann_category (-1: none), ann_has_seg, ann_id_order
                    (rows by id), annotation(row)

    in input order. head: the document's other top-level values ("images" and "annotations" stand
    where they stood in head_keys); kind: "instances" or "results". Open with box_index()."""

    def __init__(self, arrays, head, head_keys, kind, has_gt, blobs):
        self.__dict__.update(arrays)
        self.head, self.head_keys, self.kind, self.has_gt, self._blobs = head, head_keys, kind, has_gt, blobs

    def __len__(self):
        return len(self.ann_id)

    @property
    def n_images(self):
        return len(self.img_id)

    def _blob(self, name, k):
        off = getattr(self, name + "_off")
        a, b = int(off[k]), int(off[k + 1])
        src, base = self._blobs[name]
        return src[a:b] if isinstance(src, bytes) else os.pread(src.fileno(), b - a, base + a)

    def file_name(self, k):
        return self._blob("img_name", k).decode("utf-8", "surrogatepass")

    def image_json(self, k):
        """Image entry k's compact JSON text (bytes)."""
        return self._blob("img_json", k)

    def annotation_json(self, row):
        """Annotation row's JSON text (bytes) as read (a result's without the id and iscrowd it gets)."""
        return self._blob("ann_json", row)

    def image(self, k):
        return json.loads(self.image_json(k).decode("ascii"))

    def annotation(self, row):
        a = json.loads(self.annotation_json(row).decode("utf-8"))
        return _as_result(a, int(row)) if self.kind == "results" else a

    def images_of(self, boxes):
        """The image rows that hold any of the annotation rows `boxes` (a bool mask), by image id."""
        rows = np.unique(self.ann_img_row[boxes])
        return rows[np.argsort(self.img_id[rows], kind="stable")]

    def rows_of_ids(self, ids):
        """The annotation rows of these annotation ids (each must be in the index)."""
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.ann_id, ids, sorter=self.ann_id_order)
        rows = self.ann_id_order[np.minimum(pos, max(len(self) - 1, 0))]
        if len(ids) and (not len(self) or not np.array_equal(self.ann_id[rows], ids)):
            raise KeyError(f"annotation ids {ids[self.ann_id[rows] != ids][:5].tolist()} not in the index")
        return rows

    def image_rows(self, image_ids):
        """The image rows of these image ids (each must be listed)."""
        pos = np.searchsorted(self.img_id, np.asarray(image_ids, np.int64), sorter=self.img_id_order)
        return self.img_id_order[pos]

    # box_codes: each box's first problem, in box_problem's order
    BOX_OK, NO_IMAGE, DEGENERATE, OUTSIDE, NO_PIXEL = range(5)

    def box_codes(self):
        """int8 per annotation row: BOX_OK, or the first of its problems as box_problem() finds them
        (NO_IMAGE: its image is not listed; DEGENERATE: not 4 finite numbers, or w or h <= 0; OUTSIDE:
        off its image; NO_PIXEL: covers no pixel centre of it). Vectorised, a block of rows at a time
        so that the temporaries stay small; unlabelable_reason gives box_problem's words."""
        codes = np.zeros(len(self), dtype=np.int8)
        for s in range(0, len(self), 1 << 20):
            codes[s:s + (1 << 20)] = self._box_codes(slice(s, s + (1 << 20)))
        return codes

    def _box_codes(self, rows):
        img_row = self.ann_img_row[rows]
        k = np.maximum(img_row, 0)
        W, H = (self.img_w[k], self.img_h[k]) if self.n_images else (np.zeros(len(k), np.int64),) * 2
        bbox = self.bbox[rows]
        x, y, w, h = (bbox[:, j] for j in range(4))
        known = (W > 0) & (H > 0)  # box_problem's `W or None`: 0 or absent is unknown
        with np.errstate(invalid="ignore"):
            x1, y1 = x + w, y + h
            xa, xb = np.maximum(0, np.ceil(x - 0.5)), np.minimum(W, np.maximum(0, np.ceil(x1 - 0.5)))
            ya, yb = np.maximum(0, np.ceil(y - 0.5)), np.minimum(H, np.maximum(0, np.ceil(y1 - 0.5)))
            checks = [(img_row < 0, self.NO_IMAGE),
                      (~np.isfinite(bbox).all(1) | (w <= 0) | (h <= 0), self.DEGENERATE),
                      (known & ((x >= W) | (y >= H) | (x1 <= 0) | (y1 <= 0)), self.OUTSIDE),
                      (known & ((xa >= xb) | (ya >= yb)), self.NO_PIXEL)]  # _pixel_span's
        codes = np.zeros(len(k), dtype=np.int8)
        for bad, code in reversed(checks):  # the first problem wins
            codes[bad] = code
        return codes

    def labelable(self):
        """bool per annotation row: its image is listed and box_problem() finds nothing."""
        return self.box_codes() == self.BOX_OK

    def unlabelable_reason(self, row, ann=None):
        """Why annotation row cannot be labeled (box_problem's words), or None."""
        ann = self.annotation(row) if ann is None else ann
        k = int(self.ann_img_row[row])
        if k < 0:
            return f"image_id {ann['image_id']} not in images"
        return box_problem(ann, self.image(k))

    def __getstate__(self):  # a mapped index travels as its path (to DataLoader workers that spawn)
        return {"path": self.path, "sources": self.sources} if self.path else self.__dict__

    def __setstate__(self, state):
        if state.get("path"):
            index = _open_index(state["path"], state["sources"])
            if index is None:
                raise RuntimeError(f"{state['path']}: the box index changed while in use")
            state, index.__dict__ = index.__dict__, {}  # its file is this one's now
        self.__dict__.update(state)

    def __del__(self):
        for src, _ in getattr(self, "_blobs", {}).values():
            if not isinstance(src, bytes):
                src.close()


def _write_index(path, b, sources):
    """The index file, atomically: magic, a JSON header line, the arrays, then the JSON texts."""
    arrays, layout, offset = b.arrays(), {}, 0
    spools = {"img_name": b.img_names, "img_json": b.img_json, "ann_json": b.ann_json}
    has_gt = b.has_gt if b.kind == "results" else bool(b.ann["has_seg"].count(1))
    for name, a in arrays.items():
        layout[name] = [a.dtype.str, list(a.shape), offset]
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    for name, spool in spools.items():
        layout[name] = ["|u1", [spool.n], offset]
        offset += -(-spool.n // _ALIGN) * _ALIGN
    header = json.dumps(dict(sources=sources, kind=b.kind, head=b.head, head_keys=b.head_keys, has_gt=has_gt,
                             layout=layout, size=offset)).encode("utf-8") + b"\n"
    start = -(-(len(INDEX_MAGIC) + len(header)) // _ALIGN) * _ALIGN
    with util.atomic_file(path) as f:
        f.write(INDEX_MAGIC + header + b"\0" * (start - len(INDEX_MAGIC) - len(header)))
        for name, a in arrays.items():
            f.write(np.ascontiguousarray(a).tobytes())
            f.write(b"\0" * (-a.nbytes % _ALIGN))
        for spool in spools.values():
            spool.f.seek(0)
            shutil.copyfileobj(spool.f, f, 1 << 22)
            f.write(b"\0" * (-spool.n % _ALIGN))


def _open_index(path, sources):
    """The index at path if it is whole and made from these sources (paths, sizes, mtimes), else None."""
    try:
        with open(path, "rb") as f:
            if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                return None
            header = json.loads(f.readline())
            start = -(-f.tell() // _ALIGN) * _ALIGN
        if header["sources"] != sources or os.path.getsize(path) != start + header["size"]:
            return None
        arrays, blobs = {}, {}
        for name, (dtype, shape, offset) in header["layout"].items():
            if name in ("img_name", "img_json", "ann_json"):
                blobs[name] = start + offset
            elif int(np.prod(shape)) == 0:
                arrays[name] = np.zeros(shape, np.dtype(dtype))
            else:
                # a plain ndarray view of the mapping: memmap's own indexing is several times slower
                m = np.memmap(path, np.dtype(dtype), "r", start + offset, tuple(shape))
                arrays[name] = m.view(np.ndarray)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or cut short: rebuilt
        return None
    f = open(path, "rb", buffering=0)  # closed with the index
    blobs = {name: (f, offset) for name, offset in blobs.items()}
    index = BoxIndex(arrays, header["head"], header["head_keys"], header["kind"], header["has_gt"], blobs)
    index.path, index.sources = path, sources
    return index


def _cache_paths(json_path, images_json):
    """Where the index of these inputs is kept: beside the JSON, else (a folder that cannot be written)
    in MAL_CACHE_DIR or ~/.cache/mal."""
    name = os.path.basename(json_path) + (f".with-{os.path.basename(images_json)}" if images_json else "")
    key = hashlib.sha256("\0".join(os.path.realpath(p) for p in (json_path, images_json or "")).encode())
    cache = os.environ.get("MAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mal")
    return [os.path.join(os.path.dirname(os.path.abspath(json_path)), name + ".index"),
            os.path.join(cache, f"{name}.{key.hexdigest()[:16]}.index")]


def _sources(*paths):
    out = []
    for p in paths:
        if p:
            st = os.stat(p)
            out.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
    return out


def _build(json_path, images_json, what, folder, results=True, images_what="image entries JSON"):
    """Read the inputs piece by piece into a _Builder. A bad entry stops the building but not the
    reading: a file that is not JSON at all (cut short, say) is said to be that first."""
    holder = {}

    def on_item(key, value):
        if "error" in holder:
            return
        try:
            if "b" not in holder:  # the box document: instances (a dict) or a results list
                holder["b"] = _Builder(json_path, what, "instances" if key is not None else "results", folder)
            b = holder["b"]
            b.item("images" if key is None and b.kind == "results" and b.path == images_json else key, value)
        except NotJson:
            raise
        except util.InputError as e:
            holder["error"] = e

    try:
        return _read_inputs(json_path, images_json, what, results, holder, on_item, images_what)
    except BaseException:
        if "b" in holder:
            holder["b"].close()
        raise


def _read_inputs(json_path, images_json, what, results, holder, on_item, images_what):
    """_build's reading of the box document (and the image entries' JSON) and its checks of what was
    read; what and images_what name them in errors."""
    kind = _read_document(json_path, what, on_item)
    if kind not in (dict, list):
        raise util.InputError(f"{what} {json_path}: holds a {kind.__name__}, neither a COCO instances JSON "
                              f"(a dict) nor a results list")
    if "error" in holder:
        raise holder["error"]
    if "b" not in holder:  # {}: no keys at all
        holder["b"] = _Builder(json_path, what, "instances", None)
    b = holder["b"]
    if b.kind == "results" and not results:
        raise util.InputError(f"{what} {json_path}: a results list, not a COCO instances JSON (a dict with "
                              f"'images' and 'annotations')")
    if b.kind == "results":
        if not images_json:
            raise util.InputError(f"{what} {json_path} is a COCO results list; its image entries are "
                                  f"needed too ({images_what})")
        b.path, b.what = images_json, images_what  # a bare list in it is the image entries
        _read_document(images_json, images_what, on_item)
        if "error" in holder:
            raise holder["error"]
        if "images" not in b.seen:
            raise util.InputError(f"{images_what} {images_json}: no 'images' key")
        b.path = json_path
    else:
        for k in ("images", "annotations"):
            if k not in b.seen:
                raise util.InputError(f"{what} {json_path}: no {k!r} key (a COCO instances JSON has "
                                      f"'images' and 'annotations'; a results list is a list)")
    return b


def box_index(json_path, images_json=None, what="box JSON", results=True, images_what="image entries JSON"):
    """The BoxIndex of a COCO instances JSON, or of a COCO results list with its image entries in
    images_json: read from the cache (beside the JSON, see _cache_paths) when it was made from these
    files as they are now (size and mtime), else built by reading them once, piece by piece, and
    cached. A cache that is unreadable or cut short is rebuilt. Every problem with the input is an
    InputError naming the file (by `what` and `images_what`, which a command sets to its flags) and
    what is wrong; so is a results list where results=False."""
    for p, flag in ((json_path, what), (images_json, images_what)):
        if p and not os.path.exists(p):
            raise util.InputError(f"{flag} {p}: no such file")
        if p and os.path.isdir(p):
            raise util.InputError(f"{flag} {p}: a folder, not a file")
    sources = _sources(json_path, images_json)
    paths = _cache_paths(json_path, images_json)
    for p in paths:
        index = _open_index(p, sources)
        if index is not None:
            return index
    for p in paths:  # the first folder that can be written
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        except OSError:
            continue
        if os.access(os.path.dirname(p), os.W_OK):
            break
    else:
        raise util.InputError(f"{json_path}: its box index can be written neither beside it nor in "
                              f"{os.path.dirname(paths[-1])} (set MAL_CACHE_DIR)")
    b = _build(json_path, images_json, what, os.path.dirname(p), results, images_what)
    try:
        _write_index(p, b, sources)
    finally:
        b.close()
    index = _open_index(p, sources)
    if index is None:  # the input changed while it was read
        raise util.InputError(f"{json_path}: changed while its box index was built; run again")
    return index


class ImageEntries:
    """Image rows of an index as a sequence of image entries {id, file_name, width, height} (None: not
    given), each made when read."""

    def __init__(self, index, rows):
        self.index, self.rows = index, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ix, k = self.index, int(self.rows[i])
        w, h = int(ix.img_w[k]), int(ix.img_h[k])
        return {"id": int(ix.img_id[k]), "file_name": ix.file_name(k), "width": w if w >= 0 else None,
                "height": h if h >= 0 else None}


class BoxesByImage:
    """{image id: [{'id', 'bbox'}, ...]}: the boxes of an image that `selected` (bool per annotation
    row) marks, in input order, read from the index when asked (get only)."""

    def __init__(self, index, selected):
        self.index, self.selected, self.last = index, selected, (None, None)

    def get(self, image_id, default=()):
        if self.last[0] == image_id:  # the loader and the labeling loop ask for each image in turn
            return self.last[1] or default
        ix, boxes = self.index, []
        k = int(ix.image_rows([image_id])[0]) if ix.n_images else 0
        if ix.n_images and ix.img_id[k] == image_id:
            rows = ix.ann_by_image[ix.img_start[k]:ix.img_start[k + 1]]
            rows = rows[self.selected[rows]]
            boxes = [{"id": a, "bbox": b} for a, b in zip(ix.ann_id[rows].tolist(), ix.bbox[rows].tolist())]
        self.last = (image_id, boxes)
        return boxes or default


def index_of_dict(instances, what="COCO instances"):
    """The BoxIndex of a COCO instances dict already in memory (not cached)."""
    b = _Builder(what, what, "instances", None)
    for k, v in instances.items():
        b.item(k, v)
    for k in ("images", "annotations"):
        if k not in b.seen:
            raise util.InputError(f"{what}: no {k!r} key")
    blobs = {name: (spool.f.getvalue(), 0) for name, spool in
             (("img_name", b.img_names), ("img_json", b.img_json), ("ann_json", b.ann_json))}
    index = BoxIndex(b.arrays(), b.head, b.head_keys, b.kind, bool(b.ann["has_seg"].count(1)), blobs)
    index.path = index.sources = None
    return index
