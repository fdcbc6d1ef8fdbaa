"""label.py: a mask for every box. Turns COCO boxes (ground truth or detector output) into a COCO
instances JSON with an RLE mask per box, using a trained MAL checkpoint, or with --encoder, no
training, a pretrained encoder's features and the box alone (predictor.BoxPrompted), or with both,
whichever of the two labels the boxes better by its masks' mask_score (the encoder on photos).

  python label.py --ckpt demo/run/last.pt --json boxes.json --images DIR --out labels.json [--eval]
  python label.py --encoder dinov2_vits14 --json boxes.json --images DIR --out labels.json
  python label.py --ckpt demo/run/last.pt --encoder dinov2_vits14 ...   # the better of the two, chosen
  torchrun --nproc_per_node 8 label.py ...          # shards images over ranks; rank 0 merges
  python label.py                                   # the demo: label demo/data's val set, evaluate

Work is committed in chunks (a fixed block of sorted image ids each) under OUT.parts/, so a rerun of
the same command after a crash or kill -9 skips what is done, with any world size, and the merged
output is byte-identical to an uninterrupted run; Ctrl-C or SIGTERM also keeps the boxes of the chunk at
hand whose batch has run. No box is lost silently: one that cannot be labeled
keeps its box, gets no `segmentation`, and is listed with its reason in OUT's .report.json.

Memory does not grow with the input beyond ~100 bytes a box: the boxes are read once into a box index
cached beside the JSON (coco.box_index, mapped by every rank), and OUT, its report and review list are
written entry by entry from the chunks; --format, --vis and --review read OUT back through its own
index (OUT.index beside it, as export.py does), an image or an annotation at a time. --eval alone reads
OUT whole, with the GT masks it needs.

Every mask gets a `mask_score` in [0, 1], an estimate of its IoU with the object (predictor.mask_score);
OUT's .review.json lists the masks lowest score first, --review N draws the N lowest for a person to
check, and --eval says how well the score ranks the masks by their true IoU.

The label-time settings come from the checkpoint (recipes.LabelSettings) unless given as flags or as
--recipe items.
"""
import options

if __name__ == "__main__":
    options.label_parser().parse_known_args()  # --help answers before torch loads

import array
import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import coco
import evaluation
import export
import predictor
import recipes
import synthetic
import util

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ("expand", "thr", "flip", "crf_refine")  # LabelSettings' fields with a flag (--recipe: the rest)

# ----------------------------------------------------------------------------------------------
# Files: the fingerprint of a parts folder, its chunks, the side files of OUT


# --ckpt with --encoder: the labeler is chosen on this many of the boxes (all of them, where fewer); the
# encoder labels where its masks' mean mask_score is at least ENCODER_MARGIN above the trained network's.
# Its scores run high against the network's (QUALITY.md), and a wrong choice of it costs more than a
# wrong choice of the network: 0.16 mIoU on the demo set against 0.05 on the photos.
CHOICE_BOXES = 512
ENCODER_MARGIN = 0.02

# Options that change the labels; a parts folder made with other values must not be merged.
FINGERPRINT_OPTS = ("net", "expand", "thr", "flip", "crf_refine", "crf_iters", "crf_size", "zeta", "omega",
                    "tau", "score_thr", "chunk_images")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 22), b""):
            h.update(blk)
    return h.hexdigest()


def fingerprint(args, device, encoder_settings=None):
    cfg = {k: getattr(args, k) for k in FINGERPRINT_OPTS}
    if not args.crf_refine:
        cfg["crf_iters"] = 0  # no refinement: its iteration count does not matter
    if encoder_settings is not None:  # --ckpt with --encoder: either may label (the choice: labeler.json)
        cfg["encoder_sha256"] = file_sha256(args.encoder)
        cfg["encoder_settings"] = dataclasses.asdict(encoder_settings)
    cfg["mask_score"] = predictor.MASK_SCORE  # parts scored otherwise (or not at all) do not mix with these
    cfg["device"] = torch.device(device).type  # cpu float32 and cuda bf16 give different pixels
    cfg["ckpt_sha256"] = file_sha256(args.ckpt or args.encoder)
    cfg["json_sha256"] = file_sha256(args.json)
    cfg["images_json_sha256"] = file_sha256(args.images_json) if args.images_json else None
    cfg["images"] = os.path.realpath(args.images)
    return cfg


def chunk_path(parts, k):
    return os.path.join(parts, f"chunk{k:06d}.json")


def partial_path(parts, k):
    """The boxes of chunk k that a stopped run finished: a rerun labels only the others."""
    return os.path.join(parts, f"chunk{k:06d}.partial.json")


def read_results(path):
    """{ann_id: result} of a chunk file ({} where there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(a): r for a, r in json.load(f)["results"].items()}


def write_results(path, k, results):
    chunk = {"chunk": int(k), "results": {str(a): r for a, r in sorted(results.items())}}
    util.atomic_write(path, json.dumps(chunk, separators=(",", ":")).encode("ascii"))  # the C encoder: fast


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


# ----------------------------------------------------------------------------------------------
# The command line


def get_args(argv):
    p = options.label_parser()
    args = p.parse_args(argv)
    try:  # checked now; applied over the checkpoint's settings (resolve_settings)
        recipes.LabelSettings().updated(args.recipe)
    except ValueError as e:
        p.error(f"--recipe {e}")
    missing = ([] if args.ckpt or args.encoder else ["--ckpt (or --encoder)"]) + [
        f"--{k.replace('_', '-')}" for k in ("json", "images", "out") if getattr(args, k) is None]
    if missing:
        p.error(f"{', '.join(missing)} needed (or no arguments at all, for the demo)")
    if args.chunk_images < 1 or args.batch_size < 1:
        p.error("--chunk-images and --batch-size must be >= 1")
    # where --format's files go; the RLE labels (and their side files) go to args.out
    args.export_to = args.out
    if args.format == "coco-polygons":
        args.out = util.side_file(args.out, ".rle.json")
    elif args.format in ("yolo", "png"):
        args.out = os.path.join(args.out, "labels.json")
    return args


def demo_argv():
    """The demo's command line; trains demo/run/last.pt first (python train.py) if it is absent, or
    finishes it (--demo --resume) where a stopped run left it short of its last epoch."""
    d = synthetic.make_demo(recipes.DEMO_ROOT)
    ckpt = os.path.join(recipes.DEMO_DATA["out"], "last.pt")
    if int(os.environ.get("RANK", "0")) == 0:
        ck = predictor.load_checkpoint(ckpt, mmap=True) if os.path.exists(ckpt) else None
        flags = [] if ck is None else ["--demo", "--resume"] if ck["epoch"] < ck["args"]["epochs"] else None
        if flags is not None:
            print(f"label.py: {ckpt} {'not found' if ck is None else 'unfinished'}; training it with "
                  f"`{' '.join(['python train.py', *flags])}`", file=sys.stderr)
            # Ctrl-C reaches train.py too: it saves last.pt and says how to continue; this waits for it.
            ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                status = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *flags]).returncode
            finally:
                signal.signal(signal.SIGINT, ignored)
            if status:
                sys.exit(status)
    return ["--ckpt", ckpt, "--json", d["val_json"], "--images", d["val_images"],
            "--out", os.path.join(recipes.DEMO_HOME, "labels.json"), "--vis", "8", "--review", "8", "--eval",
            "--crf-refine"]


def check_inputs(args):
    """A missing input is a one-line error naming it, before anything reads (or hashes) it; so is a
    format whose optional extra (OpenCV) is missing, before any labeling."""
    if args.encoder:  # a public encoder's name: its file, downloaded once (every rank: the rename is atomic)
        try:
            args.encoder = util.pretrained_file(args.encoder)
        except util.InputError as e:
            raise util.InputError(f"--encoder {e}") from None
    for flag, path, folder in (("--ckpt", args.ckpt, False), ("--encoder", args.encoder, False),
                               ("--json", args.json, False),
                               ("--images-json", args.images_json, False), ("--images", args.images, True)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise util.InputError(f"{flag} {path} not found")
        if os.path.isdir(path) != folder:
            raise util.InputError(f"{flag} {path} is {'not ' if folder else ''}a folder")
    if args.format in ("coco-polygons", "yolo"):
        export.needs(args.format)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)


def resolve_settings(args, ck, record=True):
    """The LabelSettings to label with: each flag or --recipe item given wins over the checkpoint's own
    (or the encoder's, load_encoder's ck); said in one line. record: the fingerprint reads them off args."""
    saved, recommended = recipes.checkpoint_settings(ck)
    given = [k for k in SETTINGS if getattr(args, k) is not None]
    settings = dataclasses.replace(saved, **{k: getattr(args, k) for k in given}).updated(args.recipe)
    if record:
        for f in dataclasses.fields(settings):
            setattr(args, f.name, getattr(settings, f.name))
    given = [f"--{k.replace('_', '-')}" for k in given] + [f"--recipe {item}" for item in args.recipe]
    whose = "--encoder's settings" if "encoder" in ck else "from the checkpoint's recipe"
    print(f"label.py: {'--encoder: ' if 'encoder' in ck and args.ckpt else ''}{settings.describe()}"
          + (f"; {whose} except {', '.join(given)}" if given else f"; {whose}" if recommended else ""),
          file=sys.stderr)
    return settings


# ----------------------------------------------------------------------------------------------
# The run: label this rank's chunks, merge on rank 0, write OUT and its side files.


def open_parts(args, d, n_chunks, encoder_settings=None):
    """OUT.parts/, made (or checked to be) this configuration's; the chunks already done."""
    parts = args.out + ".parts"
    cfg = fingerprint(args, d.device, encoder_settings)
    if d.rank == 0:  # one configuration per parts folder: rank 0 records it, every rank checks it
        if args.fresh and os.path.isdir(parts):
            shutil.rmtree(parts)
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(os.path.join(parts, "fingerprint.json")):
            util.write_json(os.path.join(parts, "fingerprint.json"), cfg)
    util.barrier(d)
    with open(os.path.join(parts, "fingerprint.json")) as f:
        old = json.load(f)
    if old != cfg:
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        raise util.InputError(f"{parts} holds parts of another configuration "
                              f"(differs in: {', '.join(diff)}); rerun with --fresh or delete it")
    done = {k for k in range(n_chunks) if os.path.exists(chunk_path(parts, k))}
    util.barrier(d)  # everyone has listed `done` before anyone writes a new chunk
    if done and d.rank == 0:
        print(f"label.py: resuming: {len(done)}/{n_chunks} chunks already done", file=sys.stderr)
    return parts, done


def select_boxes(args, d):
    """The box index of --json (built by rank 0 when it is not cached), the rows the output holds
    (those --score-thr keeps), those among them that can be labeled, and the image rows that have
    some, by image id: the chunks are blocks of these."""
    if d.rank == 0:
        coco.box_index(args.json, args.images_json, what="--json", images_what="--images-json")
    util.barrier(d)
    index = coco.box_index(args.json, args.images_json, what="--json", images_what="--images-json")
    kept = np.ones(len(index), dtype=bool)
    if args.score_thr is not None:  # only boxes that carry a score are filtered
        kept = np.isnan(index.ann_score) | (index.ann_score >= args.score_thr)
    labelable = kept & index.labelable()
    return index, kept, labelable, index.images_of(labelable)


def choose_labeler(args, d, labelers, index, labelable, parts):
    """--ckpt with --encoder: which of labelers {"network": (ck, settings), "encoder": (ck, settings)}
    labels the boxes, by their masks' mean mask_score (an estimate of their IoU; the encoder's must be
    ENCODER_MARGIN higher) on up to CHOICE_BOXES of the boxes spread evenly over them, both scored on the
    network's CRF grid (on its coarser patch grid the encoder's masks would score higher than the same
    masks on a finer one); and that comparison. Rank 0 labels the sample with each and keeps the choice
    in the parts folder, so that every rank and a resumed run label with the same one. On photos the
    encoder's masks score higher, on the synthetic and microscopy sets the trained network's: each where
    its masks are the better ones (QUALITY.md)."""
    path = os.path.join(parts, "labeler.json")
    if d.rank == 0 and not os.path.exists(path):
        rows = np.flatnonzero(labelable)
        sample = np.zeros_like(labelable)
        sample[rows[np.unique(np.linspace(0, len(rows) - 1, min(CHOICE_BOXES, len(rows))).round()
                              .astype(np.int64))] if len(rows) else []] = True
        img_rows = index.images_of(sample)
        score = {}
        for name, (ck, settings) in labelers.items():
            nets = predictor.build_nets(ck, settings.net, d.device, args.ckpt)
            prog = Progress(len(img_rows), int(sample.sum()), f"choose: {name}", quiet=args.quiet)
            stream = predictor.LabelStream(nets, settings, d.device, batch_size=args.batch_size,
                                           threads=args.threads, progress=prog,
                                           score_size=labelers["network"][1].crf_size)
            scores = [r["mask_score"] for _, res in stream.run(coco.ImageEntries(index, img_rows),
                                                                coco.BoxesByImage(index, sample), args.images,
                                                                workers=args.workers)
                      for r in res.values() if "mask_score" in r]
            prog.update(force=True)
            score[name], scored = (float(np.mean(scores)) if scores else 0.0), len(scores)
        best = "encoder" if score["encoder"] >= score["network"] + ENCODER_MARGIN else "network"
        util.write_json(path, {"labeler": best, "boxes": scored, "mean_mask_score": score,
                               "encoder_margin": ENCODER_MARGIN})
    util.barrier(d)
    with open(path) as f:
        choice = json.load(f)
    if d.rank == 0:
        score, which = choice["mean_mask_score"], choice["labeler"]
        print(f"label.py: labeling with the {'--encoder' if which == 'encoder' else 'trained network'}: "
              f"mean mask_score on {choice['boxes']} of the boxes {score['encoder']:.3f} for --encoder's "
              f"masks, {score['network']:.3f} for the network's (the encoder labels from "
              f"{ENCODER_MARGIN:g} higher)", file=sys.stderr, flush=True)
    return choice


def label_chunks(args, d, ck, settings, index, labelable, img_rows, mine, parts, stop):
    """Label this rank's chunks, each written to OUT.parts/ as soon as its images are done; the images
    and their boxes are read from the index as the loader reaches them. On SIGINT or SIGTERM (stop), the
    boxes done in the chunk at hand go to its .partial.json, all but less than a batch, and a rerun
    labels only the rest."""
    nets = predictor.build_nets(ck, settings.net, d.device, args.ckpt)
    kept = {k: read_results(partial_path(parts, k)) for k in mine}
    todo = labelable.copy()
    done = [a for r in kept.values() for a in r]
    if done:
        todo[index.rows_of_ids(done)] = False
    per_image = np.bincount(index.ann_img_row[todo], minlength=index.n_images)
    blocks = [img_rows[k * args.chunk_images:(k + 1) * args.chunk_images] for k in mine]
    blocks = [b[per_image[b] > 0] for b in blocks]  # images with boxes left
    for k, b in zip(mine, blocks):
        if not len(b):  # a stopped run had finished all its boxes
            write_results(chunk_path(parts, k), k, kept[k])
    order = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    groups = np.repeat(np.asarray(mine, dtype=np.int64), [len(b) for b in blocks])
    prog = Progress(len(order), int(per_image[order].sum()),
                    "label" if d.world == 1 else f"label[rank {d.rank}]", quiet=args.quiet)
    stream = predictor.LabelStream(nets, settings, d.device, batch_size=args.batch_size, threads=args.threads,
                                   progress=prog)
    written = 0
    stop.looping, stop.rank = True, d.rank
    for k, res in stream.run(coco.ImageEntries(index, order), coco.BoxesByImage(index, todo), args.images,
                             groups=groups, workers=args.workers, stop=lambda: stop.signum):
        k = int(k)
        write_results(partial_path(parts, k) if k == stream.partial else chunk_path(parts, k), k,
                      {**kept[k], **res})
        written += len(res)
        if k != stream.partial and os.path.exists(partial_path(parts, k)):
            os.remove(partial_path(parts, k))
    stop.looping = False
    prog.update(force=True)
    if stop.signum:
        stop.exit(stop.signum, f"{written} more boxes labeled, kept in {parts}")


class ChunkResults:
    """The chunks' results gathered into one file (OUT.parts/results.bin), read back by index row:
    get(row) is that box's result, None where it has none (it was not labelable)."""

    def __init__(self, index, labelable, n_chunks, parts):
        self.offsets = np.full(len(index), -1, dtype=np.int64)
        self.lengths = np.zeros(len(index), dtype=np.int32)
        self.path, pos = os.path.join(parts, "results.bin"), 0
        with open(self.path, "wb") as f:
            for k in range(n_chunks):
                p = chunk_path(parts, k)
                if not os.path.exists(p):
                    raise util.InputError(f"{p} missing after all ranks finished (a rank failed?); rerun to "
                                          f"resume")
                res = read_results(p)
                for row, r in zip(index.rows_of_ids(list(res)), res.values()):
                    b = json.dumps(r, separators=(",", ":")).encode("ascii")
                    f.write(b)
                    self.offsets[row], self.lengths[row] = pos, len(b)
                    pos += len(b)
        missing = labelable & (self.offsets < 0)
        if missing.any():
            raise RuntimeError(f"annotations {index.ann_id[missing][:10].tolist()} got no result")
        self.f = open(self.path, "rb", buffering=0)

    def get(self, row):
        if self.offsets[row] < 0:
            return None
        return json.loads(os.pread(self.f.fileno(), int(self.lengths[row]), int(self.offsets[row])).decode())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# The summary line names this many distinct unlabeled reasons; the report lists them all.
NAMED_UNLABELED = 3


def unlabeled_name(ann_id, reason):
    """One unlabeled box's reason as the summary line names it: an image's failure ("<path>: why") by
    the image's file name, shared by all its boxes; a box's own problem by the box's id."""
    head, _, why = reason.partition(": ")
    return f"{os.path.basename(head)}: {why}" if why and os.sep in head else f"box {ann_id}: {reason}"


def write_outputs(args, index, kept, labelable, results, choice=None):
    """OUT, OUT.review.json and OUT.report.json, each written entry by entry (choice: choose_labeler's,
    in the report's summary); returns the report's summary
    and the first NAMED_UNLABELED distinct unlabeled reasons (unlabeled_name) with their box counts
    ({name: count}, in output order; one more key, None, when there are further reasons)."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    given, empty, n_unlabeled = collections.Counter(), array.array("q"), 0
    named = {}
    scored = {k: array.array(t) for k, t in (("id", "q"), ("image_id", "q"), ("mask_score", "d"))}
    with util.atomic_file(args.out, "w") as f, tempfile.TemporaryFile("w+", dir=args.out + ".parts") as spool:
        for a, r in coco.write_labels(f, index, np.flatnonzero(kept), results.get, args.unlabeled_as):
            if "reason" in r:
                u = {"id": a["id"], "image_id": a["image_id"], "reason": r["reason"]}
                if args.unlabeled_as == "box":  # the mask it got instead of MAL's
                    u["mask"] = ("none: image size unknown" if "segmentation" not in a
                                 else "filled box" if a["area"] else "empty")
                    given[u["mask"]] += 1
                name = unlabeled_name(a["id"], r["reason"])
                if name in named or len(named) < NAMED_UNLABELED:
                    named[name] = named.get(name, 0) + 1
                else:
                    named[None] = 0
                spool.write(("," if n_unlabeled else "") + dumps(u))
                n_unlabeled += 1
            elif a.get("area") == 0 and "segmentation" in a:
                empty.append(a["id"])
            if "mask_score" in a:
                for k, v in scored.items():
                    v.append(a[k])
        n_boxes = int(kept.sum())
        summary = {"input": args.json, "boxes": n_boxes, "labelable": int(labelable.sum()),
                   "labeled": n_boxes - n_unlabeled, "unlabeled": n_unlabeled, "empty_masks": len(empty),
                   "filtered_by_score": len(index) - n_boxes}
        if given:
            summary["unlabeled_masks"] = dict(given)
        if choice is not None:
            summary["labeler"] = choice
        with util.atomic_file(util.side_file(args.out, ".report.json"), "w") as g:
            g.write('{"summary":' + dumps(summary) + ',"unlabeled":[')
            spool.seek(0)
            shutil.copyfileobj(spool, g)
            g.write('],"empty_masks":[' + ",".join(str(i) for i in empty) + "]}")
    ids, image_ids, scores = (np.frombuffer(scored[k], t) for k, t in (("id", np.int64),
                                                                        ("image_id", np.int64),
                                                                        ("mask_score", np.float64)))
    # lowest score first, then by id
    with util.atomic_file(util.side_file(args.out, ".review.json"), "w") as g:
        for n, i in enumerate(np.lexsort((ids, scores))):
            g.write(("[" if n == 0 else ",") + dumps({"id": int(ids[i]), "image_id": int(image_ids[i]),
                                                      "mask_score": float(scores[i])}))
        g.write("]" if len(ids) else "[]")
    return summary, named


def write_extras(args, d, ck, index):
    """--eval, then --vis, --review and --format (export.write_requested, as export.py: OUT read through
    its own index, an image or an annotation at a time)."""
    if args.eval:
        if not index.has_gt:
            print("label.py: --eval: no GT masks in the input; skipped", file=sys.stderr)
        else:
            # Read whole, with the GT: COCOeval holds every GT and labeled mask anyway, and --eval is for
            # sets that have GT masks, not for labeling at scale.
            out = util.read_json(args.out, "--out")
            gt = util.read_json(args.json if index.kind == "instances" else args.images_json, "GT JSON")
            r = evaluation.evaluate(gt, out, match_ids=index.kind == "instances")
            net = predictor.build_nets(ck, "task", d.device, args.ckpt)[0]
            r["clustering_score"], r["clustering_tokens"] = evaluation.clustering(net, gt, args.images,
                                                                                  d.device)
            util.write_json(util.side_file(args.out, ".eval.json"), r)
            print(evaluation.format_eval(r))
            whose = "--encoder's" if "encoder" in ck else "the task network's encoder"
            print(f"clustering score (Eq. 6) of {whose} on the GT boxes: "
                  f"{r['clustering_score']:.4f} over {r['clustering_tokens']} tokens "
                  f"(lower: FG and BG apart)", flush=True)  # before the summary line, which ends the output
    export.write_requested(args.out, args.images, fmt=args.format, dest=args.export_to, vis=args.vis,
                           vis_dir=args.vis_dir, review_n=args.review, prog="label.py")


def summary_line(args, s, named, t0):
    """The last line of the output: what was written, and the unlabeled count with the first reasons
    (s, named: write_outputs'). Labelable: the boxes that passed the box checks (the progress lines'
    total); those whose image then failed are unlabeled too."""
    given = s.get("unlabeled_masks", {})
    unlabeled = ([f"masks: {', '.join(f'{c} {k}' for k, c in given.items())}"] if given else []) + [
        "..." if k is None else k + (f" ({c} boxes)" if c > 1 else "") for k, c in named.items()]
    return (f"label.py: wrote {args.out}: {s['boxes']} boxes ({s['labelable']} labelable): "
            f"{s['labeled']} labeled ({s['empty_masks']} empty masks), {s['unlabeled']} unlabeled"
            + (f" ({'; '.join(unlabeled)}; all reasons in {util.side_file(args.out, '.report.json')})"
               if s["unlabeled"] else "")
            + (f"; {s['filtered_by_score']} below --score-thr dropped" if s["filtered_by_score"] else "")
            + f"; {time.time() - t0:.1f}s"
            + ("; --strict: exit status 3" if args.strict and s["unlabeled"] else ""))


def run(args, d, ck, settings, t0, stop, encoder=None):
    """Label, merge on rank 0, write OUT and its side files; the number of unlabeled boxes (0 off rank 0).
    encoder: (ck, settings) of --encoder with --ckpt; the better of the two labels (choose_labeler)."""
    index, kept, labelable, img_rows = select_boxes(args, d)
    n_chunks = -(-len(img_rows) // args.chunk_images)
    parts, done = open_parts(args, d, n_chunks, encoder and encoder[1])
    choice = None
    if encoder is not None:
        choice = choose_labeler(args, d, {"network": (ck, settings), "encoder": encoder}, index, labelable,
                                parts)
        if choice["labeler"] == "encoder":
            ck, settings = encoder
    mine = [k for k in range(n_chunks) if k not in done][d.rank::d.world]
    if mine:
        label_chunks(args, d, ck, settings, index, labelable, img_rows, mine, parts, stop)
    util.barrier(d)
    if d.rank != 0:
        return 0
    with ChunkResults(index, labelable, n_chunks, parts) as results:
        summary, named = write_outputs(args, index, kept, labelable, results, choice)
    if not args.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    if args.eval or args.vis or args.review or args.format != "coco":
        write_extras(args, d, ck, index)
    print(summary_line(args, summary, named, t0), file=sys.stderr, flush=True)
    return summary["unlabeled"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv if argv else demo_argv())
    t0 = time.time()
    d = None
    parts = args.out + ".parts"

    def said():  # for a SIGINT or SIGTERM: what is kept, and the command that continues (--fresh would not)
        return ((f"the chunks done so far in {parts}" if os.path.isdir(parts) else "nothing labeled"),
                util.command_line(argv, drop=("--fresh",)))

    with util.Stop("label.py", said) as stop:
        try:
            check_inputs(args)
            # once; a checkpoint mapped, each network read from it
            ck = (predictor.load_checkpoint(args.ckpt, mmap=True) if args.ckpt
                  else predictor.load_encoder(args.encoder))
            encoder = None
            if args.ckpt and args.encoder:  # either may label: choose_labeler
                enc = predictor.load_encoder(args.encoder)
                encoder = (enc, resolve_settings(args, enc, record=False))
            settings = resolve_settings(args, ck)
            d = util.setup_distributed(args.device, args.dist_timeout)
            n_unlabeled = run(args, d, ck, settings, t0, stop, encoder)
        except util.InputError as e:
            util.fail("label.py", e)
        finally:
            if d is not None:
                util.shutdown(d)
    if args.strict and n_unlabeled:
        sys.exit(3)


if __name__ == "__main__":
    main()
