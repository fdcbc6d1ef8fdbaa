"""export.py: label.py's output (a COCO instances dict with an RLE mask per labeled box) in the formats
other trainers and tools read: COCO polygons (one JSON file), YOLO-seg for ultralytics (a folder of
images/, labels/ and data.yaml) and 16-bit instance-label PNGs (a folder, with instances.json). What a
format cannot hold (holes, a mask's separate parts, overlaps) is counted in the summary write() returns:
nothing is dropped silently. The labels file is never held whole: it is read once into its box index
(coco.box_index, cached beside it as LABELS.index), and each image's output is written from its
annotations, read from the index one by one; memory grows by a few tens of bytes a box.

COCO polygons run along the pixels' edges, not through their centres: a vertex (x, y) is a pixel corner,
pixel (i, j) covers [j, j+1) × [i, i+1) as in coco.py, so a single pixel is a unit square and a mask's
polygons have its exact area, which is how pycocotools decodes them. YOLO-seg polygons run through
the centres of the boundary pixels (j + 0.5, i + 0.5), which ultralytics' polygon2mask (cv2.fillPoly
on coordinates truncated to integers, the outline included) draws back as the mask. OpenCV traces
both; it is an optional extra, needed only for polygons.

As a command it exports a labels file label.py has written, without labeling again: the same files as
label.py's own --format, --vis and --review (which go through write_requested too).

  python export.py labels.json --images DIR --format yolo --out yolo/    # or coco-polygons, png
  python export.py labels.json --images DIR --vis 20 --review 50
"""
import options

if __name__ == "__main__":
    options.export_parser().parse_known_args()  # --help answers before torch loads

import json
import os
import shutil
import sys
import tempfile
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

import coco
import evaluation
import recipes
import util


def needs(fmt):
    """An InputError now, before any labeling, when fmt's optional extra (OpenCV) is missing."""
    if fmt in ("coco-polygons", "yolo"):
        _cv2(fmt)


def _cv2(fmt):
    """OpenCV, imported only where a polygon format needs it."""
    try:
        import cv2
    except ImportError:
        raise util.InputError(f"the {fmt} format needs OpenCV: pip install opencv-python-headless") from None
    return cv2


# ----------------------------------------------------------------------------------------------
# Masks and their outlines


class Outline(NamedTuple):
    """A mask's outlines: what a polygon format can say of it."""
    parts: list  # one (K, 2) int array of x, y pixel corners per 8-connected part (holes filled), K >= 4
    hole_pixels: int  # off pixels enclosed by the parts: filling the polygons turns them on


def trace(mask, fmt="coco-polygons", centres=False):
    """The outer outlines of np.bool_ mask [H, W] along its pixels' edges, and what they fill in.
    centres: through the centres of the boundary pixels instead, as pixel indices (vertex (j, i) for
    the centre of pixel (i, j)): what ultralytics' polygon2mask (cv2.fillPoly, the outline included)
    draws back as the mask.
    There every part has at least 3 vertices (a single pixel's repeated), as ultralytics needs."""
    cv2 = _cv2(fmt)
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))  # the mask's box: cheaper than nonzero
    if not ys.size:
        return Outline([], 0)
    y0, x0 = int(ys[0]), int(xs[0])
    # A margin, so no part touches the border; C order, as cv2 needs (pycocotools decodes in Fortran order).
    crop = np.ascontiguousarray(np.pad(mask[y0:ys[-1] + 1, x0:xs[-1] + 1], 1), dtype=np.uint8)
    # cv2 traces the centres of a part's boundary pixels. On the mask upsampled ×2 those are the sub-pixels
    # beside an edge: sub-pixel u = 2j is the left half of pixel j, whose left edge is x = j, and u = 2j + 1
    # the right half, whose right edge is x = j + 1; so x = (u + 1) // 2, and y the same.
    if centres:
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        parts = [c[:, 0].astype(np.int64) + (x0 - 1, y0 - 1) for c in contours]
        parts = [_simplify(p) if len(p) > 2 else p for p in parts]  # a pixel's or a line's: keep as they are
        parts = [np.concatenate([p] + [p[-1:]] * (3 - len(p))) for p in parts]
    else:
        contours, _ = cv2.findContours(crop.repeat(2, 0).repeat(2, 1), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        parts = [_simplify((c[:, 0].astype(np.int64) + 1) // 2 + (x0 - 1, y0 - 1)) for c in contours]
    # Holes: the off pixels that the outside cannot reach 4-connectedly (cv2's parts are 8-connected).
    cv2.floodFill(crop, None, (0, 0), 1)
    return Outline(parts, int((crop == 0).sum()))


def _simplify(p):
    """Drop repeated vertices and those inside a straight run: the ×2 mapping leaves both."""
    p = p[np.any(p != np.roll(p, 1, 0), axis=1)]
    d1, d2 = p - np.roll(p, 1, 0), np.roll(p, -1, 0) - p
    straight = (d1[:, 0] * d2[:, 1] == d1[:, 1] * d2[:, 0]) & ((d1 * d2).sum(1) > 0)
    return p[~straight]


def _area(p):
    """Shoelace area of a closed polygon (K, 2)."""
    x, y = p[:, 0].astype(np.float64), p[:, 1].astype(np.float64)
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _closest(a, b):
    """Indices (i, j) of the closest pair of vertices a[i], b[j], in blocks to bound the memory."""
    best = (np.inf, 0, 0)
    for s in range(0, len(a), 512):
        d = ((a[s:s + 512, None, :] - b[None, :, :]) ** 2).sum(-1)
        k = int(d.argmin())
        if d.flat[k] < best[0]:
            best = (d.flat[k], s + k // len(b), k % len(b))
    return best[1], best[2]


def join(parts):
    """One polygon from several parts, as ultralytics' own COCO converter joins them (merge_multi_segment):
    each part, largest first, hangs on the polygon so far by a zero-width bridge between their closest
    vertices, walked there and back."""
    parts = sorted(parts, key=_area, reverse=True)
    poly = parts[0]
    for q in parts[1:]:
        i, j = _closest(poly, q)
        q = np.roll(q, -j, axis=0)
        poly = np.concatenate([poly[:i + 1], q, q[:1], poly[i:]])
    return poly


def _orphans(index):
    """The number of box-only annotations on no listed image (label.py keeps those, unlabeled); a mask on
    one is an InputError."""
    orphan = index.ann_img_row < 0
    bad = np.flatnonzero(orphan & (index.ann_has_seg != 0))
    if len(bad):
        a = index.annotation(bad[0])
        raise util.InputError(f"annotation {a.get('id')}: a mask on image_id {a.get('image_id')!r}, "
                              f"which is not in images")
    return int(orphan.sum())


def _mask(a, image):
    """The annotation's mask, np.bool_ [H, W], or None where it has none (an unlabeled box)."""
    seg = a.get("segmentation")
    if seg is None:
        return None
    H, W = (image or {}).get("height"), (image or {}).get("width")
    if isinstance(seg, dict) and "size" in seg:
        h, w = (int(v) for v in seg["size"])
        if H and W and (h, w) != (int(H), int(W)):
            raise util.InputError(f"annotation {a.get('id')}: its mask is {w}x{h} but image "
                                  f"{image.get('id')} is {W}x{H}")
    elif H and W:
        h, w = int(H), int(W)
    else:
        raise util.InputError(f"annotation {a.get('id')}: a polygon mask on an image of no known size")
    if isinstance(seg, list) and not seg:
        return np.zeros((h, w), dtype=bool)
    return mask_utils.decode(coco.to_bytes(coco.segmentation_rle(seg, h, w))).astype(bool)


def _outline_counts(o, s):
    """Count what the outline drops into summary s; the parts that make polygons (>= 3 vertices)."""
    parts = [p for p in o.parts if len(p) >= 3]
    s["degenerate_parts_dropped"] += len(o.parts) - len(parts)  # none by construction: a part is >= a pixel
    s["holes_dropped"] += o.hole_pixels > 0
    s["hole_pixels_filled"] += o.hole_pixels
    s["empty_masks"] += not parts
    return parts


def _rel_path(image):
    """The image's file_name as a path inside an export folder (sub-folders kept)."""
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise util.InputError(f"image {image.get('id')}: no file_name")
    rel = os.path.normpath(name)
    if os.path.isabs(rel) or rel.split(os.sep)[0] == "..":
        raise util.InputError(f"image {image.get('id')}: file_name {name!r} is not a path inside a folder")
    return rel


def _claim(seen, path, image):
    """Two images may not write one file (a.jpg and a.png share a.txt)."""
    if path in seen:
        raise util.InputError(f"images {seen[path]!r} and {image['file_name']!r} would both write {path}")
    seen[path] = image["file_name"]


def _masks_by_image(index, s, path_of):
    """For each image of the labels' index, in order, its annotations read then: (image, its file_name
    as a path inside the export, the file it writes (path_of that path), [(annotation, mask)] for its
    annotations with a mask). Counts the box-only annotations into s["unlabeled_skipped"] and the images
    into s["images"]."""
    s["unlabeled_skipped"] = _orphans(index)
    seen = {}
    for k in range(index.n_images):
        image = index.image(k)
        rel = _rel_path(image)
        path = path_of(rel)
        _claim(seen, path, image)
        masks = []
        for row in index.ann_by_image[index.img_start[k]:index.img_start[k + 1]]:
            a = index.annotation(row)
            m = _mask(a, image)
            if m is None:
                s["unlabeled_skipped"] += 1
            else:
                masks.append((a, m))
        yield image, rel, path, masks
    s["images"] = index.n_images


# ----------------------------------------------------------------------------------------------
# The formats


def _coco_polygons(index, dest, image_dir):
    s = dict.fromkeys(("images", "annotations", "masks", "polygons", "unlabeled", "empty_masks",
                       "holes_dropped", "hole_pixels_filled", "degenerate_parts_dropped"), 0)

    def polygons():
        image = (None, None)  # the image row at hand and its entry: an image's annotations often follow
        for row in range(len(index)):
            a = index.annotation(row)
            k = int(index.ann_img_row[row])
            if image[0] != k:
                image = (k, index.image(k) if k >= 0 else None)
            m = _mask(a, image[1])
            if m is None:
                s["unlabeled"] += 1  # kept as it is: a box without a mask, as label.py wrote it
            else:
                s["masks"] += 1
                polys = [p.ravel().tolist() for p in _outline_counts(trace(m, "coco-polygons"), s)]
                if polys:
                    a["segmentation"] = polys
                    s["polygons"] += len(polys)
                else:  # [] would break pycocotools and detectron2: an empty mask becomes a box without one
                    del a["segmentation"]
                    a.pop("mask_score", None)
            yield a, None

    with util.atomic_file(dest, "w") as f:
        for _ in coco.write_instances(f, index, polygons()):
            pass
    s["images"], s["annotations"] = index.n_images, len(index)
    return s


def _label_path(image_path):
    """Where ultralytics looks for an image's labels: the last images/ becomes labels/, the suffix .txt."""
    head, _, tail = image_path.rpartition(os.sep + "images" + os.sep)
    return os.path.splitext(head + os.sep + "labels" + os.sep + tail)[0] + ".txt"


def _place_image(src, dst, s):
    """dst as a symlink to src, else a copy; left as it is where it already is that image."""
    if not os.path.isfile(src):
        s["images_missing"] += 1
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst) and os.path.samefile(src, dst):  # a rerun, or the images already in dest/images
        s["images_linked"] += 1
        return
    tmp = os.path.join(os.path.dirname(dst), ".tmp-link-" + os.path.basename(dst))
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.abspath(src), tmp)
        os.replace(tmp, dst)
        s["images_linked"] += 1
    except OSError:  # no symlinks here (some file systems, Windows without the right)
        if os.path.lexists(tmp):
            os.remove(tmp)
        with open(src, "rb") as f, util.atomic_file(dst) as g:
            shutil.copyfileobj(f, g)
        s["images_copied"] += 1


def _yolo(index, dest, image_dir):
    if image_dir is None:
        raise util.InputError("the yolo format needs the images' folder: its images/ links to them")
    s = dict.fromkeys(("images", "label_files", "lines", "images_linked", "images_copied", "images_missing",
                       "masks", "parts_joined", "holes_dropped", "hole_pixels_filled", "empty_masks",
                       "unlabeled_skipped", "degenerate_parts_dropped"), 0)
    cats = sorted(index.head.get("categories", []), key=lambda c: c["id"])
    cls = {c["id"]: k for k, c in enumerate(cats)}
    # Before writing anything; ann_category is -1 where an annotation's category_id is not an integer id.
    bad = np.flatnonzero((index.ann_has_seg != 0) & ~np.isin(index.ann_category, [i for i in cls if
                                                                                   coco.is_id(i)]))
    if len(bad):
        a = index.annotation(bad[0])
        raise util.InputError(f"annotation {a.get('id')}: category_id {a.get('category_id')!r} "
                              f"is not in categories")
    for image, rel, label_path, masks in _masks_by_image(index, s, lambda rel: _label_path(
            os.path.join(dest, "images", rel))):
        lines = []
        for a, m in masks:
            s["masks"] += 1
            parts = _outline_counts(trace(m, "yolo", centres=True), s)
            if not parts:
                continue
            s["parts_joined"] += len(parts) - 1
            # Pixel centres, j + 0.5: ultralytics multiplies back and truncates to the pixel index j, which a
            # written j itself (as 0.999999·j) would not always give.
            xy = (join(parts) + 0.5) / np.array([m.shape[1], m.shape[0]], dtype=np.float64)
            lines.append(f"{cls[a['category_id']]} " + " ".join(f"{v:.6f}" for v in xy.ravel()) + "\n")
        os.makedirs(os.path.dirname(label_path), exist_ok=True)
        util.atomic_write(label_path, "".join(lines).encode())  # empty: a background image, not a missing one
        s["label_files"] += 1
        s["lines"] += len(lines)
        _place_image(os.path.join(image_dir, rel), os.path.join(dest, "images", rel), s)
    names = "".join(f"  {k}: {json.dumps(str(c.get('name', c['id'])))}\n" for k, c in enumerate(cats))
    # JSON strings are YAML double-quoted scalars: any name or path is safe without a YAML library.
    util.atomic_write(os.path.join(dest, "data.yaml"), (
        f"# ultralytics YOLO-seg data set written by export.py; train and val are the same labeled images\n"
        f"path: {json.dumps(os.path.abspath(dest))}\ntrain: images\nval: images\nnames:\n{names}").encode())
    return s


def _png(index, dest, image_dir):
    s = dict.fromkeys(("images", "pngs", "instances", "empty_masks", "unlabeled_skipped",
                       "overlap_pixels_lost", "instances_hidden", "images_without_size"), 0)
    with tempfile.TemporaryFile("w+", dir=dest) as mapping:  # instances.json's entries, as they come
        for image, _, path, masks in _masks_by_image(index, s, lambda rel: os.path.join(
                dest, os.path.splitext(rel)[0] + ".png")):
            _png_image(image, path, masks, s, mapping)
        with util.atomic_file(os.path.join(dest, "instances.json"), "w") as f:
            # json.dump(..., indent=1) of {file_name: {index: annotation id}}, an image's entry at a time
            f.write("{\n" if s["pngs"] else "{")
            mapping.seek(0)
            shutil.copyfileobj(mapping, f)
            f.write("\n}" if s["pngs"] else "}")
    return s


def _png_image(image, path, masks, s, mapping):
    """The 16-bit PNG of one image's masks; its entry of instances.json appended to text file mapping."""
    labeled = [(a, m) for a, m in masks if m.any()]
    s["empty_masks"] += len(masks) - len(labeled)  # nothing to paint: they get no index
    if len(labeled) > 65535:
        raise util.InputError(f"image {image.get('id')} ({image['file_name']}): {len(labeled)} masks, "
                              f"more than a 16-bit PNG can index (65535)")
    H, W = (labeled[0][1].shape if labeled else (image.get("height"), image.get("width")))
    if not (H and W):
        s["images_without_size"] += 1  # no mask and no width/height: no PNG can be drawn
        return
    label = np.zeros((int(H), int(W)), dtype=np.uint16)
    areas = [int(m.sum()) for _, m in labeled]
    # Larger first, so the smaller objects (often in front, and cheap to lose whole) stay on top.
    for k in sorted(range(len(labeled)), key=lambda k: -areas[k]):
        label[labeled[k][1]] = k + 1
    visible = np.bincount(label.ravel(), minlength=len(labeled) + 1)[1:]
    s["overlap_pixels_lost"] += sum(areas) - int(visible.sum())
    s["instances_hidden"] += int((visible == 0).sum())  # kept in instances.json, with no pixel left
    s["instances"] += len(labeled)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with util.atomic_file(path) as f:
        Image.fromarray(label).save(f, format="PNG")  # uint16 -> mode I;16
    entry = json.dumps({image["file_name"]: {str(k + 1): a["id"] for k, (a, _) in enumerate(labeled)}},
                       indent=1)
    mapping.write((",\n" if s["pngs"] else "") + entry[2:-2])  # without the outer "{\n" and "\n}"
    s["pngs"] += 1


_WRITERS = {"coco-polygons": _coco_polygons, "yolo": _yolo, "png": _png}


def write(index, fmt, dest, image_dir=None):
    """Write label.py's output, read through its index (coco.box_index of the labels file, or
    coco.index_of_dict), as `fmt` (one of recipes.FORMATS) to `dest`, an image or an annotation at a
    time: a JSON file for coco-polygons, a folder (made if missing) for yolo and png; yolo links its
    images/ to those in image_dir. Returns the summary: what was written, and what the format could
    not hold."""
    if fmt not in _WRITERS:
        raise util.InputError(f"format {fmt!r}: not one of {', '.join(recipes.FORMATS)}")
    if fmt != "png":
        _cv2(fmt)  # before anything is written
    if fmt != "coco-polygons":
        os.makedirs(dest, exist_ok=True)
    return _WRITERS[fmt](index, os.fspath(dest), image_dir)


# ----------------------------------------------------------------------------------------------
# What label.py and export.py write from a labels file, and the command


def write_requested(labels_path, image_dir, *, fmt="coco", dest=None, vis=0, vis_dir=None, review_n=0,
                    prog="export.py"):
    """The files asked for beside the labels file labels_path, read through its index: vis overlays (in
    vis_dir, default LABELS.vis/), the review_n lowest-scored masks (evaluation.review_list) in
    LABELS.review/, and fmt's files in dest (coco: none, the labels are those). Each is said in a line on
    stderr, prefixed with prog."""
    if not (vis or review_n or fmt != "coco"):
        return
    index = coco.box_index(labels_path, what="labels file", results=False)  # cached beside it: LABELS.index
    if vis:
        vis_dir = vis_dir or util.side_file(labels_path, ".vis")
        n = len(evaluation.write_overlays(index, image_dir, vis_dir, vis))
        print(f"{prog}: {n} overlays in {vis_dir}", file=sys.stderr)
    if review_n:
        review_dir = util.side_file(labels_path, ".review")
        review = evaluation.review_list(index)
        n = len(evaluation.write_review(index, review, image_dir, review_dir, review_n))
        print(f"{prog}: the {n} lowest-scored masks in {review_dir} (all {len(review)} by mask_score in "
              f"{util.side_file(labels_path, '.review.json')})", file=sys.stderr)
    if fmt != "coco":
        counts = write(index, fmt, dest, image_dir=image_dir)
        print(f"{prog}: --format {fmt} in {dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
              file=sys.stderr)


def get_args(argv=None):
    p = options.export_parser()
    args = p.parse_args(argv)
    if args.format != "coco" and not args.out:
        p.error(f"--format {args.format} needs --out")
    if args.format == "coco" and not (args.vis or args.review):
        p.error("nothing to write: give --format, --vis or --review")
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        if not os.path.isdir(args.images):
            raise util.InputError(f"--images {args.images}: no such image folder")
        needs(args.format)
        write_requested(args.labels, args.images, fmt=args.format, dest=args.out, vis=args.vis,
                        vis_dir=args.vis_dir, review_n=args.review)
    except util.InputError as e:
        util.fail("export.py", e)


if __name__ == "__main__":
    main()
