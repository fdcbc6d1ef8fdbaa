"""Phase 1 of MAL: train the mask auto-labeler on boxes (§3, recipe of §4.2).

    python train.py                                   # the demo: synthetic data, small model, ~10 min on 2 CPU cores
    python train.py --train-json boxes.json --images DIR --out runs/mine       # one process
    torchrun --nproc_per_node 8 train.py --train-json ... --images ... --out runs/coco  # DDP on 8 GPUs

One flat loop: rank and world size come from torchrun's environment, no framework, no callbacks.
The run folder holds last.pt (the whole state, written at each epoch's end and every --save-every steps;
--resume continues it exactly), best.pt (the same at the end of the epoch with the best validation mIoU,
when --val-json is given), epoch_N.pt only with --keep-epochs, log.jsonl (the progress numbers, with
the loss weights as they ramp in) and val.jsonl (validation mIoU at each epoch end).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import mal
import synthetic

# The embedded demo: the synthetic set (DEMO_DATA) and the demo's recipe (DEMO), a 3-block vit_tiny/8
# at 96 px with a 64-channel decoder sized for a 2-core CPU (the decoder's 256 channels at 2× the token
# grid would cost most of the time). `--demo` applies the recipe to any data given with --train-json.
HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_ROOT = os.path.join(HERE, "demo", "data")  # synthetic.make_demo writes the set here once (cached)
DEMO_DATA = dict(train_json=os.path.join(DEMO_ROOT, "annotations", "instances_train.json"),
                 images=os.path.join(DEMO_ROOT, "train"),
                 val_json=os.path.join(DEMO_ROOT, "annotations", "instances_val.json"),
                 val_images=os.path.join(DEMO_ROOT, "val"), out=os.path.join(HERE, "demo", "run"))
# Its CRF loss floods the box's outside into colour-connected regions (weak unary τ, ω 0.25, 1000
# iterations at 24 px; mal.crf_loss) instead of distilling the network's own blobs; with a faster
# teacher (EMA 0.99) and no colour jitter (which blurs the colour edges the flood follows) it lifts
# demo-val mIoU from 0.58 to 0.85 at the same 750 steps (QUALITY.md).
DEMO = dict(arch="vit_tiny", depth=3, patch_size=8, img_size=96, decoder_dim=64, batch_size=16,
            epochs=10, lr_per_image=5e-5, warmup_steps=50, mil_ramp=50, crf_ramp=100, loss_size=48,
            crf_iters=1000, crf_unary=1e-4, omega=0.25, zeta=0.3, crf_size=24, ema=0.99,
            color_aug=False, min_area=64.0, drop_path=0.0, workers=1, val_max_images=60)
# Test-time settings a checkpoint recommends to label.py (its own flags override them): the paper's
# recipe labels with the task network at 0.5, and the demo's were chosen on the demo's validation set.
LABEL = dict(net="task", thr=0.5, expand=0.2, flip=False, crf_refine=False)
DEMO_LABEL = dict(net="task", thr=0.5, expand=0.2, flip=False, crf_refine=True)


def label_defaults(args):
    """label.py's test-time settings for this run: the recipe's, refining (when it does) with the
    training loss's CRF at the loss size, or when the loss's has a weak unary (a flood of the box's
    outside, for pseudo-labels, not for snapping a good mask to its edges) with the paper's CRF at a
    unary weight of 0.3: +0.007 to +0.013 mIoU over 1 on six demo-recipe models (QUALITY.md)."""
    paper_crf = args.crf_unary != 1.0
    return dict(DEMO_LABEL if args.demo else LABEL, crf_iters=100 if paper_crf else args.crf_iters,
                crf_size=args.loss_size, crf_zeta=0.5 if paper_crf else args.zeta,
                crf_omega=2.0 if paper_crf else args.omega, crf_unary=0.3 if paper_crf else 1.0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train MAL (phase 1) on a COCO-format box set.",
                                formatter_class=data.HelpFormatter)
    a = p.add_argument
    a("--demo", action="store_true",
      help="the demo's recipe (model, schedule, losses; explicit flags override it), on the embedded demo "
           "set unless --train-json is given (the default with no arguments)")
    a("--train-json", help="COCO-format instances JSON; only boxes are read (no segmentation needed)")
    a("--images", help="folder of the training images (file_name in the JSON is relative to it)")
    a("--val-json", help="COCO JSON with GT masks for per-epoch pseudo-label mIoU (optional)")
    a("--val-images", help="folder of the validation images")
    a("--val-max-images", type=int, default=200, help="validate on this many images (a fixed subset)")
    a("--arch", default="vit_base", choices=list(mal.VIT_CONFIGS), help="ViT image encoder")
    a("--depth", type=int, default=None, help="override the encoder's number of blocks")
    a("--patch-size", type=int, default=16, help="ViT patch size (8, 14 and 16 work; DINOv2's weights need 14)")
    a("--img-size", type=int, default=512, help="RoI crop size fed to the network (§3.1: 512)")
    a("--decoder-dim", type=int, default=256, help="channels of the decoder's K and V heads (paper: 256)")
    a("--init", help="pretrained encoder for mal.load_pretrained: MAE, DeiT, DeiT III (--arch deit3_*), DINOv2 "
                     "(--arch vit_*_dinov2[_reg4] --patch-size 14), timm or a MAL checkpoint")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate of the encoder")
    a("--batch-size", type=int, default=4, help="crops per process per micro-step (paper: 4 per GPU × 8)")
    a("--accum", type=int, default=1, help="micro-steps accumulated per optimizer step")
    a("--epochs", type=int, default=10, help="epochs; the learning-rate schedule spans all of them")
    a("--max-steps", type=int, default=None, help="stop after this global step (the schedule is unchanged)")
    a("--lr-per-image", type=float, default=1.5e-6, help="learning rate per image of the global batch (§4.2)")
    a("--min-lr-ratio", type=float, default=0.01, help="cosine annealing floor, as a fraction of the peak")
    a("--warmup-steps", type=int, default=1000, help="linear learning-rate warm-up steps")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, tokens)")
    a("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    a("--ema", type=float, default=0.996, help="EMA teacher momentum (§3.2)")
    a("--alpha-mil", type=float, default=4.0, help="MIL loss weight (Eq. 1)")
    a("--alpha-crf", type=float, default=0.5, help="CRF loss weight (Eq. 1)")
    a("--mil-ramp", type=int, default=1000, help="steps over which the MIL weight ramps in")
    a("--crf-ramp", type=int, default=4000, help="steps over which the CRF weight ramps in")
    a("--loss-size", type=int, default=128, help="resolution of the losses and the CRF (up to --img-size)")
    a("--crf-iters", type=int, default=100, help="mean-field iterations")
    a("--zeta", type=float, default=0.5, help="CRF colour-affinity bandwidth ζ (Eq. 4)")
    a("--omega", type=float, default=2.0, help="CRF pairwise weight ω (Eq. 4)")
    a("--crf-unary", type=float, default=1.0,
      help="weight τ of the CRF's unary (E = τ·μ + ψ, Eq. 3; 1: the paper). A weak unary with ω ~ 0.25 "
           "and many iterations floods the box's outside into colour-connected regions (mal.crf_loss)")
    a("--crf-size", type=int, default=None, help="resolution the CRF loss's mean field runs at (default: --loss-size)")
    a("--gt-masks", action="store_true",
      help="the fully supervised upper bound, not MAL: train the same network on the JSON's GT masks "
           "(dice + BCE) instead of the box losses, to measure MAL's retention")
    a("--min-area", type=float, default=2048.0, help="skip boxes smaller than this many px² (public recipe)")
    a("--theta", type=float, default=1.2, help="random box expansion θ (§3.1)")
    a("--color-aug", action=argparse.BooleanOptionalAction, default=True,
      help="colour jitter, greyscale and blur on the task network's input (§4.2)")
    a("--group-by-image", action="store_true",
      help="order boxes image by image: ~1 decode per image instead of per box, less diverse batches")
    a("--out", default=None, help="run folder (last.pt, best.pt, log.jsonl, val.jsonl); default runs/mal, "
                                  "demo/run for the embedded demo")
    a("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint as OUT/epoch_N.pt")
    a("--resume", nargs="?", const="last", default=None,
      help="continue from OUT/last.pt (or the given checkpoint), exactly where it stopped")
    a("--seed", type=int, default=0, help="seed of the weights, the data order and the augmentations")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--workers", type=int, default=4, help="DataLoader worker processes per process")
    a("--save-every", type=int, default=1000, help="write last.pt every this many steps")
    a("--log-every", type=float, default=5.0, help="seconds between progress lines")
    a("--compile", action="store_true", help="torch.compile the task network and the teacher")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or p.parse_args(argv).demo:
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    args.demo = args.demo or not argv
    args.demo_data = args.demo and not args.train_json
    if args.demo_data:
        for k, v in DEMO_DATA.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    args.out = args.out or "runs/mal"
    if not args.train_json or not args.images:
        p.error("--train-json and --images are required (or run with no arguments for the demo)")
    if bool(args.val_json) != bool(args.val_images):
        p.error("--val-json and --val-images go together")
    return args


def lr_at(step, total, peak, warmup, floor):
    """Linear warm-up, then cosine annealing from peak to floor over the rest of the schedule (§4.2)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


class SkipSampler(torch.utils.data.Sampler):
    """A DistributedSampler that starts `skip` samples into its epoch (resuming mid-epoch)."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        yield from it

    def __len__(self):
        return len(self.sampler) - self.skip


def local_cuda_device(index):
    """cuda:index (torchrun's LOCAL_RANK), made current; a one-line error where a node runs more ranks
    than it has GPUs (two ranks on one GPU would otherwise fail inside NCCL, or wait on each other)."""
    n = torch.cuda.device_count()
    if index >= n:
        raise SystemExit(f"cuda:{index} asked for, but this node has {n} CUDA device(s): start at most {n} "
                         f"process(es) per node (torchrun --nproc_per_node {max(n, 1)}) or pass --device cpu")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def init_distributed(device):
    """(ddp, rank, world, device) from torchrun's environment, a single process without it. Under
    torchrun this joins the process group (nccl on CUDA, gloo on CPU); CUDA means cuda:LOCAL_RANK."""
    ddp = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(device)
    if device.type == "cuda":
        device = local_cuda_device(local_rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, world, device


def main(argv=None):
    args = get_args(argv)
    ddp, rank, world, device = init_distributed(args.device)
    master = rank == 0
    log = (lambda *m: print(*m, file=sys.stderr, flush=True)) if master else (lambda *m: None)
    if args.demo_data and master:
        synthetic.make_demo(DEMO_ROOT)
    if ddp:
        dist.barrier()
    for path in (args.train_json, args.val_json):  # fail now, not at the first epoch's end
        if path and not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file")
    for path in (args.images, args.val_images):
        if path and not os.path.isdir(path):
            raise SystemExit(f"{path}: no such image folder")
    os.makedirs(args.out, exist_ok=True)

    # --- data: one sample = one box (§3.1 crops, §4.2 augmentations) ---
    try:
        dataset = data.BoxDataset(args.train_json, args.images, size=args.img_size, train=True,
                                  min_area=args.min_area, theta=args.theta, seed=args.seed, gt_masks=args.gt_masks,
                                  color_aug=args.color_aug)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{args.train_json}: cannot read the training boxes ({type(e).__name__}: {e})")
    log(f"train: {dataset.describe()}")
    if args.group_by_image:  # each image decoded ~once per epoch, batches hold boxes of few images
        sampler = data.ImageGroupedSampler(dataset, shuffle=True, world=world, rank=rank)
    else:  # every box in a random place: diverse batches, one decode per box (per-worker cache aside)
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=True,
                                                                  seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (args.batch_size * args.accum)
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.train_json}: {len(dataset)} usable boxes are fewer than one global batch "
                         f"({args.batch_size} × {args.accum} × {world} processes)")
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps or total_steps)
    global_batch = args.batch_size * args.accum * world
    peak_lr = args.lr_per_image * global_batch

    # --- model: task network, EMA teacher (§3.2) ---
    torch.manual_seed(args.seed)
    model_args = dict(arch=args.arch, patch_size=args.patch_size, img_size=args.img_size,
                      drop_path=args.drop_path, depth=args.depth, decoder_dim=args.decoder_dim)
    net = mal.MAL(**model_args)
    if args.init and not args.resume:
        # The input normalisation stays data.normalize's ImageNet mean/std: every encoder that
        # load_pretrained reads (MAE, DeiT, DeiT III, DINOv2, timm's ViTs) was trained with it.
        try:
            mal.load_pretrained(net, args.init)
        except (OSError, ValueError) as e:
            raise SystemExit(str(e))
    net.to(device)
    # No weight decay on norms, biases, LayerScale, the class and register tokens and the position embeddings.
    decays = {n: p.ndim > 1 and n not in ("encoder.pos_embed", "encoder.cls_token", "encoder.reg_token")
              for n, p in net.named_parameters()}
    opt = torch.optim.AdamW([{"params": [p for n, p in net.named_parameters() if decays[n]], "weight_decay": args.weight_decay},
                             {"params": [p for n, p in net.named_parameters() if not decays[n]], "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.9), fused=device.type == "cuda")
    step, epoch = 0, 0
    best = {"epoch": None, "miou": float("-inf")}  # best.pt's validation (on rank 0)
    ckpt_path = os.path.join(args.out, "last.pt") if args.resume == "last" else args.resume
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"{ckpt_path}: no checkpoint to resume from")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            saved = dict(ckpt["args"], world=ckpt["world"], model_args=ckpt["model_args"])
        except Exception as e:
            raise SystemExit(f"{ckpt_path}: not a train.py checkpoint ({type(e).__name__}: {e})")
        # The data position and the schedule follow from these: a resume must keep them.
        now = dict(vars(args), world=world, model_args=model_args)
        for key in ("model_args", "world", "batch_size", "accum", "epochs", "seed", "group_by_image"):
            if saved.get(key) != now[key]:
                raise SystemExit(f"{ckpt_path}: {key} was {saved.get(key)} and is now {now[key]}; "
                                 f"resume with the same value")
        net.load_state_dict(ckpt["task"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, best = ckpt["step"], ckpt["epoch"], ckpt.get("best", best)  # older checkpoints: no best.pt yet
        log(f"resumed {ckpt_path} at step {step} (epoch {epoch})")
    teacher = mal.make_teacher(net)
    # Each rank draws its own stochastic-depth masks; the checkpoint holds every rank's RNG state.
    torch.manual_seed(args.seed + 1000003 * rank)
    if args.resume:
        teacher.load_state_dict(ckpt["teacher"])
        torch.set_rng_state(ckpt["rng"][rank]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    # DDP broadcasts rank 0's weights; the teacher is then updated identically on every rank.
    task = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if ddp else net
    run_task, run_teacher = (torch.compile(task), torch.compile(teacher)) if args.compile else (task, teacher)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    loss_kw = dict(alpha_mil=args.alpha_mil, alpha_crf=args.alpha_crf, mil_ramp=args.mil_ramp, crf_ramp=args.crf_ramp,
                   loss_size=args.loss_size, crf_iters=args.crf_iters, zeta=args.zeta, omega=args.omega,
                   crf_unary=args.crf_unary, crf_size=args.crf_size)

    def checkpoint(*paths):
        """The whole state, written atomically by rank 0 to each path; every rank must call it (RNG gather)."""
        rng = [{"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}]
        if ddp:
            rng = rng * world
            dist.all_gather_object(rng, rng[0])
        if master:
            state = {"model_args": model_args, "task": net.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "epoch": epoch, "world": world, "rng": rng,
                     "args": vars(args), "label_defaults": label_defaults(args), "best": best}
            for path in paths:
                with data.atomic_file(path) as f:
                    torch.save(state, f)

    log(f"{args.arch}/{args.patch_size} at {args.img_size}px on {world}× {device.type}: "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps in all, stop at {stop_step}; "
        f"global batch {global_batch}, peak lr {peak_lr:.3g}"
        + ("" if args.gt_masks else f"; the MIL and CRF loss weights ramp in over {args.mil_ramp} and "
                                    f"{args.crf_ramp} steps (the total loss may rise meanwhile)"))
    logf = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    t_log, t0, step0 = time.time(), time.time(), step
    sums, unreadable = None, 0  # unreadable: crops of missing / corrupt images (data.py names each file once)
    while step < stop_step:
        # --- one epoch; a resumed run starts where the checkpoint's epoch stopped ---
        dataset.set_epoch(epoch)  # the augmentations' seeds (and the grouped sampler's order)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        done_in_epoch = step - epoch * steps_per_epoch
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=SkipSampler(sampler, done_in_epoch * args.batch_size * args.accum),
            num_workers=args.workers, collate_fn=data.collate_boxes, pin_memory=device.type == "cuda", drop_last=True,
            persistent_workers=False, generator=torch.Generator().manual_seed(args.seed + epoch))
        batches = iter(loader)
        for _ in range(done_in_epoch, steps_per_epoch):
            lr = lr_at(step, total_steps, peak_lr, args.warmup_steps, peak_lr * args.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            for micro in range(args.accum):
                b = next(batches)
                unreadable += b["n_invalid"]
                weight = 1.0 / args.accum
                if len(b["image"]) == 0:  # every image of this batch was unreadable: still join DDP's
                    weight = 0.0          # all-reduce, with a zero-weighted dummy crop
                    S = args.img_size
                    b = dict(image=torch.zeros(1, 3, S, S, dtype=torch.uint8), box_mask=torch.ones(1, S, S),
                             teacher_image=torch.zeros(1, 3, S, S, dtype=torch.uint8), gt_mask=torch.zeros(1, S, S))
                image = data.normalize(b["image"].to(device, non_blocking=True))
                clean = data.normalize(b["teacher_image"].to(device, non_blocking=True))
                box = b["box_mask"].to(device, non_blocking=True)
                sync = micro == args.accum - 1 or not ddp
                with autocast, (contextlib.nullcontext() if sync else task.no_sync()):
                    if args.gt_masks:
                        loss, terms = mal.gt_mask_loss(run_task(image), b["gt_mask"].to(device, non_blocking=True),
                                                       loss_size=args.loss_size)
                    else:
                        with torch.no_grad():
                            t_logits = run_teacher(clean)
                        logits = run_task(image)
                        loss, terms = mal.mal_loss(logits, t_logits, clean, box, step, **loss_kw)
                    (loss * weight).backward()
                names = list(terms)
                terms = torch.stack(list(terms.values()) + [torch.ones_like(terms["loss"])])
                terms = terms * (weight > 0)  # the dummy crop stays out of the logged means
                sums = terms if sums is None else sums + terms
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mal.ema_update(teacher, net, args.ema)
            step += 1
            if master and (time.time() - t_log > args.log_every or step == stop_step):
                # .item() only here: no host syncs inside the loop.
                *means, n = sums.tolist()
                means = {k: v / max(n, 1) for k, v in zip(names, means)}
                rate = (step - step0) * global_batch / (time.time() - t0)
                eta = (stop_step - step) * global_batch / max(rate, 1e-9)
                # The loss weights of the step just taken: while they ramp in, the total loss can rise.
                weights = {} if args.gt_masks else dict(zip(("w_mil", "w_crf"), mal.loss_weights(
                    step - 1, alpha_mil=args.alpha_mil, alpha_crf=args.alpha_crf, mil_ramp=args.mil_ramp,
                    crf_ramp=args.crf_ramp)))
                rec = dict(epoch=epoch, step=step, total=stop_step, **means, **weights, lr=lr,
                           crops_per_s=rate, eta_s=eta, unreadable=unreadable)
                parts = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
                log(f"epoch {epoch} step {step}/{stop_step} loss {means['loss']:.4f} ({parts}"
                    + "".join(f", {k} {v:.3g}" for k, v in weights.items()) + ") "
                    f"lr {lr:.3g} {rate:.1f} crops/s ETA {eta / 60:.1f} min"
                    + (f" ({unreadable} unreadable crops skipped on rank 0)" if unreadable else ""))
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                t_log, t0, step0, sums = time.time(), time.time(), step, None
            if step % args.save_every == 0 and step % steps_per_epoch:  # an epoch's end saves below
                paused = time.time()
                checkpoint(os.path.join(args.out, "last.pt"))
                t0 += time.time() - paused  # the rate and ETA count training time only
            if step >= stop_step:
                break
        del batches, loader
        if step == (epoch + 1) * steps_per_epoch:  # a whole epoch done: validate, then save
            epoch += 1
            paused = time.time()
            paths = [os.path.join(args.out, "last.pt")]
            if args.keep_epochs:
                paths.append(os.path.join(args.out, f"epoch_{epoch}.pt"))
            if master and args.val_json:
                miou = validate(args, net, teacher, device, epoch, step)["miou"]
                if miou > best["miou"]:  # a NaN mIoU never is
                    best = {"epoch": epoch, "miou": miou}
                    paths.append(os.path.join(args.out, "best.pt"))
            checkpoint(*paths)  # after validation: its RNG draws are in the state, so a resume is exact
            t0 += time.time() - paused
    if step % steps_per_epoch:  # else the epoch's end has just saved it
        checkpoint(os.path.join(args.out, "last.pt"))
    if master:
        log(f"done: step {step}, {os.path.join(args.out, 'last.pt')}"
            + (f"; best.pt: epoch {best['epoch']}, mIoU {best['miou']:.3f}" if best["epoch"] is not None else ""))
        if args.demo and args.val_json and step % steps_per_epoch:  # epoch ends have just validated
            validate(args, net, teacher, device, epoch, step)
    if ddp:  # the teacher must be the same on every rank (§3.2): check it, bit for bit
        fp = torch.stack([p.detach().double().sum() for p in teacher.parameters()])
        fps = [torch.empty_like(fp) for _ in range(world)]
        dist.all_gather(fps, fp.to(device) if device.type == "cuda" else fp)
        if not all(torch.equal(f.cpu(), fps[0].cpu()) for f in fps):
            raise RuntimeError("the EMA teacher differs between ranks")
        log(f"teacher identical on all {world} ranks")
        dist.destroy_process_group()


def validate(args, net, teacher, device, epoch, step):
    """Pseudo-label mIoU on a fixed subset of the validation set, through label.py's inference path
    with the test-time settings this run's checkpoints recommend (label_defaults)."""
    import label
    t = label_defaults(args)
    nets = {"task": [net], "teacher": [teacher], "avg": [net, teacher]}[t["net"]]
    res = label.validate(nets, args.val_json, args.val_images, device, max_images=args.val_max_images,
                         expand=t["expand"], thr=t["thr"], flip=t["flip"], crf_size=t["crf_size"],
                         crf_iters=t["crf_iters"] if t["crf_refine"] else 0, crf_zeta=t["crf_zeta"],
                         crf_omega=t["crf_omega"], crf_unary=t["crf_unary"])
    print(f"val epoch {epoch}: " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "val.jsonl"), "a") as f:
        f.write(json.dumps(dict(epoch=epoch, step=step, **res)) + "\n")
    return res


if __name__ == "__main__":
    main()
