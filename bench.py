"""Speed and memory of MAL: one command, one table printed last and written to a JSON.

    python bench.py            # full sizes (a GPU: ViT-B/16 at 512², CRF at 128² and 512²)
    python bench.py --quick    # small sizes that finish in half a minute on a 2-core CPU (run by .ci/run)

Rows: the CRF kernel vs the reference; a training step (ours vs the naive one: reference CRF and
plain attention) with crops/s, peak memory and model FLOP utilisation; labeling end to end from
JPEGs on disk to RLE, and the data-loading rate alone; label.py's bookkeeping at scale and export.py
on as many masks (--only bookkeeping: seconds and peak memory for 250k and 1M boxes whose images are
absent; the export needs OpenCV). Every ratio is
measured side by side in one run: median of repeats after warm-up, device-side timing on GPU.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import coco
import crf_ext
import data
import mal
import options
import predictor
import recipes
import synthetic
import util

HERE = os.path.dirname(os.path.abspath(__file__))


def timeit(fn, device, repeats, warmup=2):
    """Median seconds of fn() after warm-up; CUDA events on GPU, a synchronised host clock otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def timeit_pair(ours, ref, device, repeats, warmup=2):
    """Side by side: each repeat times both (in alternating order), so both see the same machine
    state (a shared CPU's speed drifts by ±30% between seconds). Returns the median times and the
    median and range of the per-repeat ratios ref / ours."""
    t_ours, t_ref, ratios = [], [], []
    for i in range(repeats):
        pair = {}
        for name in (("ours", "ref") if i % 2 else ("ref", "ours")):
            pair[name] = timeit(ours if name == "ours" else ref, device, 1, warmup=warmup if i == 0 else 0)
        t_ours.append(pair["ours"])
        t_ref.append(pair["ref"])
        ratios.append(pair["ref"] / pair["ours"])
    return (statistics.median(t_ours), statistics.median(t_ref), statistics.median(ratios),
            (min(ratios), max(ratios)))


def matmul_rate(device, quick):
    """The device's measured bf16 (GPU) or float32 (CPU) matrix rate in FLOP/s: the MFU denominator."""
    n = 1024 if quick else (2048 if device.type == "cpu" else 8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, device, repeats=10)


def model_flops(net, S, batch):
    """FLOPs of one training step: task forward + backward (3× forward) and teacher forward (1×).
    Counts the ViT's matrix products and attention, the patch embedding and the decoder's convs."""
    enc = net.encoder
    p, d, L = enc.patch_size, enc.embed_dim, len(enc.blocks)
    g = S // p
    n = g * g + 1
    vit = 2 * n * 12 * d * d * L + 2 * 2 * n * n * d * L + 2 * g * g * 3 * p * p * d
    c = 256
    dec = 2 * 9 * (g * g * (d * c + c * c) + 4 * g * g * 2 * c * c) + 2 * d * c
    return 4 * batch * (vit + dec)


def crf_rows(device, quick, repeats):
    sizes = [(8, 128, 20)] if device.type == "cpu" else [(32, 128, 100), (32, 512, 20)]
    if quick:
        sizes = [(8, 128, 20)] if device.type == "cpu" else [(32, 128, 100)]
    rows = []
    for B, S, iters in sizes:
        g = torch.Generator().manual_seed(0)
        image = torch.randn(B, 3, S, S, generator=g).to(device)
        prob = torch.rand(B, S, S, generator=g).to(device)
        box = torch.zeros(B, S, S, device=device)
        box[:, S // 8:-S // 8, S // 8:-S // 8] = 1  # ¾ of each side: like a crop expanded by θ ≈ 0.67
        for name, bm in (("box ¾", box), ("no box", None)):
            ref = lambda: mal.mean_field(image, prob, bm, iters=iters)  # noqa: E731
            row = dict(workload=f"CRF mean field B={B} {S}x{S} {iters} it, {name}", unit="ms")
            if crf_ext.available(device):
                t, t_ref, ratio, (lo, hi) = timeit_pair(
                    lambda: crf_ext.mean_field(image, prob, bm, iters=iters), ref, device, repeats)
                row.update(ours=t * 1e3, reference=t_ref * 1e3, ratio=ratio,
                           note=f"per-repeat ratio {lo:.1f}-{hi:.1f}x")
            else:
                row.update(reference=timeit(ref, device, repeats) * 1e3, ours=None,
                           note=f"kernel unavailable: {crf_ext.unavailable_reason(device)}")
            rows.append(row)
    return rows


def train_rows(device, quick, repeats, batch, profile=False, compile=False):
    """One whole training step, as train.py runs it, ours vs naive (reference CRF, plain attention).
    profile: also print torch.profiler's top operators of one step of ours (where the time goes).
    compile: also time ours with both networks under torch.compile (train.py --compile)."""
    if quick or (device.type == "cpu" and not profile):
        arch, depth, S, p, batch, loss_size, iters = "vit_tiny", 4, 128, 8, batch or 8, 64, 20
    else:
        arch, depth, S, p, batch, loss_size, iters = "vit_base", None, 512, 16, batch or 32, 128, 100
    rate = matmul_rate(device, quick)
    rows = []
    variants = [("ours", True, True, False), ("naive", False, False, False)]
    for name, fused, kernel, compiled in variants + ([("ours, torch.compile", True, True, True)]
                                                     if compile else []):
        torch.manual_seed(0)
        net = mal.MAL(arch, patch_size=p, img_size=S, depth=depth).to(device)
        for m in net.modules():
            if isinstance(m, mal.Attention):
                m.fused = fused
        # naive: the CRF's labels from the reference mean field, not the kernel
        labels = None if kernel else (lambda avg, img, bm: mal.mean_field(img, avg, bm, iters=iters) > 0.5)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        teacher = mal.make_teacher(net)
        run_net, run_teacher = (torch.compile(net), torch.compile(teacher)) if compiled else (net, teacher)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.9), fused=device.type == "cuda")
        x = torch.randn(batch, 3, S, S, device=device)
        box = torch.zeros(batch, S, S, device=device)
        box[:, S // 6:-S // 6, S // 5:-S // 5] = 1
        autocast = (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))

        def step():
            with autocast:
                with torch.no_grad():
                    t_logits = run_teacher(x)
                loss, _ = mal.mal_loss(run_net(x), t_logits, x, box, loss_size=loss_size, crf_iters=iters,
                                       labels=labels)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mal.ema_update(teacher, net)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()  # the first step: where torch.compile compiles
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t = timeit(step, device, repeats, warmup=1)
        if profile and name == "ours":
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if device.type == "cuda" else [])
            with torch.profiler.profile(activities=acts) as prof:
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        rows.append(dict(workload=f"train step {arch}/{p} {S}px B={batch} ({name})", unit="crops/s",
                         ours=batch / t, peak_mem_gib=mem, mfu=model_flops(net, S, batch) / t / rate,
                         note=f"first step {first:.1f} s"))
    for r in rows[:1] + rows[2:]:
        r.update(reference=rows[1]["ours"], ratio=r["ours"] / rows[1]["ours"])
    rows[0]["matmul_tflops"] = rate / 1e12
    return rows


def label_rows(device, quick, workers):
    """Labeling end to end, from 640x480 JPEGs on disk (~7 boxes each) to RLE in memory, with random
    weights (speed does not depend on them); and the data-loading rate alone, per worker."""
    arch, S, p, n = (("vit_tiny", 128, 16, 12) if quick
                     else ("vit_base", 512, 16, 400 if device.type == "cuda" else 3))
    sets = synthetic.make_coco_like(os.path.join("demo", "coco_like"), n)
    index = coco.box_index(sets["json"])
    labelable = index.labelable()
    images = coco.ImageEntries(index, index.images_of(labelable))
    todo, n_boxes = coco.BoxesByImage(index, labelable), int(labelable.sum())
    net = mal.MAL(arch, patch_size=p, img_size=S).eval().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    run = lambda: predictor.label_dataset([net], images, todo, sets["images"], device,  # noqa: E731
                                          recipes.LabelSettings(),
                                          batch_size=64 if device.type == "cuda" else 16, workers=workers)
    t = timeit(run, device, repeats=1 if not quick else 2, warmup=1)
    # The network's share: predictor.predict on one batch of pinned crops
    # (host->device copy, forward, sigmoid).
    B = 64 if device.type == "cuda" else 16
    pin = lambda t: t.pin_memory() if device.type == "cuda" else t  # noqa: E731
    crops, bms = (pin(torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8)),
                  pin(torch.ones(B, S, S, dtype=torch.bool)))
    with torch.no_grad():
        fwd = B / timeit(lambda: predictor.predict([net], crops, bms, device), device,
                         repeats=5 if quick else 20)
    ds = data.ImageBoxes(images, todo, sets["images"], S)
    box_of = {int(index.ann_id[r]): coco.xywh_to_xyxy(index.bbox[r]) for r in np.flatnonzero(labelable)}
    metas, t0 = [], time.perf_counter()
    for k in range(len(ds)):
        item = ds[k]
        metas += [(int(a), tuple(float(v) for v in cb), box_of[int(a)], int(item.height), int(item.width))
                  for a, cb in zip(item.ann_ids, item.crop_boxes)]
    load = len(metas) / (time.perf_counter() - t0)
    # The host's share of each box: paste the mask into the image and RLE-encode it, as label.py's
    # paste threads do, on smooth masks of the network's output size (a centred blob).
    with torch.no_grad():
        h, w = net(torch.zeros(1, 3, S, S, device=device)).shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    metas = metas * -(-2000 // len(metas))  # at least 2,000 masks, after a warm-up on a few
    prob = (1 - (yy ** 2 + xx ** 2)).clamp(0, 1).expand(len(metas), h, w)
    predictor._paste_batch(prob[:8], torch.full((8,), 0.5), None, metas[:8], 0.5)
    t0 = time.perf_counter()
    predictor._paste_batch(prob, torch.full((len(metas),), 0.5), None, metas, 0.5)
    paste = len(metas) / (time.perf_counter() - t0)
    return [dict(workload=f"label end to end {arch}/{p} {S}px, {len(images)} JPEGs 640x480", unit="boxes/s",
                 ours=n_boxes / t, note=f"{workers} workers"),
            dict(workload=f"label network alone (predict), B={B}", unit="crops/s", ours=fwd),
            dict(workload=f"label data loading alone, {S}px crops", unit="crops/s per worker", ours=load),
            dict(workload=f"label paste + RLE alone, {h}x{w} masks into 640x480", unit="masks/s per thread",
                 ours=paste)]


def write_box_set(path, n_boxes, per_image=5):
    """A COCO instances JSON of n_boxes boxes, per_image on each 640x480 image (none on disk), written
    entry by entry (the bench's own memory stays small)."""
    rng = np.random.default_rng(0)
    with util.atomic_file(path, "w") as f:
        f.write('{"info":{"description":"bookkeeping"},"categories":[{"id":1,"name":"thing"}],"images":[')
        n_images = -(-n_boxes // per_image)
        for i in range(n_images):
            f.write(("," if i else "") + json.dumps(dict(id=i + 1, file_name=f"absent/{i + 1:08d}.jpg",
                                                        width=640, height=480)))
        f.write('],"annotations":[')
        xy, wh = rng.uniform(0, 400, (n_boxes, 2)).round(2), rng.uniform(8, 200, (n_boxes, 2)).round(2)
        for k in range(n_boxes):
            f.write(("," if k else "") + json.dumps(dict(
                id=k + 1, image_id=k // per_image + 1, category_id=1, iscrowd=0,
                bbox=[float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
                area=float(wh[k, 0] * wh[k, 1]))))
        f.write("]}")


def write_labels_set(path, n_boxes, per_image=5, size=(64, 48)):
    """A labels file as label.py writes it: n_boxes annotations, per_image on each image of `size` (none
    on disk), each with a small RLE mask (one of 16 shapes, some with a hole) and a mask_score. Small
    images keep the per-mask raster work (decoding, tracing) small beside the bookkeeping. Written entry
    by entry."""
    rng = np.random.default_rng(0)
    W, H = size
    shapes = []
    for k in range(16):
        m = np.zeros((H, W), bool)
        x, y, w, h = 2 + 2 * k, 2 + 2 * (k % 8), 8 + k, 6 + k
        m[y:y + h, x:x + w] = True
        if k % 2:
            m[y + 2:y + h - 2, x + 2:x + w - 2] = False  # a hole
        shapes.append((coco.encode(m), [float(x), float(y), float(w), float(h)], float(m.sum())))
    with util.atomic_file(path, "w") as f:
        f.write('{"info":{"description":"bookkeeping labels"},"categories":[{"id":1,"name":"thing"}],'
                '"images":[')
        for i in range(-(-n_boxes // per_image)):
            f.write(("," if i else "") + json.dumps(dict(id=i + 1, file_name=f"absent/{i + 1:08d}.jpg",
                                                        width=W, height=H)))
        f.write('],"annotations":[')
        scores = rng.uniform(0, 1, n_boxes).round(4)
        for k in range(n_boxes):
            rle, box, area = shapes[k % 16]
            f.write(("," if k else "") + json.dumps(dict(
                id=k + 1, image_id=k // per_image + 1, category_id=1, iscrowd=0, bbox=box, area=area,
                segmentation=rle, mask_score=float(scores[k]))))
        f.write("]}")


# Runs a command in a child and reports its peak RSS (the largest of the command and its own children).
_PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def _peak_rss(cmd, what):
    """(seconds, peak RSS in bytes, stderr) of cmd run in a child; RuntimeError where it fails."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stdout.split()[-1]), done.stderr


def _remove(*paths):
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def bookkeeping_rows(quick):
    """label.py's bookkeeping alone, end to end: N boxes (5 per image) on images that are absent, so
    every box is read into the index (built afresh), sharded, chunked, reported unlabeled with its
    reason and written back, with nothing to label. Then export.py on a labels file of N small masks on
    absent images (write_labels_set): its index built afresh, --format coco-polygons (every mask traced),
    --vis 10 and --review 10 (every image and every scored mask tried, none on disk). Each size and step
    runs in its own process (label.py: one loader worker, tiny random weights): seconds and peak RSS;
    then the bytes per box between the sizes. Checks that every box id is back in label.py's output and
    report with its reason, and every mask in the export's summary."""
    folder = os.path.join("demo", "bookkeeping")
    os.makedirs(folder, exist_ok=True)
    ckpt = os.path.join(folder, "tiny.pt")
    args = dict(arch="vit_tiny", patch_size=16, img_size=32, depth=1)
    sd = mal.MAL(**args).state_dict()
    torch.save(dict(model_args=args, task=sd, teacher=sd, step=0, epoch=0, args={}), ckpt)
    rows, peaks = [], {"label": {}, "export": {}}
    for n in (25_000, 100_000) if quick else (250_000, 1_000_000):
        js, out = os.path.join(folder, f"boxes{n}.json"), os.path.join(folder, f"labels{n}.json")
        if not os.path.exists(js):
            write_box_set(js, n)
        _remove(js + ".index", out + ".parts")
        seconds, peaks["label"][n], _ = _peak_rss(
            [sys.executable, os.path.join(HERE, "label.py"), "--ckpt", ckpt, "--json", js, "--images", folder,
             "--out", out, "--device", "cpu", "--workers", "1", "--threads", "1", "--quiet"],
            f"label.py on {n} boxes")
        with open(out[:-len(".json")] + ".report.json") as f:
            report = json.load(f)
        ids = np.array([u["id"] for u in report["unlabeled"] if u["reason"]], dtype=np.int64)
        back = ids.size == n and np.array_equal(np.sort(ids), np.arange(1, n + 1))
        rows.append(dict(workload=f"label bookkeeping, {n:,} boxes on absent images", unit="s", ours=seconds,
                         peak_rss_gb=peaks["label"][n] / 1e9,
                         note=f"every box back with its reason: {'yes' if back else 'NO'}; "
                              f"{os.path.getsize(js) / 1e6:.0f} MB JSON"))
        os.remove(out)
        if importlib.util.find_spec("cv2") is None:  # coco-polygons' optional extra
            continue
        labels, polygons = os.path.join(folder, f"masks{n}.json"), os.path.join(folder, f"polygons{n}.json")
        if not os.path.exists(labels):
            write_labels_set(labels, n)
        _remove(labels + ".index", polygons)
        seconds, peaks["export"][n], err = _peak_rss(
            [sys.executable, os.path.join(HERE, "export.py"), labels, "--images", folder, "--format",
             "coco-polygons", "--out", polygons, "--vis", "10", "--review", "10"], f"export.py on {n} masks")
        back = f"annotations {n}, masks {n}," in err
        rows.append(dict(workload=f"export coco-polygons + vis + review, {n:,} masks", unit="s", ours=seconds,
                         peak_rss_gb=peaks["export"][n] / 1e9,
                         note=f"every mask traced: {'yes' if back else 'NO'}; "
                              f"{os.path.getsize(labels) / 1e6:.0f} MB labels"))
        os.remove(polygons)
    if not peaks["export"]:
        rows.append(dict(workload="export coco-polygons + vis + review", unit="s", ours=None,
                         note="skipped: OpenCV not installed (pip install opencv-python-headless)"))
        del peaks["export"]
    for step, p in peaks.items():
        (a, ra), (b, rb) = sorted(p.items())
        rows.append(dict(workload=f"{step} bookkeeping, peak RSS per added box ({a:,} -> {b:,})",
                         unit="bytes/box", ours=(rb - ra) / (b - a)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=options.HelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for CI and CPUs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    p.add_argument("--batch", type=int, default=None, help="training-step batch (default: 32 on GPU)")
    p.add_argument("--only", default="crf,train,label", help="comma-separated row groups to run (also: "
                   "bookkeeping, a few minutes on a CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="labeling DataLoader workers")
    p.add_argument("--json", default="bench.json", help="where to write the rows")
    p.add_argument("--profile", action="store_true", help="print the top operators of one training step "
                   "(at full size, ViT-B/16 512², also on CPU)")
    p.add_argument("--compile", action="store_true", help="also time the training step under torch.compile")
    args = p.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 20)
    only = args.only.split(",")
    rows = []
    if "crf" in only:
        rows += crf_rows(device, args.quick, repeats)
    if "train" in only:
        rows += train_rows(device, args.quick, max(3, repeats // 4), args.batch, args.profile, args.compile)
    if "label" in only:
        rows += label_rows(device, args.quick, args.workers)
    if "bookkeeping" in only:
        rows += bookkeeping_rows(args.quick)
    env = dict(device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU, {torch.get_num_threads()} threads"),
               torch=torch.__version__, cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"),
               command="python " + " ".join(sys.argv))
    with open(args.json, "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    print(f"\n{env['device']} | torch {env['torch']} | CUDA {env['cuda']} | {env['date']} | {env['command']}")
    print(f"{'workload':58s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}  unit / notes")
    for r in rows:
        f = lambda v: f"{v:10.2f}" if isinstance(v, (int, float)) else f"{'-':>10s}"  # noqa: E731
        extra = [f"{k} {v:.3g}" for k, v in r.items()
                 if k in ("peak_mem_gib", "peak_rss_gb", "mfu", "matmul_tflops") and v is not None]
        print(f"{r['workload']:58s} {f(r.get('ours'))} {f(r.get('reference'))} "
              f"{(format(r['ratio'], '6.1f') + 'x') if r.get('ratio') else '      -':>7s}  {r['unit']} "
              f"{' '.join(extra)} {r.get('note', '')}")


if __name__ == "__main__":
    main()
