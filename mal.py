"""MAL: Vision Transformers Are Good Mask Auto-Labelers (Lan et al., CVPR 2023), in plain PyTorch.

One file, in the paper's order:
  §3.1  RoI input ............ expand_box, expand_box_fixed
  §3.2  Task network ......... VisionTransformer (image encoder E), MaskDecoder (K·V), MAL
        EMA teacher .......... make_teacher, ema_update
  §3.3  Losses ............... dice, mil_loss (Eq. 2), mean_field (Eq. 3-4), crf_labels and
                               crf_loss (Eq. 5), mal_loss (Eq. 1)
  §4.6  Clustering score ..... clustering_score (Eq. 6): how well encoder features separate FG/BG
  Upper bound ................ gt_mask_loss: the same network trained on GT masks (not MAL)
Pretrained encoders (MAE, DeiT, DeiT III, DINOv2, timm, our own checkpoints) load with load_pretrained.
Nothing here goes beyond the paper: what this implementation adds to the training objective (loss
ramps, the CRF's unary weight and resolution, the flood) is in objective.py.
"""
import copy
import functools
import math
import re
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import crf_ext
import util

# ----------------------------------------------------------------------------------------------
# §3.1 RoI input: each box is randomly expanded, then cropped and resized (cropping is in data.py)


def expand_box(box, theta=1.2, generator=None):
    """Random box expansion of §3.1; returns the expanded (x0, y0, x1, y1), not clipped.

    θ_x, θ_y ~ U[0, θ]; β_x ~ U[0, θ_x], β'_x = θ_x - β_x (likewise y). The left edge's distance
    from the centre grows by (1 + β_x), the right edge's by (1 + β'_x): the total expansion along x
    is exactly θ_x, split at random between the two sides (so the box is not always centred).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    r = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    theta_x, theta_y = r[0] * theta, r[1] * theta
    beta_x, beta_y = r[2] * theta_x, r[3] * theta_y
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - (cx - x0) * (1 + beta_x), cy - (cy - y0) * (1 + beta_y),
            cx + (x1 - cx) * (1 + theta_x - beta_x), cy + (y1 - cy) * (1 + theta_y - beta_y))


def expand_box_fixed(box, expand=0.2):
    """Deterministic test-time expansion for labeling: each side's distance from the centre
    ×(1 + expand)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    e = 1 + expand
    return (cx - (cx - x0) * e, cy - (cy - y0) * e, cx + (x1 - cx) * e, cy + (y1 - cy) * e)


# ----------------------------------------------------------------------------------------------
# §3.2 Image encoder E: a standard ViT (Dosovitskiy et al.), classification head dropped.
# Parameter names follow timm / MAE / DeiT so that their checkpoints load as they are. Options for
# newer encoders: LayerScale (DeiT III, DINOv2), register tokens and a SwiGLU MLP (DINOv2).


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)  # [B, C, H/p, W/p]


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.fused = True  # False: the explicit softmax(QKᵀ/√d)V, the "naive" baseline of bench.py
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        else:
            x = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU MLP (DINOv2's ViT-g): fc2(silu(a) * b) with [a, b] = fc1(x), fc1 packing both halves
    (timm's SwiGLUPacked; DINOv2 names fc1 / fc2 w12 / w3). DINOv2 sizes the hidden width at 2/3 of
    the GELU MLP's, rounded up to a multiple of 8 (4096 for ViT-g's 1536 × 4)."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = (int(dim * mlp_ratio) * 2 // 3 + 7) // 8 * 8
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (CaiT), starting small (init_values) so that deep
    ViTs train stably."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; init_values adds LayerScale (ls1, ls2), swiglu the SwiGLU MLP."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, init_values=None, swiglu=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_ratio) if swiglu else Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


def resample_pos_embed(pos_embed, grid_hw, num_prefix=1):
    """Resample [1, prefix + h*w, C] position embeddings to another grid, the MAE way
    (bicubic, align_corners=False, no antialias), so a 224-pretrained encoder runs at 512."""
    n = pos_embed.shape[1] - num_prefix
    gs = math.isqrt(n)
    if gs * gs != n:
        raise ValueError(f"pos_embed has {n} grid positions, which is not a square grid")
    if (gs, gs) == tuple(grid_hw):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = grid.reshape(1, gs, gs, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sine-cosine position embedding for a grid × grid patch grid: [1, 1 + grid², dim],
    the class token's slot zero. The first dim/2 channels encode the patch's column, the last dim/2
    its row, each as [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−k/(dim/4)), k = 0 … dim/4 − 1."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs a width divisible by 4, not {dim}")
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")

    def code(pos):
        angle = pos.flatten()[:, None] * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([code(cols), code(rows)], dim=1)])
    return table.float()[None]


class VisionTransformer(nn.Module):
    """forward(x [B,3,H,W]) -> patch features [B, C, H/p, W/p] (class and register tokens dropped after
    the final norm).

    The position embeddings start as MAE's 2-D sine-cosine table (and are learned from there): an
    encoder trained from scratch on a few hundred images learns the layout of its patches far more
    slowly from random ones (GT-mask training of the demo model: 0.63 vs 0.79 val mIoU at equal steps).
    Pretrained weights replace them anyway. pos_embed always has the class token's slot (DeiT III and
    timm's DINOv2 with registers have none: load_pretrained gives them a zero one, which is the same).

    init_values: LayerScale's start (None: none); reg_tokens: register tokens (reg_token), which join
    after the position embeddings are added, between the class token and the patches, as in DINOv2;
    swiglu: SwiGLU MLPs. Without them this is the plain ViT of MAE, DeiT and timm."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.0, init_values=None, reg_tokens=0, swiglu=False):
        super().__init__()
        self.arch = "VisionTransformer"  # vit() gives the architecture's name, for error messages
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.num_prefix_tokens = 1 + reg_tokens
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, init_values, swiglu)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(_init_weights)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(embed_dim, grid))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if reg_tokens:
            nn.init.normal_(self.reg_token, std=1e-6)  # as DINOv2 and timm

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, h, w = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + resample_pos_embed(self.pos_embed, (h, w))
        if self.reg_token is not None:
            x = torch.cat([x[:, :1], self.reg_token.expand(B, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, self.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(B, C, h, w)


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _config(dim, depth, heads, patch, **options):
    return dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, **options)


_DINOV2 = dict(init_values=1e-5)  # DINOv2 (its _reg4 models: 4 register tokens), patch 14
_DEIT3 = dict(init_values=1e-6)  # DeiT III, patch 16
VIT_CONFIGS = {  # name: VisionTransformer's arguments, patch_size the default patch size
    "vit_tiny": _config(192, 12, 3, 16),
    "vit_small": _config(384, 12, 6, 16),
    "vit_base": _config(768, 12, 12, 16),
    "vit_large": _config(1024, 24, 16, 16),
    "vit_huge": _config(1280, 32, 16, 14),
    "vit_small_dinov2": _config(384, 12, 6, 14, **_DINOV2),
    "vit_base_dinov2": _config(768, 12, 12, 14, **_DINOV2),
    "vit_large_dinov2": _config(1024, 24, 16, 14, **_DINOV2),
    "vit_giant_dinov2": _config(1536, 40, 24, 14, **_DINOV2, swiglu=True),
    "vit_small_dinov2_reg4": _config(384, 12, 6, 14, **_DINOV2, reg_tokens=4),
    "vit_base_dinov2_reg4": _config(768, 12, 12, 14, **_DINOV2, reg_tokens=4),
    "vit_large_dinov2_reg4": _config(1024, 24, 16, 14, **_DINOV2, reg_tokens=4),
    "vit_giant_dinov2_reg4": _config(1536, 40, 24, 14, **_DINOV2, swiglu=True, reg_tokens=4),
    "deit3_small": _config(384, 12, 6, 16, **_DEIT3),
    "deit3_base": _config(768, 12, 12, 16, **_DEIT3),
    "deit3_large": _config(1024, 24, 16, 16, **_DEIT3),
}


def vit(name, patch_size=None, img_size=224, drop_path=0.0, depth=None):
    """Build a named ViT; `depth` overrides the block count (e.g. a 4-block vit_tiny for the CPU demo)."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(VIT_CONFIGS)}")
    cfg = dict(VIT_CONFIGS[name], drop_path=drop_path)
    cfg["patch_size"], cfg["depth"] = patch_size or cfg["patch_size"], depth or cfg["depth"]
    model = VisionTransformer(img_size, **cfg)
    model.arch = name
    return model


def vit_tiny(**kw): return vit("vit_tiny", **kw)
def vit_small(**kw): return vit("vit_small", **kw)
def vit_base(**kw): return vit("vit_base", **kw)
def vit_large(**kw): return vit("vit_large", **kw)
def vit_huge(**kw): return vit("vit_huge", **kw)


# Keys of public checkpoints that are not part of the encoder: classifier heads, DeiT's distillation
# token and head, MAE's decoder and mask token (DINOv2's too).
_DROP_PREFIXES = ("head", "fc_norm", "dist_token", "decoder_", "mask_token")
# The DINOv2 and DeiT III authors' names for timm's (and ours): DINOv2's register_tokens and SwiGLU
# w12 / w3, DeiT III's gamma_1 / gamma_2 (LayerScale).
_RENAMES = ((r"^register_tokens$", "reg_token"), (r"\.mlp\.w12\.", ".mlp.fc1."),
            (r"\.mlp\.w3\.", ".mlp.fc2."), (r"\.gamma_([12])$", r".ls\1.gamma"))


def _options(sd):
    """What an encoder's state dict says it was built with beyond the tensors' shapes, in words."""
    ls = "LayerScale" if any(k.endswith(".ls1.gamma") for k in sd) else "no LayerScale"
    return ls + (f", {sd['reg_token'].shape[1]} register tokens" if "reg_token" in sd
                 else ", no register tokens")


def read_pretrained(path):
    """(encoder, decoder) state dicts of a pretrained file, the encoder's under timm's names.

    Unwraps `model` / `state_dict` / `module.` / `backbone.` / `encoder.` wrappers, drops heads and
    the MAE decoder, renames the DINOv2 and DeiT III authors' keys to timm's; a MAL checkpoint gives
    its teacher's encoder and decoder."""
    sd = util.load_checkpoint(path, "pretrained weights")
    for key in ("teacher", "model", "state_dict", "module"):  # teacher: this project's checkpoints
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise util.InputError(f"{path}: no state dict of tensors found (keys: {list(sd)[:8]})")
    enc, dec = {}, {}
    for k, v in sd.items():
        for wrapper in ("module.", "backbone."):
            k = k.removeprefix(wrapper)
        if k.startswith("decoder."):  # our own layout: encoder.* / decoder.* (MAE's are decoder_*)
            dec[k[len("decoder."):]] = v
        elif not k.startswith(_DROP_PREFIXES):
            k = k.removeprefix("encoder.")
            for pattern, name in _RENAMES:
                k = re.sub(pattern, name, k)
            enc[k] = v
    return enc, dec


def pretrained_arch(enc, path):
    """What a pretrained file's encoder (enc: read_pretrained's encoder weights of the file at path) is,
    read off its tensors: dict(arch, patch_size, depth), arch the VIT_CONFIGS name of its width,
    LayerScale and register tokens (DINOv2 or DeiT III by the patch where both fit). A one-line error
    for a file that holds no ViT of a known width."""
    proj = enc.get("patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in enc if (m := re.match(r"blocks\.(\d+)\.", k))}
    if proj is None or proj.dim() != 4 or not blocks:
        raise util.InputError(f"{path}: no ViT encoder found (no patch_embed.proj.weight and blocks.N.*)")
    dim, patch = proj.shape[0], proj.shape[-1]
    layerscale = any(k.endswith(".ls1.gamma") for k in enc)
    regs = enc["reg_token"].shape[1] if "reg_token" in enc else 0
    fits = [name for name, c in VIT_CONFIGS.items() if c["embed_dim"] == dim
            and ("init_values" in c) == layerscale and c.get("reg_tokens", 0) == regs]
    if not fits:
        raise util.InputError(f"{path}: a ViT of width {dim} with {_options(enc)}: no architecture of "
                              f"{', '.join(VIT_CONFIGS)} has it")
    # where both fit (DINOv2 and DeiT III at one width), the family released at this patch
    arch = min(fits, key=lambda name: VIT_CONFIGS[name]["patch_size"] != patch)
    return dict(arch=arch, patch_size=patch, depth=max(blocks) + 1)


def load_pretrained(model, path, weights=None):
    """Load MAE / DeiT / DeiT III / DINOv2 / timm / MAL weights into a VisionTransformer (or a MAL
    model's encoder), as read_pretrained reads them (weights: what it read from path already).

    Resamples pos_embed to the model's grid (giving it a zero class-token slot where the file has
    none), and raises a one-line error naming the file and the architecture when the weights do not
    fit it (tensor shapes, LayerScale, register tokens). A MAL checkpoint given to a MAL model loads
    both encoder and decoder (teacher weights). Prints what was missing or unused."""
    enc, dec = weights if weights is not None else read_pretrained(path)
    encoder = model.encoder if isinstance(model, MAL) else model
    arch = f"{encoder.arch}/{encoder.patch_size}"
    if "pos_embed" in enc:
        pe, grid = enc["pos_embed"], encoder.pos_embed.shape[1] - 1
        n = pe.shape[1]
        if math.isqrt(n) ** 2 == n:  # DeiT III, timm's DINOv2 with registers: no class-token slot
            pe = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
        elif math.isqrt(n - 2) ** 2 == n - 2 and math.isqrt(n - 1) ** 2 != n - 1:
            pe = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)  # DeiT distilled: drop the dist token's slot
        gs = math.isqrt(grid)
        try:
            enc["pos_embed"] = resample_pos_embed(pe, (gs, gs))
        except ValueError as e:
            raise util.InputError(f"{path}: {e}") from e
    target = {"encoder": (encoder, enc)}
    if isinstance(model, MAL) and dec:
        target["decoder"] = (model.decoder, dec)
    missing, unused, loaded = [], [], 0
    for part, (module, weights) in target.items():
        own = module.state_dict()
        for k, v in weights.items():
            if k not in own:
                unused.append(k)
            elif own[k].shape != v.shape:
                raise util.InputError(f"{path}: {part} tensor {k} has shape {tuple(v.shape)} in the file but "
                                 f"{tuple(own[k].shape)} in {arch} (a checkpoint for another "
                                 f"architecture or patch size?)")
        if part == "encoder" and _options(weights) != _options(own):
            raise util.InputError(f"{path}: the file's encoder has {_options(weights)} but {arch} has "
                             f"{_options(own)} (a checkpoint for another architecture?)")
        missing += [f"{part}.{k}" for k in own if k not in weights]
        module.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
        loaded += sum(k in own for k in weights)
    print(f"load_pretrained {path}: loaded {loaded} tensors; missing {missing or 'none'}; "
          f"unused {unused or 'none'}", file=sys.stderr)
    return model


# ----------------------------------------------------------------------------------------------
# §3.2 Mask decoder D(E(I)) = K(E(I)) · V(E(I)), an attention-based decoder after YOLACT.


class MaskDecoder(nn.Module):
    def __init__(self, in_dim, dim=256):
        super().__init__()
        # K, the instance-aware head: global max-pool, then one fully connected layer to 256.
        self.instance_head = nn.Linear(in_dim, dim)
        # V, the pixel-wise head: four 3×3 convs, each followed by ReLU, ×2 bilinear after the second.
        conv = lambda i: nn.Conv2d(i, dim, 3, padding=1)  # noqa: E731
        self.pixel_head = nn.Sequential(
            conv(in_dim), nn.ReLU(inplace=True), conv(dim), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv(dim), nn.ReLU(inplace=True), conv(dim), nn.ReLU(inplace=True))

    def forward(self, feat):
        k = self.instance_head(feat.amax(dim=(2, 3)))  # [B, 256]
        v = self.pixel_head(feat)  # [B, 256, 2h, 2w]
        return torch.einsum("bc,bchw->bhw", k, v)  # mask logits, one map per crop


class MAL(nn.Module):
    """The task network (and, as an EMA copy, the teacher): forward(x [B,3,S,S]) -> logits [B, 2S/p, 2S/p]."""

    def __init__(self, arch="vit_base", patch_size=16, img_size=512, drop_path=0.0, depth=None,
                 decoder_dim=256):
        super().__init__()
        self.encoder = vit(arch, patch_size=patch_size, img_size=img_size, drop_path=drop_path, depth=depth)
        self.decoder = MaskDecoder(self.encoder.embed_dim, decoder_dim)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def make_teacher(net):
    """The EMA teacher: same architecture and weights, no gradients, always in eval mode."""
    teacher = copy.deepcopy(net).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher, net, momentum=0.996):
    """θ_t ← m·θ_t + (1 − m)·θ after every optimizer step. Every rank applies the same update to the
    same (all-reduced) task weights, so under DDP the teacher stays identical on every rank."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# ----------------------------------------------------------------------------------------------
# §3.3 Losses


def dice(p, g, eps=1e-5):
    """Dice loss per crop: 1 − 2Σpg / (Σp² + Σg² + ε), summed over all but the first dimension."""
    p, g = p.flatten(1), g.flatten(1)
    return 1 - 2 * (p * g).sum(1) / ((p * p).sum(1) + (g * g).sum(1) + eps)


def mil_loss(prob, box_mask):
    """Eq. 2. Every row and every column of the crop is a bag, positive iff it crosses the box; a
    bag's score is the max of the mask over it. prob, box_mask: [B, H, W]; mean over crops."""
    rows = dice(prob.amax(dim=2), box_mask.amax(dim=2))
    cols = dice(prob.amax(dim=1), box_mask.amax(dim=1))
    return (rows + cols).mean()


# The 8 neighbours j of pixel i, as (dy, dx); the CUDA / C++ kernel uses the same order.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shift(padded, dy, dx):
    """View of a 1-padded [..., H+2, W+2] tensor at the neighbour (i+dy, j+dx) of every pixel."""
    H, W = padded.shape[-2] - 2, padded.shape[-1] - 2
    return padded[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]


def mean_field(image, prob, box_mask=None, *, iters, zeta=0.5, omega=2.0, dtype=torch.float32):
    """Mean-field inference for the CRF of Eq. 3-4 (the reference, vectorised, in float32; dtype=
    torch.float64 gives the high-precision oracle that the kernel checks use).

    image [B,C,H,W] (the crop as the network sees it), prob [B,H,W] the mask to refine, box_mask
    [B,H,W] or None. Unary −log m^a; pairwise ω·k_ij·[X_i ≠ X_j] with the colour affinity
    k_ij = exp(−‖I_i − I_j‖² / 2ζ²) over the 8 neighbours inside the crop. The binary Potts update
    is Q_i ← sigmoid(u_i + ω Σ_j k_ij (2Q_j − 1)), u = log p − log(1 − p), synchronous, with Q = 0
    outside the box. Returns Q [B,H,W]; the hard labels are Q > 0.5."""
    image = image.to(dtype)
    p = prob.to(dtype).clamp(1e-6, 1 - 1e-6)
    u = torch.log(p) - torch.log(1 - p)
    inside = torch.ones_like(p) if box_mask is None else (box_mask != 0).float()
    # k_ij, computed once: [B, 8, H, W]; a zero-padded validity map kills neighbours outside the crop.
    img = F.pad(image, (1, 1, 1, 1))
    valid = F.pad(torch.ones_like(p), (1, 1, 1, 1))
    k = torch.stack([torch.exp(-((image - _shift(img, dy, dx)) ** 2).sum(1) / (2 * zeta ** 2))
                     * _shift(valid, dy, dx) for dy, dx in NEIGHBOURS], dim=1)
    q = p * inside
    for _ in range(iters):
        s = F.pad(2 * q - 1, (1, 1, 1, 1))
        msg = sum(k[:, n] * _shift(s, dy, dx) for n, (dy, dx) in enumerate(NEIGHBOURS))
        q = torch.sigmoid(u + omega * msg) * inside
    return q


_crf_path_logged = set()


def refine(image, prob, box_mask=None, *, iters, zeta=0.5, omega=2.0):
    """mean_field through the fused crf_ext kernel when it builds, else the reference above.
    Says once per device type which path runs (and why, when it falls back). Never builds a graph."""
    dev = prob.device.type
    fast = crf_ext.available(prob.device)
    reason = None if fast else crf_ext.unavailable_reason(prob.device)
    if dev not in _crf_path_logged:
        _crf_path_logged.add(dev)
        if fast:
            print(f"mal: CRF mean field runs on the crf_ext {dev} kernel", file=sys.stderr)
        else:
            warnings.warn(f"mal: crf_ext kernel unavailable on {dev} ({reason}); "
                          f"CRF mean field falls back to the slower PyTorch reference")
    with torch.no_grad():
        if fast:
            return crf_ext.mean_field(image, prob, box_mask, iters=iters, zeta=zeta, omega=omega)
        return mean_field(image, prob, box_mask, iters=iters, zeta=zeta, omega=omega)


def crf_labels(avg, image, box_mask, *, iters=100, zeta=0.5, omega=2.0):
    """Eq. 5's hard labels l = MeanField(I^c, m^a) > 0.5 (bool [B,H,W])."""
    return refine(image, avg, box_mask, iters=iters, zeta=zeta, omega=omega) > 0.5


def crf_loss(prob, teacher_prob, image, box_mask, labels=crf_labels):
    """Eq. 5: L_crf = dice(m, l), l the CRF's hard labels of m^a = (m + m^t)/2 (no gradient).
    labels(avg, image, box_mask) makes them (default: crf_labels with the paper's ζ, ω)."""
    with torch.no_grad():
        hard = labels((prob.detach() + teacher_prob) / 2, image, box_mask)
    return dice(prob, hard.float()).mean()


def upsample_logits(logits, size):
    """Mask logits [B, h, w] to [B, size, size], bilinear, in float32."""
    return F.interpolate(logits[:, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0]


def crop_to_loss_size(image, box_mask, size):
    """The crop (down, area) and the box mask (down, max: a thin box keeps its pixels) at the loss /
    CRF resolution `size`; size = the crop size gives the paper's N = H^c × W^c."""
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image.float(), size=(size, size), mode="area")
        box_mask = F.adaptive_max_pool2d(box_mask[:, None].float(), size)[:, 0]
    return image, box_mask


def mal_loss(logits, teacher_logits, image, box_mask, *, alpha_mil=4.0, alpha_crf=0.5, loss_size=128,
             crf_iters=100, zeta=0.5, omega=2.0, labels=None):
    """Eq. 1: L = α_mil·L_mil + α_crf·L_crf. logits / teacher_logits [B, h, w] from the task network and
    the teacher; image [B,3,S,S] the un-jittered crop (what the teacher sees, the CRF's colours);
    box_mask [B,S,S]; both losses at loss_size². labels: crf_loss's (default: Eq. 5's mean field with
    crf_iters, ζ, ω). Returns (loss, dict of detached terms)."""
    image, box_mask = crop_to_loss_size(image, box_mask, loss_size)
    prob = upsample_logits(logits, loss_size).sigmoid()
    teacher_prob = upsample_logits(teacher_logits, loss_size).sigmoid()
    l_mil = mil_loss(prob, box_mask)
    l_crf = crf_loss(prob, teacher_prob, image, box_mask,
                     labels or functools.partial(crf_labels, iters=crf_iters, zeta=zeta, omega=omega))
    loss = alpha_mil * l_mil + alpha_crf * l_crf
    return loss, {"loss": loss.detach(), "mil": l_mil.detach(), "crf": l_crf.detach()}


# ----------------------------------------------------------------------------------------------
# §4.6 Clustering analysis


def clustering_score(features, fg):
    """Eq. 6: S = 1/N Σ_i ‖f_i/|f_i| − f'_γ(i)/|f'_γ(i)|‖², f'_1 and f'_0 the mean FG and BG feature
    vectors of each crop (lower: the encoder separates object from background better).

    features [B,C,h,w] (the encoder's output tokens), fg [B,h,w] bool (the GT mask at token
    resolution). Centres are per crop; crops without FG or without BG tokens are left out.
    Returns (S, N): the score and the number of tokens it averages."""
    f = features.double()
    fg = fg.to(f.device, torch.bool)
    keep = fg.flatten(1).any(1) & (~fg).flatten(1).any(1)
    f, fg = f[keep], fg[keep][:, None].double()
    if len(f) == 0:
        return float("nan"), 0
    centre_fg = (f * fg).sum((2, 3)) / fg.sum((2, 3))  # f'_1 per crop [B', C]
    centre_bg = (f * (1 - fg)).sum((2, 3)) / (1 - fg).sum((2, 3))  # f'_0
    unit = F.normalize(f, dim=1)
    centre = torch.where(fg.bool(), F.normalize(centre_fg, dim=1)[..., None, None],
                         F.normalize(centre_bg, dim=1)[..., None, None])
    d = ((unit - centre) ** 2).sum(1)  # [B', h, w]
    return float(d.mean()), d.numel()


# ----------------------------------------------------------------------------------------------
# Upper bound, not MAL: the same network trained on GT masks (train.py --gt-masks). The paper reports
# box-supervised quality as retention of the fully supervised result; this measures the denominator.


def gt_mask_loss(logits, gt_mask, *, loss_size=128):
    """Dice + BCE of the mask logits against GT masks [B,S,S] (soft, in [0, 1]) at `loss_size`."""
    gt = F.adaptive_avg_pool2d(gt_mask[:, None].float(), loss_size)[:, 0]
    logits = upsample_logits(logits, loss_size)
    l_dice = dice(logits.sigmoid(), gt).mean()
    l_bce = F.binary_cross_entropy_with_logits(logits, gt)
    return l_dice + l_bce, {"loss": (l_dice + l_bce).detach(), "dice": l_dice.detach(), "bce": l_bce.detach()}
