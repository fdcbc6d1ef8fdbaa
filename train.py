"""Phase 1 of MAL: train the mask auto-labeler on boxes (§3, recipe of §4.2).

  python train.py                               # the demo: synthetic data, small model, ~3 min on 2 CPU cores
  python train.py --demo --train-json boxes.json --images DIR --out runs/mine   # the CPU recipe on your boxes
  torchrun --nproc_per_node 8 train.py --train-json ... --images ... --out runs/coco  # the paper's, 8 GPUs

One flat loop, this file's steps inside util.Loop (pretrain.py's loop too): rank and world size come
from torchrun's environment, no framework, no callbacks.
The run folder holds last.pt (the whole state, written at each epoch's end, about every
--save-minutes and on Ctrl-C or SIGTERM; --resume continues it exactly), best.pt (the same at the end
of the epoch with the best validation mIoU, when --val-json is given), epoch_N.pt only with
--recipe keep_epochs=1, log.jsonl (the progress numbers, with the loss weights as they ramp in) and val.jsonl
(validation mIoU at each epoch end).

The losses are the paper's (mal.py) with what this implementation adds (objective.py); --paper-loss
trains the paper's alone.
"""
import options

if __name__ == "__main__":
    options.train_parser().parse_known_args()  # --help answers before torch loads

import dataclasses
import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import coco
import data
import evaluation
import mal
import objective
import recipes
import synthetic
import util

# a resume keeps these
RESUME_KEYS = ("model_args", "world", "batch_size", "accum", "epochs", "seed")


def get_args(argv=None):
    """train.py's flags (options.train_parser) read into the run's settings: the recipe (the paper's,
    or --demo's) under the flags given, the run settings and the losses (args.loss, a
    recipes.LossConfig) under --recipe's items, then --paper-loss."""
    p = options.train_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = not argv or p.parse_args(argv).demo
    run, loss = dict(recipes.RUN_SETTINGS), recipes.LossConfig()
    if demo:
        p.set_defaults(**{k: v for k, v in recipes.DEMO.items() if k in recipes.DEMO_FLAGS})
        run.update({k: v for k, v in recipes.DEMO.items() if k in recipes.RUN_SETTINGS})
        loss = recipes.DEMO["loss"]
    args = p.parse_args(argv)
    try:
        loss, run = recipes.read_recipe(args.recipe, loss, run)
    except ValueError as e:
        p.error(f"--recipe {e}")
    vars(args).update(run)
    args.loss = loss.paper() if args.paper_loss else loss
    args.demo = demo
    args.demo_data = args.demo and not args.train_json
    if args.demo_data:
        for k, v in recipes.DEMO_DATA.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    args.out = args.out or "runs/mal"
    if args.init:  # the weights decide what is not given (encoder_from_init)
        for key in ("arch", "patch_size", "depth"):
            flag = "--" + key.replace("_", "-")
            if not any(a == flag or a.startswith(flag + "=") for a in argv):
                setattr(args, key, None)
    if args.arch is not None and args.arch not in mal.VIT_CONFIGS:
        p.error(f"--arch {args.arch}: not one of {', '.join(mal.VIT_CONFIGS)}")
    if not args.train_json or not args.images:
        p.error("--train-json and --images are required (or run with no arguments for the demo)")
    if bool(args.val_json) != bool(args.val_images):
        p.error("--val-json and --val-images go together")
    return args


def check_inputs(args):
    """Everything the run reads, checked before the first step: the JSON files parse and hold their
    keys, the image folders exist and hold the listed images (counted), the checkpoints load; and the
    crop size is a whole number of the encoder's patches."""
    patch = args.patch_size or mal.VIT_CONFIGS[args.arch]["patch_size"]
    if args.img_size % patch:  # the patch embedding would drop the crop's last rows and columns
        lo = args.img_size // patch * patch
        raise util.InputError(f"--img-size {args.img_size} is not a multiple of the encoder's patch, "
                              f"{patch} px ({args.arch}): use --img-size {lo or patch} or {lo + patch}")
    for flag, path in (("--images", args.images), ("--val-images", args.val_images)):
        if path and not os.path.isdir(path):
            raise util.InputError(f"{flag} {path}: no such image folder")
    for flag, path, folder in (("--train-json", args.train_json, args.images),
                               ("--val-json", args.val_json, args.val_images)):
        if path:
            index = coco.box_index(path, what=flag, results=False)  # what BoxDataset reads, cached
            if args.gt_masks or flag == "--val-json":
                if not index.has_gt:
                    raise util.InputError(f"{flag} {path}: no annotation has a 'segmentation' "
                                          f"(GT masks are needed)")
            n = index.n_images
            missing = sum(not os.path.isfile(os.path.join(folder, index.file_name(k))) for k in range(n))
            if missing == n:
                raise util.InputError(f"{flag} {path}: none of its {n} images is under {folder}")
            if missing:
                print(f"train.py: {flag} {path}: {missing} of its {n} images are missing "
                      f"under {folder}; their boxes will be skipped", file=sys.stderr)


def encoder_from_init(args, d):
    """--init's file (a named encoder is downloaded by rank 0 first) and the encoder it holds: --arch,
    --patch-size and --depth left unset take the weights'; given, they must agree (--depth may keep
    fewer blocks than the weights have). Returns the weights as mal.read_pretrained reads them, read
    once for make_model."""
    if d.rank == 0:
        util.pretrained_file(args.init)
    util.barrier(d)
    args.init = util.pretrained_file(args.init, download=False)
    try:
        weights = mal.read_pretrained(args.init)
        found = mal.pretrained_arch(weights[0], args.init)
    except util.InputError as e:
        raise util.InputError(f"--init {e}") from None
    for key in ("arch", "patch_size"):
        if getattr(args, key) is None:
            setattr(args, key, found[key])
        elif getattr(args, key) != found[key]:
            flag = "--" + key.replace("_", "-")
            raise util.InputError(f"--init {args.init}: its encoder is {found['arch']} with patch "
                                  f"{found['patch_size']}, but {flag} {getattr(args, key)} was given "
                                  f"(leave it out: the weights decide)")
    if args.depth is None:
        args.depth = found["depth"]
    elif not 1 <= args.depth <= found["depth"]:
        raise util.InputError(f"--init {args.init}: its encoder has {found['depth']} blocks, --depth "
                              f"{args.depth} was given")
    return weights


def make_data(args, d):
    """The training boxes (§3.1 crops, §4.2 augmentations), their sampler and the steps per epoch."""
    dataset = data.BoxDataset(args.train_json, args.images, size=args.img_size, train=True,
                              min_area=args.min_area, theta=args.theta, seed=args.seed,
                              gt_masks=args.gt_masks, color_aug=args.color_aug)
    # every box in a random place: diverse batches, one decode per box (per-worker cache aside)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, d.world, d.rank, shuffle=True,
                                                              seed=args.seed, drop_last=True)
    return dataset, sampler, util.steps_per_epoch(sampler, args.batch_size, args.accum, d.world,
                                                  f"{args.train_json}: {len(dataset)} usable boxes")


def make_model(args, device, lr, init=None):
    """The task network (§3.2), from --init's encoder when given (init: its weights as read), and its
    AdamW."""
    torch.manual_seed(args.seed)
    model_args = dict(arch=args.arch, patch_size=args.patch_size, img_size=args.img_size,
                      drop_path=args.drop_path, depth=args.depth, decoder_dim=args.decoder_dim)
    net = mal.MAL(**model_args)
    if args.init and not args.resume:
        # The input normalisation stays data.normalize's ImageNet mean/std: every encoder that
        # load_pretrained reads (MAE, DeiT, DeiT III, DINOv2, timm's ViTs) was trained with it.
        mal.load_pretrained(net, args.init, init)
    net.to(device)
    # No weight decay on norms, biases, LayerScale, the class and register tokens and the position embeddings.
    opt = util.adamw(net.named_parameters(), lr, weight_decay=args.weight_decay, betas=(0.9, 0.9),
                     no_decay=("encoder.pos_embed", "encoder.cls_token", "encoder.reg_token"),
                     fused=device.type == "cuda")
    return net, model_args, opt


class Run:
    """What a checkpoint holds besides the loop's position (util.Loop): the task network, the EMA teacher,
    the optimizer, the best validation epoch and the label settings this run recommends; and the
    validation set's JSON, which rank 0 (the one that validates) reads once."""

    def __init__(self, args, d, net, teacher, opt, model_args):
        self.args, self.d, self.net, self.teacher, self.opt, self.model_args = (args, d, net, teacher, opt,
                                                                                model_args)
        self.best = {"epoch": None, "miou": float("-inf")}
        self.val = coco.read_instances(args.val_json, "--val-json") if args.val_json and d.rank == 0 else None

    def resume(self, ck):
        self.net.load_state_dict(ck["task"])
        self.opt.load_state_dict(ck["optimizer"])
        self.best = ck.get("best", self.best)

    def rng_state(self):
        device = self.d.device
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def checkpoint(self, **position):
        position["args"] = dict(position["args"], loss=dataclasses.asdict(self.args.loss))  # plain data
        return {"model_args": self.model_args, "task": self.net.state_dict(),
                "teacher": self.teacher.state_dict(), "optimizer": self.opt.state_dict(), **position,
                "best": self.best,
                "label_settings": dataclasses.asdict(recipes.label_settings(self.args))}


def epoch_end(args, run, loop):
    """A whole epoch done (loop.epoch counts it): validate (rank 0), then save last.pt (and best.pt,
    epoch_N.pt)."""
    paths = [os.path.join(args.out, f"epoch_{loop.epoch}.pt")] if args.keep_epochs else []
    if run.d.rank == 0 and args.val_json:
        with loop.progress.paused():
            miou = log_validation(args, run.val, run.net, run.teacher, run.d.device, loop.epoch,
                                  loop.step)["miou"]
        if miou > run.best["miou"]:  # a NaN mIoU never is
            run.best = {"epoch": loop.epoch, "miou": miou}
            paths.append(os.path.join(args.out, "best.pt"))
    loop.save(*paths)  # after validation: its RNG draws are in the state, so a resume is exact


def log_validation(args, val, net, teacher, device, epoch, step):
    """Pseudo-label mIoU on a fixed subset of the validation set (val: its JSON, read once), through
    label.py's inference path with the label-time settings this run's checkpoints recommend."""
    s = recipes.label_settings(args)
    nets = {"task": [net], "teacher": [teacher], "avg": [net, teacher]}[s.net]
    res = evaluation.validate(nets, val, args.val_images, device, s, max_images=args.val_max_images)
    print(f"val epoch {epoch}: " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), file=sys.stderr,
          flush=True)
    with open(os.path.join(args.out, "val.jsonl"), "a") as f:
        f.write(json.dumps(dict(epoch=epoch, step=step, **res)) + "\n")
    return res


def dummy_batch(size):
    """A zero-weighted crop for a batch whose images were all unreadable: the rank still joins DDP's
    all-reduce."""
    return dict(image=torch.zeros(1, 3, size, size, dtype=torch.uint8), box_mask=torch.ones(1, size, size),
                teacher_image=torch.zeros(1, 3, size, size, dtype=torch.uint8),
                gt_mask=torch.zeros(1, size, size))


def check_teacher(d, teacher):
    """The EMA teacher must be the same on every rank (§3.2): compare its parameters' sums, bit for bit."""
    fp = torch.stack([p.detach().double().sum() for p in teacher.parameters()])
    fps = util.all_gather(d, fp.to(d.device))
    if not all(torch.equal(f.cpu(), fps[0].cpu()) for f in fps):
        raise RuntimeError("the EMA teacher differs between ranks")


def seconds_per_crop(net, teacher, size, device):
    """One crop through the task network, forward and backward, and the teacher, timed; the weights,
    their gradients (none before the first step) and the random state are left as they were."""
    rng = torch.get_rng_state()
    x = torch.zeros(1, 3, size, size, device=device)
    t0 = time.perf_counter()
    net(x).float().mean().backward()
    with torch.no_grad():
        teacher(x)
    net.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return time.perf_counter() - t0


def announce(args, d, run, schedule, step, stop_step, global_batch, demo_command):
    """What is about to run, before the first step (rank 0), and a warning for each of: a warm-up or
    loss ramp longer than the run; a run on the CPU that is not --demo (what it is, its time from one
    timed crop, the --demo command); torch's DataLoader worker warning (once, not once per line of its
    code that checks)."""
    log = util.rank0_log(d)
    log(f"{args.arch}/{args.patch_size} at {args.img_size}px on {d.world}× {d.device.type}: {schedule}"
        + ("" if args.gt_masks else f"; the MIL and CRF loss weights ramp in over {args.loss.mil_ramp} and "
                                    f"{args.loss.crf_ramp} steps (the total loss may rise meanwhile)"))
    util.dataloader_warning_once()
    ramps = [("--warmup-steps", args.warmup_steps)]
    ramps += [] if args.gt_masks else [("mil_ramp", args.loss.mil_ramp), ("crf_ramp", args.loss.crf_ramp)]
    long = [f"{flag} {n}" for flag, n in ramps if n > stop_step]
    if long:
        log(f"train.py: warning: {' and '.join(long)} steps, longer than the run's {stop_step}: the learning "
            f"rate or loss weight never reaches its full value")
    if d.device.type == "cpu" and not args.demo and d.rank == 0:
        secs = seconds_per_crop(run.net, run.teacher, args.img_size, d.device)
        steps, crops = stop_step - step, global_batch // d.world  # a rank's crops a step
        log(f"train.py: warning: no GPU and no --demo: {steps} steps of {global_batch} crops of "
            f"{args.arch}/{args.patch_size} at {args.img_size}px take about "
            f"{util.duration(secs * crops * steps)} on this CPU ({secs:.2f} s a crop, timed). "
            f"The CPU recipe (about 3 min on 2 cores): {demo_command}")


def main(argv=None):
    """The command: train() under SIGINT / SIGTERM handling (util.Stop: one line, last.pt kept)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    with util.run_stop("train.py", argv, os.path.join(args.out, "last.pt")) as stop:
        train(args, stop, util.command_line([*argv, "--demo"]))


def train(args, stop, demo_command):
    try:
        d = util.setup_distributed(args.device)
        if args.demo_data and d.rank == 0:
            synthetic.make_demo(recipes.DEMO_ROOT)
        util.barrier(d)
        init = encoder_from_init(args, d) if args.init else None
        check_inputs(args)
        os.makedirs(args.out, exist_ok=True)
        dataset, sampler, steps_per_epoch = make_data(args, d)
        if args.epochs is None:  # the epochs that give --steps (the demo's: 10 for its 1,202 boxes)
            args.epochs = max(1, round(args.steps / steps_per_epoch)) if args.steps else 10
        global_batch = args.batch_size * args.accum * d.world
        peak_lr = args.lr_per_image * global_batch
        net, model_args, opt = make_model(args, d.device, peak_lr, init)
        del init  # the model holds it now
        ckpt_path = util.resume_path(args)
        ck = util.resume_state(ckpt_path, dict(vars(args), world=d.world, model_args=model_args), RESUME_KEYS,
                               "train.py") if ckpt_path else None
    except util.InputError as e:
        util.fail("train.py", e)
    log = util.rank0_log(d)
    log(f"train: {dataset.describe()}")
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps or total_steps)
    teacher = mal.make_teacher(net)  # the EMA teacher (§3.2)
    run = Run(args, d, net, teacher, opt, model_args)
    step, epoch = (ck["step"], ck["epoch"]) if ck else (0, 0)
    if ck:
        run.resume(ck)
        log(f"resumed {ckpt_path} at step {step} (epoch {epoch})")
    torch.manual_seed(args.seed + 1000003 * d.rank)  # each rank its own stochastic-depth masks
    if ck:
        teacher.load_state_dict(ck["teacher"])
        torch.set_rng_state(ck["rng"][d.rank]["torch"])
        if d.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"][d.rank]["cuda"], d.device)
    announce(args, d, run, f"{steps_per_epoch} steps/epoch, {total_steps} steps in all, stop at {stop_step}; "
             f"global batch {global_batch}, peak lr {peak_lr:.3g}", step, stop_step, global_batch,
             demo_command)
    # DDP broadcasts rank 0's weights; the teacher is then updated identically on every rank.
    task = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.ddp else net
    run_task, run_teacher = (torch.compile(task), torch.compile(teacher)) if args.compile else (task, teacher)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    loop = util.Loop(args, d, stop, dataset, sampler, data.collate_boxes, steps_per_epoch, stop_step,
                     step=step, epoch=epoch, checkpoint=run.checkpoint, rng_state=run.rng_state,
                     rate=("crops/s", "crops_per_s"), samples="crops")
    while loop.next_step():
        lr = util.lr_at(loop.step, total_steps, peak_lr, args.warmup_steps, peak_lr * args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        for b, weight, sync in loop.micro_batches(task):
            # crops of missing / corrupt images (data.py names each once)
            loop.progress.unreadable += b["n_invalid"]
            b = b if weight else dummy_batch(args.img_size)
            image = data.normalize(b["image"].to(d.device, non_blocking=True))
            clean = data.normalize(b["teacher_image"].to(d.device, non_blocking=True))
            box = b["box_mask"].to(d.device, non_blocking=True)
            with autocast, sync:
                if args.gt_masks:
                    loss, terms = mal.gt_mask_loss(run_task(image),
                                                   b["gt_mask"].to(d.device, non_blocking=True),
                                                   loss_size=args.loss.loss_size)
                else:
                    with torch.no_grad():
                        t_logits = run_teacher(clean)
                    loss, terms = objective.loss(run_task(image), t_logits, clean, box, loop.step, args.loss)
                (loss * weight).backward()
            loop.progress.add(terms, weight)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mal.ema_update(teacher, net, args.ema)
        # the loss weights of the step just taken: while they ramp in, the total loss can rise
        weights = ({} if args.gt_masks
                   else dict(zip(("w_mil", "w_crf"), objective.loss_weights(loop.step, args.loss))))
        if loop.end_step(lr, weights):
            epoch_end(args, run, loop)
    loop.finish()
    log(f"done: step {loop.step}, {loop.last}"
        + (f"; best.pt: epoch {run.best['epoch']}, mIoU {run.best['miou']:.3f}"
           if run.best["epoch"] is not None else ""))
    if d.rank == 0 and args.demo and args.val_json and loop.step % steps_per_epoch:
        log_validation(args, run.val, net, teacher, d.device, loop.epoch, loop.step)  # epoch ends validated
    if d.ddp:
        check_teacher(d, teacher)
        log(f"teacher identical on all {d.world} ranks")
    util.shutdown(d)


if __name__ == "__main__":
    main()
