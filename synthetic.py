"""Synthetic COCO-format sets with GT masks: the embedded demo, a harder textured set, a cluttered one, one
that glows as fluorescence does, and COCO-sized images for throughput benchmarks. Deterministic: image i
of a split depends only on (seed, split, i); each set is made once under its folder and reused while
complete.

  python synthetic.py demo --out DIR          # the demo set (train.py and label.py make it themselves)
  python synthetic.py textured --out DIR      # soft edges, low contrast, grey images, thin parts, holes
  python synthetic.py clutter --out DIR       # touching objects, distractors, shading, objects at the edge
  python synthetic.py glow --out DIR          # soft-edged bright objects on dark, noisy backgrounds
  python synthetic.py coco-like --out DIR     # 640x480 images with ~7 boxes each, for bench.py
"""
import argparse
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

import options
import util

# ----------------------------------------------------------------------------------------------
# Writing a set: COCO JSON per split (GT masks as compressed RLE), JPEG images, a manifest last.


def _encode_jpeg(pixels, quality=92):
    bio = io.BytesIO()
    Image.fromarray(pixels).save(bio, format="JPEG", quality=quality)
    return bio.getvalue()


def cached_set(root, params, build):
    """Return the manifest's paths if root holds a complete set made with `params`, else build it
    (build(root) -> (paths, files)). The manifest is written last (atomically), so an interrupted
    build is simply redone."""
    root = os.path.abspath(os.fspath(root))
    manifest = os.path.join(root, "manifest.json")
    try:
        with open(manifest) as f:
            m = json.load(f)
        if m.get("params") == params and all(os.path.exists(os.path.join(root, p)) for p in m["files"]):
            return {k: os.path.join(root, v) for k, v in m["paths"].items()}
    except (OSError, ValueError, KeyError):
        pass
    what = f"the {params['kind'].replace('_', '-')} set in {root}"
    print(f"making {what} (once: it is reused while complete)", file=sys.stderr, flush=True)
    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    paths, files = build(root)
    util.atomic_write(manifest, json.dumps(dict(params=params, paths=paths, files=files), indent=1).encode())
    print(f"made {what} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    return {k: os.path.join(root, v) for k, v in paths.items()}


def mask_annotation(ann_id, image_id, category_id, mask):
    """A COCO annotation for a bool mask [H,W]: tight bbox, area, compressed RLE."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(id=ann_id, image_id=image_id, category_id=category_id,
                bbox=[int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)],
                area=int(mask.sum()), iscrowd=0, segmentation=rle)


def write_coco(root, split, images, annotations, categories, description, version):
    """root/annotations/instances_{split}.json; returns its path relative to root."""
    rel = f"annotations/instances_{split}.json"
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    coco = dict(info=dict(description=description, version=version), images=images,
                annotations=annotations, categories=categories)
    util.atomic_write(os.path.join(root, rel), json.dumps(coco).encode())
    return rel


def _build_splits(root, splits, render, seed, name, categories, version):
    """Render each (split, code, n) with render(rng) -> (uint8 [H,W,3], [(category_id, mask)])."""
    paths, files = {}, []
    for split, code, n in splits:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            pixels, objects = render(np.random.default_rng([seed, code, i]))
            file_name = f"{i:06d}.jpg"
            util.atomic_write(os.path.join(root, split, file_name), _encode_jpeg(pixels))
            images.append(dict(id=i + 1, file_name=file_name, width=pixels.shape[1], height=pixels.shape[0]))
            annotations += [mask_annotation(len(annotations) + 1 + j, i + 1, c, m)
                            for j, (c, m) in enumerate(objects)]
        rel = write_coco(root, split, images, annotations, categories, f"MAL synthetic {name} set ({split})",
                         version)
        paths[f"{split}_json"], paths[f"{split}_images"] = rel, split
        files += [rel] + [f"{split}/{im['file_name']}" for im in images]
    return paths, files


def _split_set(root, kind, version, categories, render, n_train, n_val, image_size, seed):
    """A synthetic set of `kind` under root (cached), its train and val splits drawn by
    render(rng, W, H): dict(train_json, train_images, val_json, val_images)."""
    (W, H), seed = (int(v) for v in image_size), int(seed)
    params = dict(kind=kind, version=version, n_train=int(n_train), n_val=int(n_val), image_size=[W, H],
                  seed=seed)
    splits = [("train", 0, int(n_train)), ("val", 1, int(n_val))]
    return cached_set(root, params, lambda r: _build_splits(r, splits, lambda g: render(g, W, H), seed, kind,
                                                            categories, version))


def _kept(objects, min_visible=0.4, min_area=24, min_side=4):
    """(category_id, visible mask) of the objects [(category_id, full, visible)] that stay
    recognisable: at least min_visible of them unoccluded, min_area px, a min_side × min_side box."""
    kept = []
    for cat_id, full, vis in objects:
        area, full_area = int(vis.sum()), int(full.sum())
        if full_area == 0 or area < min_visible * full_area or area < min_area:
            continue
        ys, xs = np.nonzero(vis.any(1))[0], np.nonzero(vis.any(0))[0]
        if xs[-1] - xs[0] + 1 < min_side or ys[-1] - ys[0] + 1 < min_side:
            continue
        kept.append((cat_id, vis))
    return kept


# ----------------------------------------------------------------------------------------------
# The demo: smooth backgrounds, 3-7 flat-coloured, non-convex, partly occluded objects per image,
# each in a colour clearly different from the background.

DEMO_CATEGORIES = [{"id": 1, "name": "blob"}, {"id": 2, "name": "star"}, {"id": 3, "name": "ring"},
                   {"id": 4, "name": "crescent"}, {"id": 5, "name": "ell"}]
_DEMO_VERSION = 1



def _random_colour(rng, lo=30, hi=225):
    return rng.uniform(lo, hi, size=3)


def _background(rng, W, H):
    """Smooth noise, a gradient or soft stripes of random colours, plus fine noise. float [H,W,3]."""
    base = _random_colour(rng, 50, 205)
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse random grid upsampled bicubically
        gh, gw = rng.integers(3, 7, size=2)
        grid = np.clip(base + rng.uniform(-40, 40, size=(gh, gw, 3)), 0, 255).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((W, H), Image.BICUBIC), dtype=np.float64)
    else:
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        ang = rng.uniform(0, np.pi)
        t = (xx * np.cos(ang) + yy * np.sin(ang)) / max(W, H)
        other = base + rng.uniform(-45, 45, size=3)
        if kind == 1:  # linear gradient
            w = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        else:  # soft stripes
            period = rng.uniform(0.08, 0.25)
            w = 0.5 + 0.5 * np.sin(2 * np.pi * t / period)
        bg = base + w[..., None] * (other - base)
    return bg + 4 * rng.standard_normal((H, W, 3), dtype=np.float32), base


def _polygon(rng, kind, r):
    """Shape outline(s) centred at 0: list of (points [n,2], fill) drawn in order (fill 0 = hole)."""
    if kind == "blob":  # perturbed radial function; low harmonics make it non-convex
        phi = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        rad = np.ones_like(phi)
        for k in (2, 3, 4, 5):
            rad += rng.uniform(0, 0.28) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        rad = r * np.clip(rad, 0.25, None) / rad.max()
        return [(np.stack([rad * np.cos(phi), rad * np.sin(phi)], 1), 1)]
    if kind == "star":
        n = int(rng.integers(5, 9))
        inner = rng.uniform(0.35, 0.6)
        phi = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        rad = r * np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return [(np.stack([rad * np.cos(phi), rad * np.sin(phi)], 1), 1)]
    phi = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    circle = np.stack([np.cos(phi), np.sin(phi)], 1)
    if kind == "ring":  # annulus with a hole (background shows through)
        ri = rng.uniform(0.45, 0.65)
        off = rng.uniform(-0.1, 0.1, size=2) * r
        return [(r * circle, 1), (ri * r * circle + off, 0)]
    if kind == "crescent":  # disk minus a shifted disk
        d = rng.uniform(0.35, 0.6) * r
        a = rng.uniform(0, 2 * np.pi)
        return [(r * circle, 1),
                (rng.uniform(0.85, 1.0) * r * circle + d * np.array([np.cos(a), np.sin(a)]), 0)]
    # "ell": an L-shape
    t = rng.uniform(0.35, 0.55)
    pts = np.array([(0, 0), (2, 0), (2, t), (t, t), (t, 2), (0, 2)], dtype=np.float64) - (2 + t) / 4
    return [(pts * r * 0.75, 1)]


def _shape_mask(rng, kind, cx, cy, r, W, H):
    aspect, ang = rng.uniform(0.65, 1.0), rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in _polygon(rng, kind, r):
        p = (pts * np.array([1.0, aspect])) @ rot.T + np.array([cx, cy])
        draw.polygon([tuple(q) for q in p.round(2).tolist()], fill=fill)
    return np.asarray(canvas) > 0


def _object_texture(rng, colour, xs, ys, W, H):
    """The object's own colour with a linear shading and mild noise at pixels (ys, xs). float [n,3]."""
    ang = rng.uniform(0, 2 * np.pi)
    shade = ((xs - W / 2) * np.cos(ang) + (ys - H / 2) * np.sin(ang)) / max(W, H) * rng.uniform(10, 30)
    return colour + shade[:, None] + rng.normal(0, 5, size=(len(xs), 3))


def _render_image(rng, W, H, n_objects):
    """One image and the visible masks of its objects: (uint8 [H,W,3], [(category_id, mask)])."""
    img, bg_colour = _background(rng, W, H)
    names = [c["name"] for c in DEMO_CATEGORIES]
    side = min(W, H)
    # Sizes from small to large (COCO: < 32², > 96² at 256x192): log-uniform radii, and half of the
    # images get one large object. Larger objects are drawn first, smaller ones on top.
    radii = np.exp(rng.uniform(np.log(0.035 * side), np.log(0.3 * side), size=n_objects))
    if rng.random() < 0.5:
        radii[0] = rng.uniform(0.4, 0.55) * side
    radii = np.sort(radii)[::-1]
    objects = []  # [category_id, full mask, visible mask]
    for r in radii:
        cat = int(rng.integers(len(names)))
        cx, cy = rng.uniform(0.08 * W, 0.92 * W), rng.uniform(0.08 * H, 0.92 * H)
        m = _shape_mask(rng, names[cat], cx, cy, r, W, H)
        for _ in range(20):  # a colour clearly different from the background (for the CRF)
            colour = _random_colour(rng)
            if np.linalg.norm(colour - bg_colour) > 110:
                break
        ys, xs = np.nonzero(m)
        img[ys, xs] = _object_texture(rng, colour, xs, ys, W, H)
        for o in objects:
            o[2] &= ~m  # occlusion: earlier objects keep only their visible part
        objects.append([DEMO_CATEGORIES[cat]["id"], m, m.copy()])
    return np.clip(np.round(img), 0, 255).astype(np.uint8), _kept(objects)


def make_demo(root, n_train=240, n_val=60, image_size=(256, 192), seed=0):
    """The demo set under root (cached): dict(train_json, train_images, val_json, val_images)."""
    render = lambda rng, W, H: _render_image(rng, W, H, int(rng.integers(3, 8)))  # noqa: E731
    return _split_set(root, "demo", _DEMO_VERSION, DEMO_CATEGORIES, render, n_train, n_val, image_size, seed)


def make_coco_like(root, n_images, size=(640, 480), boxes_per_image=7, seed=0):
    """COCO-like 640x480 JPEGs of the demo's kind with ~boxes_per_image boxes each (a few drop out by
    occlusion), for throughput benchmarks (cached): dict(json, images)."""
    (W, H), k, seed = (int(v) for v in size), int(boxes_per_image), int(seed)
    params = dict(kind="coco_like", version=_DEMO_VERSION, n_images=int(n_images), image_size=[W, H],
                  boxes_per_image=k, seed=seed)
    render = lambda rng: _render_image(rng, W, H, int(rng.integers(k, k + 1)))  # noqa: E731
    out = cached_set(root, params, lambda r: _build_splits(r, [("images", 2, int(n_images))], render, seed,
                                                           "coco-like", DEMO_CATEGORIES, _DEMO_VERSION))
    return dict(json=out["images_json"], images=out["images_images"])


# ----------------------------------------------------------------------------------------------
# The textured set: what the demo lacks and real images have. Textured and gradient backgrounds,
# objects that differ little from them (low contrast, their own texture), soft (blurred) edges, half
# the images grey, thin parts (limbs, bars, thin rings, worms), holes, and occlusion.

TEXTURED_CATEGORIES = [{"id": 1, "name": "blob"}, {"id": 2, "name": "holed"}, {"id": 3, "name": "thin ring"},
                       {"id": 4, "name": "branch"}, {"id": 5, "name": "worm"}, {"id": 6, "name": "dumbbell"}]
_TEXTURED_VERSION = 1


def _value_noise(rng, W, H, cells, channels=3):
    """Smooth noise in [-1, 1]: a cells-wide random grid, upsampled bicubically. float [H,W,channels]."""
    gw, gh = max(2, int(cells)), max(2, int(round(cells * H / W)))
    grid = rng.uniform(-1, 1, size=(gh, gw, channels))
    up = [np.asarray(Image.fromarray(grid[..., c].astype(np.float32), mode="F").resize((W, H), Image.BICUBIC))
          for c in range(channels)]
    return np.stack(up, -1).astype(np.float64)


def _octaves(rng, W, H, amplitude, coarsest=3, n=4):
    """Fractal noise: octaves of value noise, each twice as fine and half as strong."""
    return sum(amplitude * 0.5 ** o * _value_noise(rng, W, H, coarsest * 2 ** o) for o in range(n))


def _textured_background(rng, W, H):
    """Fractal noise, a strong gradient or a fine grating over a random colour. float [H,W,3]."""
    base = rng.uniform(40, 215) + rng.uniform(-25, 25, size=3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    if kind == 0:
        bg = base + _octaves(rng, W, H, rng.uniform(25, 50))
    elif kind == 1:
        ang = rng.uniform(0, 2 * np.pi)
        t = ((xx - W / 2) * np.cos(ang) + (yy - H / 2) * np.sin(ang)) / max(W, H)
        bg = base + rng.uniform(60, 110) * t[..., None] + _octaves(rng, W, H, 10)
    else:
        period, ang = rng.uniform(4, 12), rng.uniform(0, np.pi)
        t = xx * np.cos(ang) + yy * np.sin(ang)
        grating = (np.sin(2 * np.pi * t / period)
                   * np.sin(2 * np.pi * (t + 0.3 * xx - 0.5 * yy) / (1.7 * period)))
        bg = base + rng.uniform(8, 20) * grating[..., None] + _octaves(rng, W, H, 20)
    return bg + rng.uniform(2, 6) * rng.standard_normal((H, W, 3))


def _draw_textured_shape(rng, kind, cx, cy, r, W, H):
    """The bool mask [H,W] of one object of `kind` centred at (cx, cy), of radius about r."""
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    ang = rng.uniform(0, 2 * np.pi)
    thin = lambda: float(rng.uniform(2, max(2.5, min(6, 0.3 * r))))  # noqa: E731  a thin part's width, px

    def ellipse(x, y, a, b, fill=1):
        draw.ellipse([x - a, y - b, x + a, y + b], fill=fill)

    def blob(x, y, rad):
        phi = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        rr = np.ones_like(phi)
        for k in (2, 3, 4):
            rr += rng.uniform(0, 0.2) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        rr = rad * rr / rr.max()
        draw.polygon([(x + a * np.cos(p), y + a * np.sin(p)) for a, p in zip(rr, phi)], fill=1)

    if kind == "blob":
        blob(cx, cy, r)
    elif kind == "holed":  # a blob with one to three holes inside it
        blob(cx, cy, r)
        for _ in range(int(rng.integers(1, 4))):
            d, a = rng.uniform(0, 0.4) * r, rng.uniform(0, 2 * np.pi)
            ellipse(cx + d * np.cos(a), cy + d * np.sin(a), rng.uniform(0.12, 0.3) * r,
                    rng.uniform(0.12, 0.3) * r, 0)
    elif kind == "thin ring":
        w, b = thin(), r * rng.uniform(0.7, 1.0)
        ellipse(cx, cy, r, b)
        if b > 2 * w:
            ellipse(cx, cy, r - w, b - w, 0)
    elif kind == "branch":  # a core with three to five thin limbs
        ellipse(cx, cy, 0.35 * r, 0.35 * r)
        for a in ang + np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 6)))):
            L = rng.uniform(0.6, 1.0) * r
            draw.line([(cx, cy), (cx + L * np.cos(a), cy + L * np.sin(a))], fill=1,
                      width=max(2, round(thin())))
    elif kind == "worm":  # a thick, curving line
        t = np.linspace(-1, 1, 40)
        bend = rng.uniform(-0.6, 0.6) * np.sin(np.pi * (t * rng.uniform(0.5, 1.5) + rng.uniform(0, 1)))
        px, py = r * t, r * bend
        pts = [(cx + x * np.cos(ang) - y * np.sin(ang), cy + x * np.sin(ang) + y * np.cos(ang))
               for x, y in zip(px, py)]
        draw.line(pts, fill=1, width=max(3, round(rng.uniform(0.15, 0.35) * r)), joint="curve")
    else:  # dumbbell: two disks joined by a thin bar
        d, rad = 0.6 * r, rng.uniform(0.3, 0.4) * r
        ends = [(cx + s * d * np.cos(ang), cy + s * d * np.sin(ang)) for s in (-1, 1)]
        draw.line(ends, fill=1, width=max(2, round(thin())))
        for x, y in ends:
            ellipse(x, y, rad, rad)
    return np.asarray(canvas) > 0


def _render_textured(rng, W, H):
    """One textured-set image and the visible masks of its objects."""
    img = _textured_background(rng, W, H)
    names = [c["name"] for c in TEXTURED_CATEGORIES]
    side = min(W, H)
    n = int(rng.integers(3, 8))
    radii = np.exp(rng.uniform(np.log(0.04 * side), np.log(0.3 * side), size=n))
    if rng.random() < 0.4:
        radii[0] = rng.uniform(0.35, 0.5) * side
    objects = []  # [category_id, full mask, visible mask], larger ones drawn first
    for r in np.sort(radii)[::-1]:
        cat = int(rng.integers(len(names)))
        cx, cy = rng.uniform(0.08 * W, 0.92 * W), rng.uniform(0.08 * H, 0.92 * H)
        m = _draw_textured_shape(rng, names[cat], cx, cy, r, W, H)
        if not m.any():
            continue
        # Low contrast: the object's luminance a little above or below the background under it.
        under = img[m].mean(0)
        colour = under + rng.choice([-1, 1]) * rng.uniform(25, 80) + rng.uniform(-20, 20, size=3)
        obj = colour + _octaves(rng, W, H, rng.uniform(4, 14), coarsest=6, n=3)
        sigma = 0.0 if rng.random() < 0.25 else rng.uniform(0.7, 2.5)  # soft edges
        alpha = np.asarray(Image.fromarray((m * 255).astype(np.uint8))
                           .filter(ImageFilter.GaussianBlur(sigma)),
                           dtype=np.float64)[..., None] / 255 if sigma else m[..., None].astype(np.float64)
        img = img * (1 - alpha) + obj * alpha
        for o in objects:
            o[2] &= ~m
        objects.append([TEXTURED_CATEGORIES[cat]["id"], m, m.copy()])
    if rng.random() < 0.5:  # a grey image
        img = np.repeat(img @ np.array([0.299, 0.587, 0.114]), 3).reshape(H, W, 3)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), _kept(objects)


def make_textured(root, n_train=240, n_val=60, image_size=(256, 192), seed=0):
    """The textured set under root (cached): dict(train_json, train_images, val_json, val_images)."""
    return _split_set(root, "textured", _TEXTURED_VERSION, TEXTURED_CATEGORIES, _render_textured, n_train,
                      n_val, image_size, seed)


# ----------------------------------------------------------------------------------------------
# The clutter set: what makes a box a weak cue in photos. Objects in groups that touch and overlap
# (a box holds parts of its neighbours), cluttered textured backgrounds strewn with distractor
# shapes in the objects' own colours (unlabelled, inside and outside the boxes), shading across each
# object, non-convex shapes (C, L, rings, stars, crescents), and sizes from tiny to half the image,
# small ones also at the image's edge, cut by it.

CLUTTER_CATEGORIES = [{"id": 1, "name": "blob"}, {"id": 2, "name": "star"}, {"id": 3, "name": "ring"},
                      {"id": 4, "name": "crescent"}, {"id": 5, "name": "ell"}, {"id": 6, "name": "C"}]
_CLUTTER_VERSION = 1


def _polygon_mask(pts, W, H):
    """The bool mask [H,W] inside the polygon pts [n,2] (x, y)."""
    canvas = Image.new("L", (W, H), 0)
    ImageDraw.Draw(canvas).polygon([tuple(q) for q in pts.round(2).tolist()], fill=1)
    return np.asarray(canvas) > 0


def _clutter_shape(rng, kind, cx, cy, r, W, H):
    """The bool mask [H,W] of one object: the demo's shapes, and a C (a thick arc, open on one side)."""
    if kind != "C":
        return _shape_mask(rng, kind, cx, cy, r, W, H)
    gap, width, ang = rng.uniform(0.5, 1.4), rng.uniform(0.3, 0.55), rng.uniform(0, 2 * np.pi)
    phi = ang + np.linspace(gap / 2, 2 * np.pi - gap / 2, 48)
    outer = np.stack([np.cos(phi), np.sin(phi)], 1) * r
    inner = outer[::-1] * (1 - width)
    aspect = rng.uniform(0.7, 1.0)
    return _polygon_mask(np.concatenate([outer, inner]) * np.array([1.0, aspect]) + np.array([cx, cy]), W, H)


def _shaded(rng, colour, m, W, H):
    """The object's colour lit from one side across its own extent (darker by up to half on the far
    side), with fine noise: float [n,3] at the pixels of m."""
    ys, xs = np.nonzero(m)
    a = rng.uniform(0, 2 * np.pi)
    t = (xs - xs.mean()) * np.cos(a) + (ys - ys.mean()) * np.sin(a)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    light = 1 - rng.uniform(0.2, 0.5) * t
    return colour * light[:, None] + rng.normal(0, 4, size=(len(xs), 3))


def _render_clutter(rng, W, H):
    """One clutter-set image and the visible masks of its objects."""
    names = [c["name"] for c in CLUTTER_CATEGORIES]
    side = min(W, H)
    img = _textured_background(rng, W, H)
    palette = [_random_colour(rng) for _ in range(int(rng.integers(2, 4)))]  # objects' and distractors'
    for _ in range(int(rng.integers(6, 15))):  # distractors: unlabelled shapes in the objects' colours
        r = np.exp(rng.uniform(np.log(0.03 * side), np.log(0.2 * side)))
        kind, cx, cy = names[int(rng.integers(len(names)))], rng.uniform(0, W), rng.uniform(0, H)
        m = _clutter_shape(rng, kind, cx, cy, r, W, H)
        if m.any():
            img[m] = _shaded(rng, palette[int(rng.integers(len(palette)))], m, W, H)
    n = int(rng.integers(4, 10))
    radii = np.exp(rng.uniform(np.log(0.03 * side), np.log(0.3 * side), size=n))
    if rng.random() < 0.4:
        radii[0] = rng.uniform(0.35, 0.5) * side
    objects, centres = [], []  # [category_id, full mask, visible mask], larger ones drawn first
    for r in np.sort(radii)[::-1]:
        where = rng.random()
        if centres and where < 0.55:  # beside an earlier object, touching or overlapping it
            (px, py, pr) = centres[int(rng.integers(len(centres)))]
            d, a = rng.uniform(0.5, 1.1) * (pr + r), rng.uniform(0, 2 * np.pi)
            cx, cy = px + d * np.cos(a), py + d * np.sin(a)
        elif r < 0.1 * side and where < 0.8:  # a small one at the edge, perhaps cut by it
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
            edge = int(rng.integers(4))
            off = rng.uniform(-0.3, 1.0) * r
            cx, cy = ((off, cy), (W - off, cy), (cx, off), (cx, H - off))[edge]
        else:
            cx, cy = rng.uniform(0.05 * W, 0.95 * W), rng.uniform(0.05 * H, 0.95 * H)
        cat = int(rng.integers(len(names)))
        m = _clutter_shape(rng, names[cat], cx, cy, r, W, H)
        if not m.any():
            continue
        img[m] = _shaded(rng, palette[int(rng.integers(len(palette)))], m, W, H)
        for o in objects:
            o[2] &= ~m
        objects.append([CLUTTER_CATEGORIES[cat]["id"], m, m.copy()])
        centres.append((cx, cy, r))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), _kept(objects)


def make_clutter(root, n_train=240, n_val=60, image_size=(256, 192), seed=0):
    """The clutter set under root (cached): dict(train_json, train_images, val_json, val_images)."""
    return _split_set(root, "clutter", _CLUTTER_VERSION, CLUTTER_CATEGORIES, _render_clutter, n_train, n_val,
                      image_size, seed)


# ----------------------------------------------------------------------------------------------
# The glow set: what fluorescence microscopy shows. Bright objects on a dark, uneven, noisy
# background, brightest inside and fading out through the optics' blur (σ 1-3.5 px), so that no
# colour edge marks where the drawn outline lies; each object's brightness its own, some dimmer than
# others' halos; cells in clusters that touch, some dividing (two lobes), some kidney-shaped; small
# ones by the dozen. The mask is the drawn outline, under the blur.

GLOW_CATEGORIES = [{"id": 1, "name": "cell"}, {"id": 2, "name": "dividing"}, {"id": 3, "name": "kidney"}]
_GLOW_VERSION = 1


def _cell(rng, cx, cy, r, W, H):
    """A nucleus-like bool mask [H,W]: an ellipse (axes 1 : 0.6-1) with a gently wavy outline."""
    phi = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    rad = r * (1 + sum(rng.uniform(0, 0.08) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)))
    ang, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    x, y = rad * np.cos(phi), aspect * rad * np.sin(phi)
    return _polygon_mask(np.stack([cx + x * np.cos(ang) - y * np.sin(ang),
                                   cy + x * np.sin(ang) + y * np.cos(ang)], 1), W, H)


def _glow_shape(rng, kind, cx, cy, r, W, H):
    """The bool mask [H,W] of one object: a nucleus-like cell, two touching lobes (a dividing cell), or a
    kidney (a cell with a bite out of one side)."""
    a = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(a), np.sin(a)])
    if kind == "dividing":
        d = rng.uniform(0.55, 0.75) * r
        return (_cell(rng, cx + d * u[0], cy + d * u[1], 0.65 * r, W, H)
                | _cell(rng, cx - d * u[0], cy - d * u[1], 0.65 * r, W, H))
    m = _cell(rng, cx, cy, r, W, H)
    if kind == "kidney":
        yy, xx = np.mgrid[0:H, 0:W]
        bx, by = cx + 1.1 * r * u[0], cy + 1.1 * r * u[1]
        m &= (xx - bx) ** 2 + (yy - by) ** 2 > (rng.uniform(0.5, 0.7) * r) ** 2
    return m


def _blur(a, sigma):
    """A Gaussian blur of float [H,W] (edges extended), separable."""
    k = np.exp(-0.5 * (np.arange(-int(3 * sigma + 1), int(3 * sigma + 1) + 1) / sigma) ** 2)
    k /= k.sum()
    row = lambda v: np.convolve(np.pad(v, len(k) // 2, mode="edge"), k, "valid")  # noqa: E731
    for axis in (0, 1):
        a = np.apply_along_axis(row, axis, a)
    return a


def _render_glow(rng, W, H):
    """One glow-set image and the visible masks of its objects."""
    names = [c["name"] for c in GLOW_CATEGORIES]
    side = min(W, H)
    light = np.zeros((H, W))
    n = int(rng.integers(5, 16))
    radii = np.exp(rng.uniform(np.log(0.025 * side), np.log(0.15 * side), size=n))
    objects, centres = [], []
    for r in np.sort(radii)[::-1]:
        if centres and rng.random() < 0.4:  # in a cluster: touching an earlier one
            px, py, pr = centres[int(rng.integers(len(centres)))]
            d, a = rng.uniform(0.8, 1.05) * (pr + r), rng.uniform(0, 2 * np.pi)
            cx, cy = px + d * np.cos(a), py + d * np.sin(a)
        else:
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        cat = int(rng.choice(len(names), p=[0.7, 0.15, 0.15]))
        m = _glow_shape(rng, names[cat], cx, cy, r, W, H)
        if not m.any():
            continue
        # Brightest at the centre, down to a fraction of it at the outline, with chromatin-like grain.
        ys, xs = np.nonzero(m)
        d2 = ((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2) / max(r, 1.0) ** 2
        peak = rng.uniform(60, 230)
        fade = 1 - rng.uniform(0.3, 0.6) * np.clip(d2, 0, 1)
        light[m] = peak * fade * (1 + 0.12 * rng.standard_normal(len(xs)))
        for o in objects:
            o[2] &= ~m
        objects.append([GLOW_CATEGORIES[cat]["id"], m, m.copy()])
        centres.append((cx, cy, r))
    light = _blur(light, rng.uniform(1.0, 3.5))
    background = rng.uniform(5, 35) + _octaves(rng, W, H, rng.uniform(3, 10), coarsest=2, n=3)[..., 0]
    grey = background + light
    grey = grey + np.sqrt(np.maximum(grey, 0)) * rng.uniform(0.3, 1.2) * rng.standard_normal((H, W))
    tint = [np.ones(3), np.array([0.1, 1.0, 0.2]), np.array([1.0, 0.2, 1.0]), np.array([0.2, 0.5, 1.0])][
        int(rng.integers(4))]  # grey, or a fluorophore's colour
    return np.clip(np.round(grey[..., None] * tint), 0, 255).astype(np.uint8), _kept(objects)


def make_glow(root, n_train=240, n_val=60, image_size=(256, 192), seed=0):
    """The glow set under root (cached): dict(train_json, train_images, val_json, val_images)."""
    return _split_set(root, "glow", _GLOW_VERSION, GLOW_CATEGORIES, _render_glow, n_train, n_val, image_size,
                      seed)


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    p = argparse.ArgumentParser(description="Make (or reuse) a synthetic COCO-format set with GT masks.",
                                formatter_class=options.HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("demo", "the demo set: flat-coloured shapes"),
                       ("textured", "textured backgrounds, soft edges, low contrast, "
                                    "grey images, thin parts, holes"),
                      ("clutter", "touching and overlapping objects, cluttered backgrounds with "
                                  "distractors of the objects' colours, shading, objects at the edge"),
                      ("glow", "soft-edged bright objects on dark, noisy backgrounds, as fluorescence "
                               "shows them")):
        s = sub.add_parser(name, help=what, formatter_class=options.HelpFormatter)
        s.add_argument("--out", required=True, help="output folder (reused when already complete)")
        s.add_argument("--n-train", type=int, default=240, help="number of training images")
        s.add_argument("--n-val", type=int, default=60, help="number of validation images")
        s.add_argument("--seed", type=int, default=0, help="generator seed")
        s.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("W", "H"), help="image size")
    c = sub.add_parser("coco-like", help="640x480 images with ~7 boxes each, for benchmarks",
                       formatter_class=options.HelpFormatter)
    c.add_argument("--out", required=True, help="output folder (reused when already complete)")
    c.add_argument("--n", type=int, default=100, help="number of images")
    c.add_argument("--seed", type=int, default=0, help="generator seed")
    args = p.parse_args(argv)
    if args.cmd == "coco-like":
        out = make_coco_like(args.out, args.n, seed=args.seed)
    else:
        make = dict(demo=make_demo, textured=make_textured, clutter=make_clutter, glow=make_glow)[args.cmd]
        out = make(args.out, args.n_train, args.n_val, tuple(args.size), args.seed)
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
