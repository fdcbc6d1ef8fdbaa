"""MAE self-supervised pretraining of MAL's ViT encoder (He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022): the encoder that train.py --init then starts from.

    python pretrain.py                                     # the demo: ~2.5 min on a CPU -> demo/pretrain/
    python pretrain.py --images DIR --out runs/mae         # every image under DIR
    python pretrain.py --json boxes.json --images DIR --out runs/mae   # the box crops MAL trains on
    torchrun --nproc_per_node 8 pretrain.py --json boxes.json --images DIR --out runs/mae   # DDP
    python train.py --train-json boxes.json --images DIR --init runs/mae/last.pt ...

MAE: a random 75% of each view's patches are masked; the encoder sees only the visible patches; a
light decoder takes the encoded visible patches plus a shared, learned mask token at every masked
position (all with fixed 2-D sine-cosine position embeddings) and predicts every patch's pixels;
the loss is the mean squared error on the masked patches only, against each patch's pixels
normalised by that patch's own mean and variance. Only the encoder is kept for MAL.

The loop is train.py's (util.Loop): rank and world size come from torchrun's environment. The run
folder holds last.pt (written at each epoch's end, about every --save-minutes and on Ctrl-C or SIGTERM),
log.jsonl and vis/ (--vis). last.pt is in MAE's published layout: `model` = the
encoder's keys (mal.VisionTransformer's names) plus decoder_* and mask_token, so mal.load_pretrained
(train.py --init) and other MAE tools read it; its other top-level keys are what --resume needs.
"""
import options

if __name__ == "__main__":
    options.pretrain_parser().parse_known_args()  # --help answers before torch loads

import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import coco
import data
import mal
import recipes
import synthetic
import util

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# ----------------------------------------------------------------------------------------------
# The model: mal's ViT encoder plus MAE's decoder.


def num_visible(num_patches, mask_ratio):
    """Patches left visible: round(N·(1 − mask ratio))."""
    return int(round(num_patches * (1 - mask_ratio)))


def random_masking(batch, num_patches, mask_ratio, generator):
    """MAE's random masking, per view: a uniformly random subset of num_visible patches stays visible.
    Returns ids_keep [B, K] (the visible patches, in random order) and mask [B, N] (True: masked)."""
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    ids_keep = order[:, :num_visible(num_patches, mask_ratio)]
    mask = torch.ones(batch, num_patches, dtype=torch.bool).scatter_(1, ids_keep, False)
    return ids_keep, mask


def patchify(images, p):
    """[B, C, H, W] -> [B, N, p·p·C]: patches in the patch embedding's (row-major) order, each patch's
    pixels row by row with the channels last (MAE's layout of decoder_pred)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    return images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(patches, p, h, w):
    """Inverse of patchify: [B, h·w, p·p·C] -> [B, C, h·p, w·p]."""
    B = patches.shape[0]
    return patches.reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, h * p, w * p)


def patch_targets(images, p, norm_pix=True):
    """The reconstruction targets: each patch's pixels normalised by that patch's own mean and variance
    (MAE's normalised pixels), or the pixels as they are (norm_pix=False: the target then keeps each
    patch's colour). Returns (target, mean, std), all [B, N, ·], in float32."""
    patches = patchify(images.float(), p)
    if not norm_pix:
        return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    std = (var + 1e-6).sqrt()
    return (patches - mean) / std, mean, std


def reconstruction_loss(pred, images, mask, p, norm_pix=True):
    """Mean squared error per patch, averaged over the masked patches only. pred [B, N, p·p·3] the
    decoder's output, images [B, 3, H, W] the (normalised) views, mask [B, N] True where masked."""
    target, _, _ = patch_targets(images, p, norm_pix)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()  # no boolean indexing: no host sync on the GPU


def reconstruct_pixels(pred, images, p, norm_pix=True):
    """The decoder's output as images [B, 3, H, W]: with normalised targets, each patch un-normalised
    with the mean and variance of the view's own patch there (MAE's visualisation)."""
    _, mean, std = patch_targets(images, p, norm_pix)
    h, w = images.shape[-2] // p, images.shape[-1] // p
    return unpatchify(pred.float() * std + mean, p, h, w)


# MAE's encoder: the plain ViTs (none of LayerScale, register tokens or a SwiGLU MLP).
ARCHS = [name for name, c in mal.VIT_CONFIGS.items()
         if not (c.get("init_values") or c.get("reg_tokens") or c.get("swiglu"))]


class MaskedAutoencoder(mal.VisionTransformer):
    """MAE around mal's ViT encoder E. The encoder's modules are mal.VisionTransformer's own (inherited),
    so state_dict() is MAE's published layout: the encoder's keys as mal names them, plus
    decoder_embed, mask_token, decoder_pos_embed, decoder_blocks (mal.Block), decoder_norm and
    decoder_pred. forward(images, ids_keep) -> the predicted pixels of every patch [B, N, p·p·3]."""

    def __init__(self, arch="vit_base", patch_size=16, img_size=224, depth=None, decoder_dim=512,
                 decoder_depth=8, decoder_heads=16):
        c = mal.VIT_CONFIGS[arch]
        dim = c["embed_dim"]
        super().__init__(img_size, patch_size or c["patch_size"], dim, depth or c["depth"], c["num_heads"])
        grid = img_size // self.patch_size
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, decoder_dim))
        self.decoder_blocks = nn.ModuleList(mal.Block(decoder_dim, decoder_heads)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        # MAE's initialisation: xavier_uniform for every linear map (the patch embedding as one),
        # N(0, 0.02²) for the tokens, fixed sine-cosine position embeddings (no gradient; the
        # encoder's already start as that table).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(mal.sincos_pos_embed(decoder_dim, grid))
        self.pos_embed.requires_grad_(False)
        self.decoder_pos_embed.requires_grad_(False)

    def encode(self, images, ids_keep):
        """The encoder on the visible patches only: [B, 1 + K, C] (class token first), after the norm."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decode(self, latent, ids_keep):
        """Encoded visible patches + mask tokens at the masked positions -> pixels of all N patches."""
        x = self.decoder_embed(latent)
        B, D, N = len(x), x.shape[-1], self.decoder_pos_embed.shape[1] - 1
        tokens = self.mask_token.to(x.dtype).expand(B, N, D).scatter(1, ids_keep[..., None].expand(-1, -1, D),
                                                                     x[:, 1:])
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images, ids_keep):
        return self.decode(self.encode(images, ids_keep), ids_keep)


# ----------------------------------------------------------------------------------------------
# Views: random resized crops of whole images, or the RoI crops of a box JSON. A sample is
# dict(image=uint8 [3, S, S], error=None) or, for an unreadable image, dict(image=zeros, error=
# "<path>: <reason>"); the loop reports each such file once and counts the views it skipped.


def find_images(folder):
    """Paths (relative to folder) of the image files under it, recursively (symbolic links followed,
    each real folder once), the extension compared case-insensitively; sorted."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def random_resized_box(width, height, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop box (x0, y0, x1, y1) covering a uniform fraction `scale` of the image's area with a
    log-uniform aspect ratio in `ratio` (MAE's augmentation); up to 10 draws, then the largest
    centred box of the nearest allowed aspect ratio."""
    area = width * height
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
        w, h = (target * aspect) ** 0.5, (target / aspect) ** 0.5
        if w <= width and h <= height:
            x0, y0 = (width - w) * u[2], (height - h) * u[3]
            return (x0, y0, min(x0 + w, width), min(y0 + h, height))  # PIL refuses a box past the edge
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = min(width, height * aspect), min(height, width / aspect)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return (x0, y0, x0 + w, y0 + h)


class ImageViews(torch.utils.data.Dataset):
    """One sample = one image file as a random resized crop (bicubic, to size × size), flipped
    horizontally with probability 1/2. The randomness of sample i is seeded by (seed, epoch, i):
    samples do not depend on the worker count or the order; call set_epoch(e) before each epoch."""

    def __init__(self, image_dir, files, size, seed=0):
        self.image_dir, self.size, self.seed, self.epoch = os.fspath(image_dir), int(size), int(seed), 0
        # numpy, not a list: no copy-on-access in forked workers; a box index's names stay in its file
        self.files = files if isinstance(files, data.FileNames) else np.array(files, dtype=str)

    def __len__(self):
        return len(self.files)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def describe(self):
        return f"{len(self)} images under {self.image_dir}"

    def __getitem__(self, i):
        try:
            img = data.load_rgb(os.path.join(self.image_dir, str(self.files[i])))
        except data.ImageError as e:
            return dict(image=torch.zeros(3, self.size, self.size, dtype=torch.uint8), error=str(e))
        g = torch.Generator().manual_seed(data._sample_seed(self.seed, self.epoch, i))
        view = img.resize((self.size, self.size), Image.BICUBIC, box=random_resized_box(*img.size, g))
        if torch.rand(1, generator=g).item() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        return dict(image=torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1).contiguous(),
                    error=None)


class BoxViews(torch.utils.data.Dataset):
    """One sample = one box's RoI crop exactly as MAL trains on it (data.BoxDataset(train=True,
    color_aug=False): the §3.1 random expansion and a random flip, no colour augmentation)."""

    def __init__(self, ann_json, image_dir, size, min_area, seed=0):
        self.boxes = data.BoxDataset(ann_json, image_dir, size=size, train=True, color_aug=False,
                                     min_area=min_area, seed=seed,
                                     report=False)  # the loop reports once per file

    def __len__(self):
        return len(self.boxes)

    def set_epoch(self, epoch):
        self.boxes.set_epoch(epoch)

    def describe(self):
        return self.boxes.describe()

    def __getitem__(self, i):
        s = self.boxes[i]
        if s["valid"]:
            return dict(image=s["image"], error=None)
        ds = self.boxes
        path = os.path.join(ds.image_dir, str(ds.file_names[ds.img_rows[int(i)]]))
        return dict(image=s["image"], error=ds.bad_images[path])


def collate_views(samples):
    """dict(image=uint8 [n, 3, S, S] of the readable views (n may be 0), errors=[the others' errors])."""
    good = [s["image"] for s in samples if s["error"] is None]
    image = (torch.stack(good) if good
             else samples[0]["image"].new_empty((0,) + tuple(samples[0]["image"].shape)))
    return dict(image=image, errors=[s["error"] for s in samples if s["error"] is not None])


# ----------------------------------------------------------------------------------------------
# Reconstructions for people to look at (--vis)


def to_uint8(images):
    """ImageNet-normalised float images [B, 3, H, W] (data.normalize's output) back to uint8."""
    mean = torch.tensor(data.IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD, device=images.device).view(3, 1, 1) * 255
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def write_reconstructions(model, dataset, n, out_dir, device, mask_ratio, seed, autocast, norm_pix=True):
    """PNGs of the first n readable views of epoch 0: original | masked (grey) | reconstruction. The
    reconstruction is the decoder's raw output on every patch, visible ones included (as in MAE's
    figures), each patch un-normalised with the original patch's mean and variance."""
    dataset.set_epoch(0)
    views = []
    for i in range(len(dataset)):
        if len(views) == n:
            break
        s = dataset[i]
        if s["error"] is None:
            views.append(s["image"])
    if not views:
        return []
    images = data.normalize(torch.stack(views).to(device))
    p = model.patch_size
    h, w = images.shape[-2] // p, images.shape[-1] // p
    ids_keep, mask = random_masking(len(images), h * w, mask_ratio, torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    with autocast:
        pred = model(images, ids_keep.to(device))
    model.train(was_training)
    original = to_uint8(images).cpu()
    masked = patchify(original, p).clone()
    masked[mask] = 128
    panels = [original, unpatchify(masked, p, h, w),
              to_uint8(reconstruct_pixels(pred, images, p, norm_pix)).cpu()]
    os.makedirs(out_dir, exist_ok=True)
    gap = torch.full((3, original.shape[-2], 2), 255, dtype=torch.uint8)
    written = []
    for k in range(len(original)):
        row = torch.cat([t for panel in panels for t in (panel[k], gap)][:-1], dim=-1)
        path = os.path.join(out_dir, f"{k:03d}.png")
        with util.atomic_file(path) as f:
            Image.fromarray(row.permute(1, 2, 0).numpy()).save(f, format="PNG")
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# The command line and the loop


def get_args(argv=None):
    p = options.pretrain_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or p.parse_args(argv).demo:
        p.set_defaults(**recipes.PRETRAIN_DEMO)
    args = p.parse_args(argv)
    args.demo = args.demo or not argv
    if args.arch not in ARCHS:
        p.error(f"--arch {args.arch}: not one of {', '.join(ARCHS)}")
    if not args.images:
        p.error("--images is required (or run with no arguments for the demo)")
    if args.views == "boxes" and not args.json:
        p.error("--views boxes needs --json (the boxes to crop)")
    args.views = args.views or ("boxes" if args.json else "images")
    if args.img_size % args.patch_size:
        p.error(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    n = (args.img_size // args.patch_size) ** 2
    if not 1 <= num_visible(n, args.mask_ratio) < n:
        p.error(f"--mask-ratio {args.mask_ratio} leaves {num_visible(n, args.mask_ratio)} of {n} patches "
                f"visible; at least one must be visible and one masked")
    if args.decoder_dim % 4 or args.decoder_dim % args.decoder_heads:
        p.error(f"--decoder-dim {args.decoder_dim} must be divisible by 4 (sine-cosine) and by "
                f"--decoder-heads")
    return args


def make_views(args):
    """The dataset the flags ask for; an InputError naming the file or folder otherwise."""
    if not os.path.isdir(args.images):
        raise util.InputError(f"--images {args.images}: no such image folder")
    if args.views == "boxes":
        return BoxViews(args.json, args.images, args.img_size, args.min_area, args.seed)
    if args.json:
        files = data.FileNames(coco.box_index(args.json, what="--json", results=False))  # as BoxDataset
    else:
        files = find_images(args.images)
        if not files:
            raise util.InputError(f"{args.images}: no images ({', '.join(IMAGE_EXTENSIONS)}, any case)")
    return ImageViews(args.images, files, args.img_size, args.seed)


def make_model(args, device, lr):
    """MAE's encoder and decoder, and their AdamW: no weight decay on norms, biases and the tokens
    (the position embeddings are fixed)."""
    torch.manual_seed(args.seed)
    model_args = dict(arch=args.arch, patch_size=args.patch_size, img_size=args.img_size, depth=args.depth,
                      decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                      decoder_heads=args.decoder_heads)
    net = MaskedAutoencoder(**model_args).to(device)
    opt = util.adamw(net.named_parameters(), lr, weight_decay=args.weight_decay, betas=(0.9, 0.95),
                     no_decay=("cls_token", "mask_token"), fused=device.type == "cuda")
    return net, model_args, opt


RESUME_KEYS = ("model_args", "world", "views", "batch_size", "accum", "epochs", "seed", "mask_ratio",
               "norm_pix")


def main(argv=None):
    """The command: pretrain() under SIGINT / SIGTERM handling (util.Stop: one line, last.pt kept)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    with util.run_stop("pretrain.py", argv, os.path.join(args.out, "last.pt")) as stop:
        pretrain(args, stop)


def pretrain(args, stop):
    try:
        d = util.setup_distributed(args.device)
        if args.demo and d.rank == 0:
            synthetic.make_demo(recipes.DEMO_ROOT)
        util.barrier(d)
        dataset = make_views(args)
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, d.world, d.rank, shuffle=True,
                                                                  seed=args.seed, drop_last=True)
        steps_per_epoch = util.steps_per_epoch(sampler, args.batch_size, args.accum, d.world,
                                               f"{args.json or args.images}: {len(dataset)} views")
        global_batch = args.batch_size * args.accum * d.world
        peak_lr = args.lr_per_image * global_batch
        net, model_args, opt = make_model(args, d.device, peak_lr)
        ckpt_path = util.resume_path(args)
        ck = util.resume_state(ckpt_path, dict(vars(args), world=d.world, model_args=model_args), RESUME_KEYS,
                               "pretrain.py") if ckpt_path else None
    except util.InputError as e:
        util.fail("pretrain.py", e)
    device = d.device
    log = util.rank0_log(d)
    log(f"views: {args.views} at {args.img_size}px, {dataset.describe()}")
    os.makedirs(args.out, exist_ok=True)
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps or total_steps)
    warmup = round(0.05 * total_steps) if args.warmup_steps is None else args.warmup_steps
    num_patches = (args.img_size // args.patch_size) ** 2
    # Masks are drawn on the CPU from a generator of their own: the same masks on any device, and
    # its state (one per rank) is all the randomness a resume has to restore.
    mask_rng = torch.Generator().manual_seed(args.seed + 1000003 * d.rank)
    step, epoch = 0, 0
    if ck:
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        mask_rng.set_state(ck["rng"][d.rank]["mask"])
        step, epoch = ck["step"], ck["epoch"]
        log(f"resumed {ckpt_path} at step {step} (epoch {epoch})")
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if d.ddp else net
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    log(f"MAE {args.arch}/{args.patch_size} at {args.img_size}px, mask ratio {args.mask_ratio} "
        f"({num_visible(num_patches, args.mask_ratio)} of {num_patches} patches visible), decoder "
        f"{args.decoder_depth}×{args.decoder_dim} on {d.world}× {device.type}: "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps in all, stop at {stop_step}; "
        f"global batch {global_batch}, peak lr {peak_lr:.3g}, warm-up {warmup} steps")
    reported = set()  # the unreadable images' errors this rank has printed
    util.dataloader_warning_once()
    # last.pt is in MAE's layout: `model` the encoder and the decoder, the rest what --resume needs
    loop = util.Loop(args, d, stop, dataset, sampler, collate_views, steps_per_epoch, stop_step, step=step,
                     epoch=epoch, rng_state=lambda: {"mask": mask_rng.get_state()},
                     checkpoint=lambda **position: {"model": net.state_dict(), "model_args": model_args,
                                                    "optimizer": opt.state_dict(), **position},
                     rate=("img/s", "images_per_s"), samples="views")
    while loop.next_step():
        lr = util.lr_at(loop.step, total_steps, peak_lr, warmup, 0.0)
        for g in opt.param_groups:
            g["lr"] = lr
        for b, weight, sync in loop.micro_batches(model):
            for err in b["errors"]:
                if err not in reported:
                    reported.add(err)
                    print(f"pretrain: skipping unreadable image {err}", file=sys.stderr, flush=True)
            loop.progress.unreadable += len(b["errors"])
            images = b["image"]
            if not weight:  # every view unreadable: a dummy, so that the rank still joins DDP's all-reduce
                images = torch.zeros(1, 3, args.img_size, args.img_size, dtype=torch.uint8)
            images = data.normalize(images.to(device, non_blocking=True))
            ids_keep, mask = random_masking(len(images), num_patches, args.mask_ratio, mask_rng)
            with autocast, sync:
                pred = model(images, ids_keep.to(device, non_blocking=True))
                loss = reconstruction_loss(pred, images, mask.to(device, non_blocking=True),
                                           args.patch_size, args.norm_pix)
                (loss * weight).backward()
            loop.progress.add({"loss": loss.detach()}, weight)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loop.end_step(lr):
            loop.save()
    loop.finish()
    unreadable = int(util.all_reduce(d, torch.tensor([loop.progress.unreadable], device=device)).item())
    log(f"done: step {loop.step}, {loop.last}"
        + (f"; {unreadable} unreadable views skipped on {d.world} ranks" if unreadable else ""))
    if d.rank == 0 and args.vis:
        written = write_reconstructions(net, dataset, args.vis, os.path.join(args.out, "vis"), device,
                                        args.mask_ratio, args.seed, autocast, args.norm_pix)
        log(f"{len(written)} reconstructions in {os.path.join(args.out, 'vis')}")
    util.shutdown(d)


if __name__ == "__main__":
    main()
