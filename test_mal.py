"""Tests for MAL: `pytest test_mal.py`. Sections follow the files: mal.py, crf_ext/, data.py, train.py, pretrain.py,
label.py."""

import functools
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crf_ext
import data
import label
import mal
import pretrain
import synthetic
import train


HERE = os.path.dirname(os.path.abspath(__file__))
# pycocotools' mask.decode trips NumPy 2's copy-keyword deprecation on every call: that one warning, its own, is
# ignored (every other warning still shows).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning:pycocotools")

# ==============================================================================================
# mal.py: encoder, decoder, teacher, box expansion, losses, reference CRF


@pytest.mark.parametrize("img_size,patch", [(224, 16), (512, 16), (224, 14), (64, 8)])
def test_vit_feature_map_shape(img_size, patch):
    vit = mal.vit_tiny(patch_size=patch, img_size=224, depth=2)
    out = vit(torch.randn(2, 3, img_size, img_size))
    assert out.shape == (2, 192, img_size // patch, img_size // patch)


def test_vit_factories_have_paper_sizes():
    for name, (dim, depth, heads) in {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
                                      "vit_large": (1024, 24, 16)}.items():
        vit = getattr(mal, name)(depth=1)
        assert vit.embed_dim == dim and vit.blocks[0].attn.num_heads == heads
    assert len(mal.vit_base().blocks) == 12 and mal.vit_huge(depth=1).patch_size == 14
    with pytest.raises(ValueError, match="unknown architecture"):
        mal.vit("vit_gigantic")


def test_vit_parameter_names_are_timms():
    names = set(mal.vit_tiny(depth=1).state_dict())
    for k in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
              "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias"]:
        assert k in names


def test_plain_attention_equals_sdpa():
    vit = mal.vit_tiny(depth=2, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = vit(x)
        mal.Attention.fused = False
        try:
            plain = vit(x)
        finally:
            mal.Attention.fused = True
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-5)


def test_pos_embed_resampling_is_mae_bicubic():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = mal.resample_pos_embed(pe, (32, 32))
    assert out.shape == (1, 1 + 32 * 32, 8)
    assert torch.equal(out[:, :1], pe[:, :1])
    grid = pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 8))
    assert mal.resample_pos_embed(pe, (14, 14)) is pe  # same grid: untouched


def _timm_vit(img_size, **kw):
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0, **kw)


@pytest.mark.parametrize("img_size", [224, 512])
def test_vit_matches_timm_forward_features(img_size):
    ref224 = _timm_vit(224).eval()
    ours = mal.vit_tiny(depth=2).eval()
    ours.load_state_dict({k: v for k, v in ref224.state_dict().items() if not k.startswith(("head", "fc_norm"))})
    ref = ref224
    if img_size != 224:  # a timm model built for 512 whose pos_embed was resampled the MAE way
        ref = _timm_vit(img_size).eval()
        sd = ref224.state_dict()
        sd["pos_embed"] = mal.resample_pos_embed(sd["pos_embed"], (img_size // 16,) * 2)
        ref.load_state_dict(sd)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        want = ref.forward_features(x)[:, 1:]
        got = ours(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def test_load_pretrained_mae_deit_timm_and_own(tmp_path, capsys):
    src = mal.vit_tiny(depth=2)
    sd = src.state_dict()
    # MAE: {"model": ...} with a decoder and mask token; 224 grid into a 512 model.
    mae = dict(sd, mask_token=torch.zeros(1, 1, 192), **{"decoder_embed.weight": torch.zeros(4, 192)})
    dst = mal.vit_tiny(depth=2, img_size=512)
    mal.load_pretrained(dst, _save({"model": mae}, tmp_path / "mae.pth"))
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.allclose(dst.pos_embed, mal.resample_pos_embed(src.pos_embed, (32, 32)))
    assert "decoder_embed" not in capsys.readouterr().err.split("unused")[1]
    # DeiT distilled: a dist token and its pos slot, two heads.
    deit = dict(sd, dist_token=torch.zeros(1, 1, 192), **{"head.weight": torch.zeros(10, 192),
                                                           "head_dist.weight": torch.zeros(10, 192)})
    deit["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.zeros(1, 1, 192), sd["pos_embed"][:, 1:]], 1)
    dst = mal.vit_tiny(depth=2)
    mal.load_pretrained(dst, _save({"model": deit}, tmp_path / "deit.pth"))
    assert torch.equal(dst.pos_embed, src.pos_embed)
    # timm / DDP: a bare state dict with module. / backbone. prefixes.
    dst = mal.vit_tiny(depth=2)
    mal.load_pretrained(dst, _save({"state_dict": {"module.backbone." + k: v for k, v in sd.items()}},
                                   tmp_path / "timm.pth"))
    assert torch.equal(dst.cls_token, src.cls_token)
    # Our own checkpoint: encoder and decoder of the teacher.
    net = mal.MAL("vit_tiny", img_size=64, depth=2)
    dst = mal.MAL("vit_tiny", img_size=64, depth=2)
    mal.load_pretrained(dst, _save({"teacher": net.state_dict(), "task": {}}, tmp_path / "own.pt"))
    for a, b in zip(dst.parameters(), net.parameters()):
        assert torch.equal(a, b)
    assert "missing none" in capsys.readouterr().err


def test_load_pretrained_mismatch_is_a_clear_error(tmp_path):
    path = _save({"model": mal.vit_small(depth=1).state_dict()}, tmp_path / "vit_s.pth")
    with pytest.raises(ValueError, match=r"vit_s.pth: encoder tensor .* has shape .* another architecture"):
        mal.load_pretrained(mal.vit_tiny(depth=1), path)
    with pytest.raises(ValueError, match="no state dict"):
        mal.load_pretrained(mal.vit_tiny(depth=1), _save({"model": [1, 2]}, tmp_path / "bad.pth"))


def test_vit_factories_dinov2_and_deit3():
    plain = mal.vit("vit_small", depth=1)
    assert plain.reg_token is None and not any(".ls" in k for k in plain.state_dict())
    reg4 = mal.vit("vit_small_dinov2_reg4", depth=1, img_size=56)
    assert reg4.patch_size == 14 and reg4.reg_token.shape == (1, 4, 384) and reg4.num_prefix_tokens == 5
    assert torch.all(reg4.blocks[0].ls1.gamma == 1e-5) and torch.all(reg4.blocks[0].ls2.gamma == 1e-5)
    deit3 = mal.vit("deit3_base", depth=1)
    assert deit3.patch_size == 16 and deit3.reg_token is None and torch.all(deit3.blocks[0].ls1.gamma == 1e-6)
    giant = mal.vit("vit_giant_dinov2", depth=1)  # DINOv2's ViT-g: SwiGLU of hidden width 4096
    assert giant.embed_dim == 1536 and giant.blocks[0].attn.num_heads == 24
    assert giant.blocks[0].mlp.fc1.out_features == 2 * 4096 and giant.blocks[0].mlp.fc2.in_features == 4096
    with torch.no_grad():  # registers are dropped like the class token, at any input size
        assert reg4(torch.randn(2, 3, 70, 42)).shape == (2, 384, 5, 3)


def _randomize(model, seed=0):
    """Random values for what timm starts at constants: LayerScale (1e-5), tokens (~0), norms and biases, so
    that a wrong mapping of any of them shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if n.endswith("gamma"):
                p.copy_(0.5 + r.abs())
            elif "token" in n or n == "pos_embed":
                p.copy_(0.5 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r + (1.0 if "norm" in n and n.endswith("weight") else 0.0))
    return model


def _same_patch_tokens(ours, ref, size):
    """Max |ours - timm| over the patch tokens of timm's forward_features on a random batch."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.forward_features(x)[:, ref.num_prefix_tokens:]
        got = ours(x).flatten(2).transpose(1, 2)
    return (got - want).abs().max().item()


@pytest.mark.parametrize("timm_name,arch,size", [("vit_small_patch14_dinov2", "vit_small_dinov2", 56),
                                                 ("vit_small_patch14_reg4_dinov2", "vit_small_dinov2_reg4", 56),
                                                 ("deit3_small_patch16_224", "deit3_small", 64)])
def test_dinov2_and_deit3_match_timm(timm_name, arch, size, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    ref = _randomize(timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=size, depth=2)).eval()
    path = _save(ref.state_dict(), tmp_path / f"{timm_name}.pth")
    ours = mal.load_pretrained(mal.vit(arch, depth=2, img_size=size), path).eval()
    assert "missing none; unused none" in capsys.readouterr().err
    assert _same_patch_tokens(ours, ref, size) <= 1e-4


@pytest.mark.parametrize("timm_name", ["vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2"])
def test_swiglu_matches_timm_giant_dinov2(timm_name, tmp_path, capsys):
    """timm's ViT-g/14 layout (its packed SwiGLU MLP) at a reduced width and depth."""
    timm = pytest.importorskip("timm")
    ref = _randomize(timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=56, embed_dim=96,
                                       depth=2, num_heads=4)).eval()
    ours = mal.VisionTransformer(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=4, init_values=1e-5,
                                 reg_tokens=ref.num_prefix_tokens - 1, swiglu=True)
    assert ours.blocks[0].mlp.fc2.in_features == ref.blocks[0].mlp.fc2.in_features == 256  # DINOv2's width rule
    mal.load_pretrained(ours, _save(ref.state_dict(), tmp_path / "g.pth")).eval()
    assert "missing none; unused none" in capsys.readouterr().err
    assert _same_patch_tokens(ours, ref, 56) <= 1e-4


G14_REG4 = dict(patch_size=14, embed_dim=96, depth=2, num_heads=4, init_values=1e-5, reg_tokens=4, swiglu=True)


def _dinov2_authors_layout(model):
    """A VisionTransformer's weights as the DINOv2 authors release them: a bare state dict with register_tokens,
    the SwiGLU MLP as w12 / w3 (ViT-g only; the others have fc1 / fc2 as we do) and a mask_token."""
    swiglu = isinstance(model.blocks[0].mlp, mal.SwiGLU)
    out = {"mask_token": torch.zeros(1, model.embed_dim)}
    for k, v in model.state_dict().items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k.replace("reg_token", "register_tokens")] = v
    return out


def test_load_pretrained_dinov2_authors_layout(tmp_path, capsys):
    """A file laid out like DINOv2's released ViT-g/14 with registers (reduced width and depth), at its release
    size 518 px (37 × 37 positions), loads whole at 518 px and at MAL's 126 px."""
    src = _randomize(mal.VisionTransformer(img_size=518, **G14_REG4)).eval()
    authors = _dinov2_authors_layout(src)
    assert {"register_tokens", "mask_token", "blocks.1.mlp.w12.weight", "blocks.1.mlp.w3.bias"} <= set(authors)
    assert authors["pos_embed"].shape == (1, 1 + 37 * 37, 96) and "reg_token" not in authors
    path = _save(authors, tmp_path / "dinov2_vitg14_reg4_pretrain.pth")
    same = mal.load_pretrained(mal.VisionTransformer(img_size=518, **G14_REG4), path)
    assert "missing none; unused none" in capsys.readouterr().err
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    small = mal.load_pretrained(mal.VisionTransformer(img_size=126, **G14_REG4), path).eval()
    assert "missing none; unused none" in capsys.readouterr().err
    assert torch.equal(small.pos_embed, mal.resample_pos_embed(src.pos_embed, (9, 9)))
    x = torch.randn(1, 3, 126, 126)
    with torch.no_grad():  # src resamples its 37 × 37 table on the fly, the same way
        torch.testing.assert_close(small(x), src(x), rtol=0, atol=1e-5)


def test_dinov2_authors_layout_matches_timms_reading(tmp_path, capsys):
    """The same file read by timm's own DINOv2 conversion (which moves the class token's position into it)."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn
    authors = _dinov2_authors_layout(_randomize(mal.VisionTransformer(img_size=56, **G14_REG4)))
    ref = timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56,
                            embed_dim=96, depth=2, num_heads=4).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(authors), ref))
    ours = mal.load_pretrained(mal.VisionTransformer(img_size=56, **G14_REG4), _save(authors, tmp_path / "d.pth"))
    assert "missing none; unused none" in capsys.readouterr().err
    assert _same_patch_tokens(ours.eval(), ref, 56) <= 1e-4


def test_load_pretrained_deit3_authors_layout(tmp_path, capsys):
    """DeiT III's own files: {"model": ...} with blocks.N.gamma_1 / gamma_2 and no class-token position."""
    src = _randomize(mal.vit("deit3_small", depth=2, img_size=64)).eval()
    with torch.no_grad():
        src.pos_embed[:, 0] = 0  # DeiT III adds no position to the class token
    sd = src.state_dict()
    deit3 = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in sd.items()}
    deit3.update({"pos_embed": sd["pos_embed"][:, 1:], "head.weight": torch.zeros(10, 384), "head.bias": torch.zeros(10)})
    assert "blocks.1.gamma_2" in deit3 and "blocks.1.ls2.gamma" not in deit3
    dst = mal.load_pretrained(mal.vit("deit3_small", depth=2, img_size=64),
                              _save({"model": deit3}, tmp_path / "deit_3_small_224_1k.pth")).eval()
    assert "missing none; unused none" in capsys.readouterr().err
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("src,dst,why", [
    ("deit3_small", "vit_small", "the file's encoder has LayerScale, no register tokens but vit_small/16 has no "
                                 "LayerScale, no register tokens"),
    ("vit_small", "deit3_small", "has no LayerScale, no register tokens but deit3_small/16 has LayerScale"),
    ("vit_small_dinov2_reg4", "vit_small_dinov2", "has LayerScale, 4 register tokens but vit_small_dinov2/14 has "
                                                  "LayerScale, no register tokens"),
    ("vit_small_dinov2", "vit_small", r"patch_embed.proj.weight has shape \(384, 3, 14, 14\) in the file but "
                                      r"\(384, 3, 16, 16\) in vit_small/16")],
    ids=["layerscale-into-plain", "plain-into-layerscale", "registers-into-none", "patch14-into-patch16"])
def test_load_pretrained_wrong_architecture_is_one_line_naming_both(src, dst, why, tmp_path):
    path = _save(mal.vit(src, depth=1).state_dict(), tmp_path / f"{src}.pth")
    with pytest.raises(ValueError, match=re.escape(path) + ": .*" + why) as e:
        mal.load_pretrained(mal.vit(dst, depth=1), path)
    assert "\n" not in str(e.value)


def test_decoder_shapes_and_k_dot_v():
    dec = mal.MaskDecoder(192)
    feat = torch.randn(3, 192, 8, 8)
    logits = dec(feat)
    assert logits.shape == (3, 16, 16)
    k = dec.instance_head(feat.amax(dim=(2, 3)))
    v = dec.pixel_head(feat)
    assert v.shape == (3, 256, 16, 16) and (v >= 0).all()  # ReLU after the last conv
    assert torch.allclose(logits[1], (k[1][:, None, None] * v[1]).sum(0), atol=1e-5)
    convs = [m for m in dec.pixel_head if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == 256 for c in convs)
    assert mal.MAL("vit_tiny", img_size=128, depth=1)(torch.randn(1, 3, 128, 128)).shape == (1, 16, 16)


def test_ema_update_arithmetic():
    net = mal.MAL("vit_tiny", img_size=32, depth=1)
    teacher = mal.make_teacher(net)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    mal.ema_update(teacher, net, 0.996)
    for t0, t1, s in zip(before, teacher.parameters(), net.parameters()):
        torch.testing.assert_close(t1, 0.996 * t0 + 0.004 * s)


def test_expand_box_statistics():
    g = torch.Generator().manual_seed(0)
    box = (10.0, 20.0, 50.0, 100.0)  # centre (30, 60), half sizes 20 and 40
    lefts, tx, sides = [], [], []
    for _ in range(4000):
        x0, y0, x1, y1 = mal.expand_box(box, 1.2, g)
        bx, bpx = (30 - x0) / 20 - 1, (x1 - 30) / 20 - 1
        by, bpy = (60 - y0) / 40 - 1, (y1 - 60) / 40 - 1
        assert min(bx, bpx, by, bpy) >= -1e-12
        assert bx + bpx <= 1.2 + 1e-9 and by + bpy <= 1.2 + 1e-9
        tx.append(bx + bpx)
        lefts.append(bx / max(bx + bpx, 1e-12))
        sides.append(bx - bpx)
    t = torch.tensor(tx)
    assert abs(t.mean().item() - 0.6) < 0.03 and t.max().item() > 1.15  # θ_x ~ U[0, 1.2]
    assert abs(torch.tensor(lefts).mean().item() - 0.5) < 0.03  # β_x / θ_x ~ U[0, 1]: random split
    assert abs(torch.tensor(sides).mean().item()) < 0.03  # not biased to one side
    assert mal.expand_box(box, 1.2, torch.Generator().manual_seed(5)) == \
        mal.expand_box(box, 1.2, torch.Generator().manual_seed(5))
    assert mal.expand_box_fixed(box, 0.5) == (0.0, 0.0, 60.0, 120.0)
    assert mal.expand_box_fixed(box, 0.0) == box


def test_mil_loss_hand_made_cases():
    box = torch.zeros(2, 16, 16)
    box[:, 4:10, 3:12] = 1
    assert mal.mil_loss(box.clone(), box).item() < 1e-4  # the box itself: every bag right
    assert abs(mal.mil_loss(torch.zeros_like(box), box).item() - 2) < 1e-4  # empty: both dices 1
    # One foreground pixel per row and column inside the box is enough for MIL.
    diag = torch.zeros_like(box)
    for i in range(9):
        diag[:, 4 + min(i, 5), 3 + i] = 1
    assert mal.mil_loss(diag, box).item() < 1e-4
    assert mal.mil_loss(torch.ones_like(box), box).item() > 0.5  # spilling outside the box costs
    # The formula, by hand, for one crop.
    p = torch.rand(1, 5, 7)
    r, c = p.amax(2), p.amax(1)
    g_r, g_c = box[:1, :5, :7].amax(2), box[:1, :5, :7].amax(1)
    d = lambda a, b: 1 - 2 * (a * b).sum() / ((a * a).sum() + (b * b).sum() + 1e-5)  # noqa: E731
    torch.testing.assert_close(mal.mil_loss(p, box[:1, :5, :7]), d(r, g_r) + d(c, g_c))


NBRS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def mean_field_float64(image, prob, box_mask=None, *, iters, zeta=0.5, omega=2.0):
    """An independent float64 mean field (Eq. 3-4), looping over the 8 neighbours with slices of the
    unpadded crop (no padding trick), to check the reference and the kernel against."""
    image, prob = image.double().cpu(), prob.double().cpu()
    B, C, H, W = image.shape
    p = prob.clamp(1e-6, 1 - 1e-6)
    u = torch.log(p) - torch.log1p(-p)
    inside = torch.ones_like(p) if box_mask is None else (box_mask.cpu() != 0).double()

    def rng(d, n):  # destination / source index ranges of a shift by d
        return slice(max(0, -d), n - max(0, d)), slice(max(0, d), n - max(0, -d))

    ks = []
    for dy, dx in NBRS:
        (ry, sy), (rx, sx) = rng(dy, H), rng(dx, W)
        k = torch.zeros(B, H, W, dtype=torch.float64)
        d = ((image[:, :, ry, rx] - image[:, :, sy, sx]) ** 2).sum(1)
        k[:, ry, rx] = torch.exp(-d / (2 * zeta ** 2))
        ks.append(k)
    q = p * inside
    for _ in range(iters):
        s = 2 * q - 1
        msg = torch.zeros_like(q)
        for k, (dy, dx) in zip(ks, NBRS):
            (ry, sy), (rx, sx) = rng(dy, H), rng(dx, W)
            msg[:, ry, rx] += k[:, ry, rx] * s[:, sy, sx]
        q = torch.sigmoid(u + omega * msg) * inside
    return q


def smooth_image(B, H, W, seed):
    """A piecewise-smooth image so that colour affinities span (0, 1], not only ~0."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(B, 3, max(H // 6, 1), max(W // 6, 1), generator=g)
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False) \
        + 0.1 * torch.randn(B, 3, H, W, generator=g)


@pytest.mark.parametrize("B,H,W,iters,boxed", [(1, 1, 1, 3, False), (2, 1, 9, 10, True), (2, 9, 1, 10, False),
                                               (3, 13, 17, 0, True), (2, 13, 17, 1, False), (2, 12, 10, 100, True)])
def test_reference_mean_field_matches_float64_loop(B, H, W, iters, boxed):
    g = torch.Generator().manual_seed(H * 100 + W)
    image = smooth_image(B, H, W, H + W)
    prob = torch.rand(B, H, W, generator=g)
    box = (torch.rand(B, H, W, generator=g) > 0.3).float() if boxed else None
    got = mal.mean_field(image, prob, box, iters=iters)
    want = mean_field_float64(image, prob, box, iters=iters)
    assert got.dtype == torch.float32 and got.shape == (B, H, W)
    assert (got.double() - want).abs().max().item() <= 1e-5
    if boxed:
        assert (got[box == 0] == 0).all()


def two_colour_case(size=32):
    """A two-colour image with a square object, and a noisy box-shaped probability over it."""
    image = torch.zeros(1, 3, size, size)
    image[:, 0] = -1.0
    image[:, :, 8:24, 10:22] = 1.0  # the object
    box = torch.zeros(1, size, size)
    box[:, 8:24, 10:22] = 1  # its tight box
    box[:, 6:26, 8:24] = 1  # a loose box: 2 px of background on every side
    g = torch.Generator().manual_seed(0)
    prob = (0.55 + 0.3 * torch.randn(1, size, size, generator=g)).clamp(0.01, 0.99) * box
    return image, prob, box


def test_mean_field_snaps_to_the_colour_edge():
    image, prob, box = two_colour_case()
    truth = torch.zeros(1, 32, 32)
    truth[:, 8:24, 10:22] = 1
    before = ((prob > 0.5) != truth.bool()).sum().item()
    labels = mal.mean_field(image, prob, box, iters=20) > 0.5
    after = (labels != truth.bool()).sum().item()
    assert before > 60 and after <= 4


def test_gradients_flow_into_the_task_network_only():
    torch.manual_seed(0)
    net = mal.MAL("vit_tiny", patch_size=8, img_size=32, depth=1)
    teacher = mal.make_teacher(net)
    x = torch.randn(2, 3, 32, 32)
    box = torch.zeros(2, 32, 32)
    box[:, 8:24, 4:20] = 1
    with torch.no_grad():
        t_logits = teacher(x)
    loss, terms = mal.mal_loss(net(x), t_logits, x, box, step=10**6, loss_size=32, crf_iters=5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    torch.testing.assert_close(terms["loss"], 4 * terms["mil"] + 0.5 * terms["crf"])


def test_loss_ramps_and_crf_loss_formula():
    assert mal.ramp(0, 1000) == pytest.approx(0.001) and mal.ramp(999, 1000) == 1.0 and mal.ramp(5, 0) == 1.0
    image, prob, box = two_colour_case()
    teacher = prob.flip(-1)
    l = mal.crf_loss(prob, teacher, image, box, iters=7)
    labels = (mal.mean_field(image, (prob + teacher) / 2, box, iters=7) > 0.5).float()
    torch.testing.assert_close(l, mal.dice(prob, labels).mean())
    logits = torch.randn(1, 8, 8)
    _, t0 = mal.mal_loss(logits, logits, image, box, step=0, loss_size=32, crf_iters=1, mil_ramp=10, crf_ramp=20)
    torch.testing.assert_close(t0["loss"], 0.4 * t0["mil"] + 0.025 * t0["crf"])


def test_mal_loss_under_cpu_bf16_autocast():
    """Under CPU bf16 autocast, with a network's logits in bf16, mal_loss computes in float32: the float32
    loss of the bf16-rounded logits, finite gradients, and close to the loss of the unrounded logits."""
    image, prob, box = two_colour_case()
    image, box = torch.cat([image, image.flip(-1)]), torch.cat([box, box.flip(-1)])
    g = torch.Generator().manual_seed(0)
    logits = 3 * (F.avg_pool2d(box[:, None], 2)[:, 0] - 0.5) + torch.randn(2, 16, 16, generator=g)
    t_logits = logits + 0.3 * torch.randn(2, 16, 16, generator=g)
    kw = dict(step=10, loss_size=32, crf_iters=20, mil_ramp=1, crf_ramp=1)
    lo, t_lo = logits.bfloat16().requires_grad_(), t_logits.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = mal.mal_loss(lo, t_lo, image, box, **kw)
    loss.backward()
    assert loss.dtype == torch.float32 and all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(lo.grad).all() and lo.grad.abs().sum() > 0
    rounded, _ = mal.mal_loss(lo.detach().float(), t_lo.float(), image, box, **kw)
    torch.testing.assert_close(loss.detach(), rounded)
    full, _ = mal.mal_loss(logits, t_logits, image, box, **kw)
    assert loss.item() == pytest.approx(full.item(), rel=2 ** -9)  # one bf16 rounding


def _c_shape_case(S=32):
    """A C-shaped object (colour 2) open to the right on a uniform background (0); the network's mask is
    its filled box. Returns image, prob, box, C mask, pocket mask (the background the C encloses)."""
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r = ((yy - 16) ** 2 + (xx - 16) ** 2).float().sqrt()
    c = (r < 11) & (r > 6) & ~((xx > 16) & ((yy - 16).abs() < 5))
    image = torch.zeros(1, 3, S, S)
    image[:, :, c] = 2.0
    ys, xs = torch.nonzero(c, as_tuple=True)
    box = torch.zeros(1, S, S)
    box[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    prob = torch.where(box > 0, 0.95, 0.05)
    opening = (xx > 16) & ((yy - 16).abs() < 5) & (r < 11)
    return image, prob, box, c, ((r <= 6) | opening) & (box[0] > 0)


def test_crf_loss_weak_unary_floods_the_box_outside_into_concavities():
    """τ = 1 (the paper's CRF) keeps the confidently filled concavity of a C; a weak unary with ω near
    critical carves it (the outside of the box floods the background it touches) and keeps the C."""
    image, prob, box, c, pocket = _c_shape_case()
    paper = mal.refine(image, prob, box, iters=100, zeta=0.5, omega=2.0)[0] > 0.5
    assert paper[pocket].all() and paper[c].all()
    flood_kw = dict(iters=1000, zeta=0.3, omega=0.25, unary_weight=1e-4)
    weak = torch.sigmoid(1e-4 * torch.logit(prob.double())).float()
    flood = mal.refine(image, weak, box, iters=1000, zeta=0.3, omega=0.25)[0] > 0.5
    assert not flood[pocket].any() and flood[c].all()
    assert torch.equal(mal.refine(image, prob, box, **flood_kw)[0] > 0.5, flood)  # refine's own τ, as label.py's --crf-unary
    # crf_loss: dice against those labels; at size 16 they are computed at 16 px and resized back.
    torch.testing.assert_close(mal.crf_loss(prob, prob, image, box, **flood_kw), mal.dice(prob, flood[None].float()).mean())
    small_img, small_box = mal.crop_to_loss_size(image, box, 16)
    small_p = torch.sigmoid(1e-4 * torch.logit(F.interpolate(prob[:, None], size=16, mode="area")[:, 0].double())).float()
    q = mal.refine(small_img, small_p, small_box, iters=1000, zeta=0.3, omega=0.25)
    labels = (F.interpolate(q[:, None], size=32, mode="bilinear", align_corners=False)[:, 0] > 0.5).float()
    torch.testing.assert_close(mal.crf_loss(prob, prob, image, box, size=16, **flood_kw), mal.dice(prob, labels).mean())
    assert mal.crf_loss(prob, prob, image, box, size=16, **flood_kw) > 0.2 > mal.crf_loss(prob, prob, image, box)


def test_clustering_score_known_answers():
    """Eq. 6 by hand: FG tokens (1,0), (0,1) around the unit centre (1,1)/√2 lie 2 − √2 away (squared);
    BG tokens (3,3), (−1,−1) have centre (1,1): 0 and 4. Mean over the 4 tokens."""
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [-1.0, -1.0]]).T.reshape(1, 2, 2, 2)
    fg = torch.tensor([[[True, True], [False, False]]])
    s, n = mal.clustering_score(f, fg)
    assert n == 4 and s == pytest.approx((2 * (2 - math.sqrt(2)) + 0 + 4) / 4)
    # Two perfectly separated clusters score 0, at any scale; a crop with no BG token is left out.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    fg = torch.rand(2, 5, 5, generator=g) > 0.5
    fg[1] = True
    f = torch.where(fg[:, None], a.view(1, 8, 1, 1), b.view(1, 8, 1, 1)) * torch.rand(2, 1, 5, 5, generator=g).add(1)
    s, n = mal.clustering_score(f, fg)
    assert n == 25 and s == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(mal.clustering_score(f[1:], fg[1:])[0])


def test_gt_mask_loss_is_dice_plus_bce():
    logits = torch.randn(3, 6, 6)
    gt = (torch.rand(3, 24, 24) > 0.5).float()
    loss, terms = mal.gt_mask_loss(logits, gt, loss_size=12)
    up = mal.upsample_logits(logits, 12)
    g = F.avg_pool2d(gt[:, None], 2)[:, 0]
    torch.testing.assert_close(terms["dice"], mal.dice(up.sigmoid(), g).mean())
    torch.testing.assert_close(terms["bce"], F.binary_cross_entropy_with_logits(up, g))
    torch.testing.assert_close(loss, terms["dice"] + terms["bce"])


# ==============================================================================================
# crf_ext/: the fused kernel against the reference and a float64 implementation; the op contract

HAS_CUDA = torch.cuda.is_available()
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert crf_ext.load(cuda=False)["cpu"], crf_ext.status()


def make_inputs(B, C, H, W, kind="smooth", mask=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    if kind == "smooth":  # piecewise-smooth image: k_ij mostly in (0.1, 1)
        img = torch.stack([torch.sin(3 * xx + c) * torch.cos(2 * yy - c) for c in range(C)])
        img = img.expand(B, C, H, W) + 0.05 * torch.randn(B, C, H, W, generator=g)
        img = img + (xx > 0.2).float() * 1.5  # an edge
        prob = torch.sigmoid(3 * (0.6 - (xx ** 2 + yy ** 2)) + torch.randn(B, H, W, generator=g))
    else:  # normalised-image-like noise: k_ij mostly ~0
        img = torch.randn(B, C, H, W, generator=g)
        prob = torch.rand(B, H, W, generator=g)
    box = None
    if mask:
        box = torch.zeros(B, H, W, dtype=torch.bool)
        for b in range(B):
            y0, x0 = torch.randint(0, max(1, H // 4), (1,), generator=g).item(), torch.randint(0, max(1, W // 4), (1,), generator=g).item()
            box[b, y0:H - y0 // 2, x0:W - x0 // 2] = True
    return img.contiguous(), prob.contiguous(), box


CASES = [  # B, C, H, W, iters, kind, mask
    (3, 3, 1, 1, 100, "smooth", True),
    (2, 3, 1, 29, 10, "smooth", False),
    (2, 3, 29, 1, 10, "smooth", True),
    (2, 3, 2, 2, 100, "smooth", False),
    (5, 3, 37, 53, 0, "smooth", True),
    (5, 3, 37, 53, 1, "noise", False),
    (5, 3, 37, 53, 10, "smooth", True),
    (5, 3, 37, 53, 100, "noise", False),
    (5, 3, 37, 53, 100, "noise", True),
    (32, 3, 37, 53, 10, "smooth", True),
    (2, 1, 20, 30, 10, "smooth", True),
    (2, 5, 20, 30, 10, "noise", True),
    (8, 3, 128, 128, 10, "noise", False),
    (2, 3, 128, 128, 100, "noise", True),
    (1, 3, 512, 512, 5, "smooth", True),
]


def sensitivity(img, prob, box, iters):
    """How much the float64 result moves when prob moves by ~1 float32 ulp (6e-8 relative)."""
    a = mean_field_float64(img, prob, box, iters=iters)
    return (a - mean_field_float64(img, prob.double() * (1 + 6e-8), box, iters=iters)).abs().max().item()


@pytest.mark.parametrize("B,C,H,W,iters,kind,mask", CASES)
def test_kernel_matches_references(B, C, H, W, iters, kind, mask):
    img, prob, box = make_inputs(B, C, H, W, kind, mask)
    if iters >= 100:  # precondition: the problem itself is well-conditioned (see the test below)
        assert sensitivity(img, prob, box, iters) <= 5e-6
    q = crf_ext.mean_field(img, prob, box, iters=iters)
    assert q.shape == (B, H, W) and q.dtype == torch.float32 and q.device == img.device
    r64 = mean_field_float64(img, prob, box, iters=iters)
    r32 = mal.mean_field(img, prob, box, iters=iters)
    assert (q.double() - r64).abs().max().item() <= TOL
    assert (q - r32).abs().max().item() <= TOL
    if box is not None:
        assert (q[~box] == 0).all()


def test_kernel_with_irregular_box_masks():
    """Masks with holes, empty rows and columns (the CPU loop sweeps only each row's box span)."""
    img, prob, _ = make_inputs(4, 3, 41, 67, "smooth", False, seed=5)
    g = torch.Generator().manual_seed(5)
    box = torch.rand(4, 41, 67, generator=g) > 0.4
    box[0] = False  # no box at all
    box[1, :, :] = False
    box[1, 10:20, 60:] = True  # touches the right border only
    box[2, ::3] = False  # empty rows
    q = crf_ext.mean_field(img, prob, box, iters=10)
    assert (q.double() - mean_field_float64(img, prob, box, iters=10)).abs().max().item() <= TOL
    assert (q[~box] == 0).all() and (q[0] == 0).all()


def test_ill_conditioned_input_documented():
    """Synchronous mean field does not converge everywhere: on the smooth 128x128 input some pixels
    keep oscillating (|Q100 - Q99| up to ~0.9) and float64 itself moves by ~1e-4 when prob moves by
    one float32 ulp.  No float32 implementation (mal.mean_field included) can meet 1e-5 there; the
    kernel is as close to float64 as the float32 reference is, and the hard labels agree."""
    img, prob, box = make_inputs(4, 3, 128, 128, "smooth", True)
    assert sensitivity(img, prob, box, 100) > 1e-5  # ill-conditioned, by construction of this test
    r64 = mean_field_float64(img, prob, box, iters=100)
    q = crf_ext.mean_field(img, prob, box, iters=100)
    e_ref = (mal.mean_field(img, prob, box, iters=100).double() - r64).abs().max().item()
    e_ker = (q.double() - r64).abs().max().item()
    assert e_ker <= max(10 * e_ref, 1e-3)
    assert ((q > 0.5) != (r64 > 0.5)).sum().item() <= 2


@pytest.mark.parametrize("omega", [-10.0, 9.0, 12.0, 40.0])
def test_kernel_omega_on_both_sides_of_the_clamp_free_range(omega, monkeypatch):
    """|ω| <= 9 runs the CPU loop's clamp-free sigmoid (mean_field.h: update_in_range, exact there
    because |u| < 13.82 and |msg| <= 8); a larger |ω| needs the clamped one (exp would overflow).
    Both must agree with the emulation path, which always clamps. (A large ω amplifies float32
    rounding by ~2ω per iteration, so float64 is compared after one iteration only.)"""
    img, prob, box = make_inputs(3, 3, 37, 53, "smooth", True)
    q1 = crf_ext.mean_field(img, prob, box, iters=1, omega=omega)
    assert (q1.double() - mean_field_float64(img, prob, box, iters=1, omega=omega)).abs().max().item() <= TOL
    q = crf_ext.mean_field(img, prob, box, iters=5, omega=omega)
    monkeypatch.setenv("MAL_CRF_CPU_PATH", "emulate")
    emu = crf_ext.mean_field(img, prob, box, iters=5, omega=omega)
    assert (q - emu).abs().max().item() <= 1e-6


def test_cuda_emulation_path_matches_fast_path(monkeypatch):
    """MAL_CRF_CPU_PATH=emulate runs the per-pixel code of the CUDA smem/global kernels
    (bounds-checked gather_w/gather_q from mean_field.h) on the CPU."""
    for B, C, H, W, iters, kind, mask in [(3, 3, 1, 1, 10, "smooth", True), (2, 3, 1, 9, 10, "smooth", False),
                                          (2, 3, 9, 1, 10, "smooth", True), (3, 3, 37, 53, 30, "smooth", True),
                                          (2, 2, 64, 70, 10, "noise", False)]:
        img, prob, box = make_inputs(B, C, H, W, kind, mask)
        fast = crf_ext.mean_field(img, prob, box, iters=iters)
        monkeypatch.setenv("MAL_CRF_CPU_PATH", "emulate")
        emu = crf_ext.mean_field(img, prob, box, iters=iters)
        monkeypatch.delenv("MAL_CRF_CPU_PATH")
        assert (fast - emu).abs().max().item() <= 1e-6
        assert (emu.double() - mean_field_float64(img, prob, box, iters=iters)).abs().max().item() <= TOL


def test_cpu_vector_blocks_and_tail_for_every_span_width(monkeypatch):
    """The CPU loop sweeps each row's box span in vector blocks (16 or 32 pixels, the last block
    overlapping the one before) or, below one block, pixel by pixel: every span width from 1 to 72
    at every offset mod 8, contiguous (crop 0) and with holes (crop 1), gives the emulation path's
    values and Q = 0 outside the mask."""
    H, W = 72, 80
    img, prob, _ = make_inputs(2, 3, H, W, "noise", False, seed=7)
    box = torch.zeros(2, H, W, dtype=torch.bool)
    for y in range(H):
        box[:, y, y % 8:y % 8 + y + 1] = True
    box[1] &= torch.rand(H, W, generator=torch.Generator().manual_seed(7)) > 0.2
    fast = crf_ext.mean_field(img, prob, box, iters=7)
    monkeypatch.setenv("MAL_CRF_CPU_PATH", "emulate")
    emu = crf_ext.mean_field(img, prob, box, iters=7)
    assert (fast - emu).abs().max().item() <= 1e-6
    assert (fast[~box] == 0).all()


def test_exp_log_roundtrip_single_pixel():
    """1x1 crops: no neighbours, so Q1 = sigmoid(log p - log(1-p)) = clamp(p): checks mf_log/mf_exp."""
    p = torch.cat([torch.tensor([0.0, 1e-7, 1e-6, 0.5, 1 - 1e-6, 1.0]), torch.rand(2000)])
    img = torch.zeros(p.numel(), 3, 1, 1)
    q = crf_ext.mean_field(img, p.view(-1, 1, 1), iters=1).view(-1)
    assert (q.double() - p.double().clamp(1e-6, 1 - 1e-6)).abs().max().item() <= 2e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    img, prob, box = make_inputs(4, 3, 37, 53, "smooth", True)
    img_h, prob_h = img.to(dtype), prob.to(dtype)
    q = crf_ext.mean_field(img_h, prob_h, box, iters=50)
    assert q.dtype == torch.float32
    assert (q.double() - mean_field_float64(img_h.double(), prob_h.double(), box, iters=50)).abs().max().item() <= TOL
    # mixed dtypes are fine too
    q2 = crf_ext.mean_field(img_h, prob_h.float(), box.float(), iters=50)
    assert torch.equal(q, q2)


def test_empty_batch_and_shapes():
    q = crf_ext.mean_field(torch.zeros(0, 3, 5, 7), torch.zeros(0, 5, 7), iters=10)
    assert q.shape == (0, 5, 7) and q.dtype == torch.float32
    q = crf_ext.mean_field(torch.zeros(0, 3, 5, 7), torch.zeros(0, 5, 7), torch.zeros(0, 5, 7, dtype=torch.bool), iters=3)
    assert q.shape == (0, 5, 7)


def test_mask_none_equals_all_ones_and_mask_dtypes():
    img, prob, box = make_inputs(3, 3, 37, 53, "smooth", True)
    q_none = crf_ext.mean_field(img, prob, None, iters=20)
    for ones in (torch.ones(3, 37, 53), torch.ones(3, 37, 53, dtype=torch.bool), torch.ones(3, 37, 53, dtype=torch.uint8)):
        assert torch.equal(q_none, crf_ext.mean_field(img, prob, ones, iters=20))
    q_bool = crf_ext.mean_field(img, prob, box, iters=20)
    for m in (box.to(torch.uint8), box.float() * 0.7, box.to(torch.float16), box.to(torch.bfloat16)):
        assert torch.equal(q_bool, crf_ext.mean_field(img, prob, m, iters=20))


def test_noncontiguous_inputs():
    img, prob, box = make_inputs(2, 3, 40, 30, "smooth", True)
    q = crf_ext.mean_field(img, prob, box, iters=10)
    img_t = img.transpose(2, 3).contiguous().transpose(2, 3)
    img_cl = img.contiguous(memory_format=torch.channels_last)
    prob_t = prob.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(q, crf_ext.mean_field(img_t, prob_t, box.transpose(1, 2).contiguous().transpose(1, 2), iters=10))
    assert torch.equal(q, crf_ext.mean_field(img_cl, prob, box, iters=10))


def test_no_autograd_graph():
    img, prob, box = make_inputs(2, 3, 16, 16, "smooth", True)
    img.requires_grad_(True)
    prob.requires_grad_(True)
    for q in (torch.ops.mal.mean_field(img, prob, box, 5, 0.5, 2.0), crf_ext.mean_field(img, prob, box, iters=5)):
        assert not q.requires_grad and q.grad_fn is None
    with torch.enable_grad():  # even with grad mode on, the Autograd kernel does not record
        q = torch.ops.mal.mean_field(img, prob, None, 5, 0.5, 2.0)
    assert not q.requires_grad


def test_schema_defaults():
    img, prob, _ = make_inputs(2, 3, 9, 11, "smooth", False)
    assert torch.equal(torch.ops.mal.mean_field(img, prob, None, 7), torch.ops.mal.mean_field(img, prob, None, 7, 0.5, 2.0))


def test_opcheck_cpu():
    img, prob, box = make_inputs(2, 3, 9, 11, "smooth", True)
    for args in [(img, prob, box, 5, 0.5, 2.0), (img, prob, None, 0, 0.7, 1.0),
                 (img.half(), prob.bfloat16(), box.float(), 3, 0.5, 2.0),
                 (img.requires_grad_(), prob, box, 3, 0.5, 2.0)]:
        torch.library.opcheck(torch.ops.mal.mean_field, args)


def test_torch_compile_fullgraph():
    img, prob, box = make_inputs(2, 3, 9, 11, "smooth", True)

    def f(i, p, m):
        return torch.ops.mal.mean_field(i, p, m, 5, 0.5, 2.0) > 0.5

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(cf(img, prob, box), f(img, prob, box))


BAD = [
    (lambda i, p, m: (i[0], p, m, 1, 0.5, 2.0), "image must be \\[B,C,H,W\\], got 3-d tensor of shape \\[3, 8, 9\\]"),
    (lambda i, p, m: (i, p[None], m, 1, 0.5, 2.0), "prob must be \\[B,H,W\\]"),
    (lambda i, p, m: (i, p[:, :-1], m, 1, 0.5, 2.0),
     "prob shape \\[2, 7, 9\\] does not match image shape \\[2, 3, 8, 9\\] \\(expected \\[B,H,W\\] = \\[2, 8, 9\\]\\)"),
    (lambda i, p, m: (i, p[:1], m, 1, 0.5, 2.0), "does not match image shape"),
    (lambda i, p, m: (i, p, m[:, 1:], 1, 0.5, 2.0), "box_mask must be \\[B,H,W\\] = \\[2, 8, 9\\], got shape \\[2, 7, 9\\]"),
    (lambda i, p, m: (i.double(), p, m, 1, 0.5, 2.0), "image dtype must be float32, float16 or bfloat16"),
    (lambda i, p, m: (i, (p > 0.5).long(), m, 1, 0.5, 2.0), "prob dtype must be float32, float16 or bfloat16"),
    (lambda i, p, m: (i, p, m.int(), 1, 0.5, 2.0), "box_mask dtype must be"),
    (lambda i, p, m: (i, p, m, -1, 0.5, 2.0), "iters must be >= 0, got -1$"),
    (lambda i, p, m: (i, p, m, 1, 0.0, 2.0), "zeta must be a finite number > 0, got 0$"),
    (lambda i, p, m: (i, p, m, 1, -1.5, 2.0), "zeta must be a finite number > 0, got -1.5$"),
    (lambda i, p, m: (i, p, m, 1, 0.5, float("nan")), "omega must be finite, got nan$"),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))])
@pytest.mark.parametrize("make,msg", BAD)
def test_bad_inputs_raise(make, msg, device):
    """A one-line error with the offending numbers in it, on either device (building such a message
    once crashed the process: crf_ext/op_common.h)."""
    assert crf_ext.available(device), crf_ext.unavailable_reason(device)  # loads (registers) the device's kernel
    img, prob, box = (t.to(device) for t in make_inputs(2, 3, 8, 9, "smooth", True))
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.mal.mean_field(*make(img, prob, box))


def test_loader_api_and_failure_is_recorded(monkeypatch):
    assert crf_ext.available("cpu") and crf_ext.available(torch.device("cpu"))
    assert crf_ext.unavailable_reason("cpu") is None
    assert crf_ext.status()["cpu"]["loaded"]
    assert not crf_ext.available("meta") and "meta" in crf_ext.unavailable_reason("meta")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mal::mean_field", "CPU")
    # a broken build never raises: it returns the reason
    monkeypatch.setattr(crf_ext, "_CPU_SOURCES", ["does_not_exist.cpp"])
    st = crf_ext._build("cpu")
    assert not st["loaded"] and "does_not_exist.cpp" in st["error"]


def test_find_cuda_home_resolves_wrappers():
    home = crf_ext.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    nvcc = os.path.join(home, "bin", "nvcc")
    assert os.path.isfile(nvcc) and open(nvcc, "rb").read(2) != b"#!"
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def test_second_load_uses_the_build_cache():
    code = "import crf_ext; r = crf_ext.load(cuda=False); print(r['cpu'], crf_ext.status()['cpu']['cached'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
    assert "crf_ext:" not in out.stderr  # a cached load says nothing


def test_a_real_build_says_when_it_starts_and_ends(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("MAL_CRF_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_ext, "load", lambda **kw: None)  # stands in for the 10-30 s compile
    capsys.readouterr()  # torch's own notes on importing cpp_extension
    assert crf_ext._build("cpu")["loaded"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"crf_ext: building the cpu mean-field kernel in {tmp_path}")
    assert err[1].startswith("crf_ext: built the cpu kernel in ") and err[1].endswith(" s")

    def fail(**kw):
        raise RuntimeError("the compiler said no")

    monkeypatch.setattr(cpp_ext, "load", fail)
    st = crf_ext._build("cpu")
    assert not st["loaded"] and "the compiler said no" in st["error"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("crf_ext: the cpu kernel build failed after ")


@pytest.mark.skipif(crf_ext.cuda_buildable() is not None, reason="no nvcc or CPU-only torch")
def test_cuda_module_builds_and_registers():
    # First run builds (~1.5 min on 2 cores, sm_80+sm_90 without a GPU); later runs hit the cache.
    res = crf_ext.load(cuda=True)
    assert res["cuda"], crf_ext.status().get("cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mal::mean_field", "CUDA")


# ------------------------------------------------------------------ CUDA kernels on the CPU (emulated)
# crf_ext/cuda_emu.h runs mean_field_cuda.cu, kernels and launcher, as host code: each path is the one
# the launcher's own selection picks with an H100's or an A100's device attributes.

EMU_GPUS = {"h100": (132, 227 * 1024), "a100": (108, 163 * 1024)}  # SMs, opt-in shared memory per block


@pytest.fixture(scope="module")
def cuda_emu_ops():
    return crf_ext.cuda_emu()


def emu_inputs(B, H, W, mask, seed=0):
    """make_inputs' smooth image with no mask, a box, or a box with holes."""
    img, prob, box = make_inputs(B, 3, H, W, "smooth", mask != "none", seed)
    if mask == "holes":
        box &= torch.rand(B, H, W, generator=torch.Generator().manual_seed(seed)) > 0.3
    return img, prob, box


def expected_launches(gpu, B, H, W, iters, forced):
    """The launches the design in mean_field_cuda.cu calls for: reg up to 4096 pixels (64×64), up to 8 per
    thread; smem while its two Q buffers (8 B/px) fit the opt-in shared memory; global beyond, its grid at
    most 32 blocks per SM. A forced path that does not fit falls back to that choice."""
    HW = H * W
    sms, optin = EMU_GPUS[gpu]
    fits = {"reg": HW <= 4096, "smem": 8 * HW <= optin, "global": True}
    path = forced if fits.get(forced) else next(p for p in ("reg", "smem", "global") if fits[p])
    up32 = lambda n: -(-n // 32) * 32  # noqa: E731
    if path == "reg":
        ppt = next(p for p in (1, 2, 4, 8) if HW <= 512 * p)
        return [f"mf_reg_kernel<PPT> grid={B} block={up32(-(-HW // ppt))} smem={8 * HW}"]
    grid = min(-(-B * HW // 256), 32 * sms)
    prepare = f"mf_prepare_kernel grid={grid} block=256 smem=0"
    if path == "smem":
        return [prepare, f"mf_smem_kernel grid={B} block={min(1024, up32(HW))} smem={8 * HW}"]
    return [prepare] + [f"mf_global_step_kernel grid={grid} block=256 smem=0"] * iters


@functools.lru_cache(maxsize=None)
def emu_case(B, H, W, iters, mask):
    """A case's inputs and float64 result, computed once for all the paths that run it."""
    img, prob, box = emu_inputs(B, H, W, mask)
    return img, prob, box, mean_field_float64(img, prob, box, iters=iters)


def run_cuda_emu(ops, monkeypatch, gpu, B, H, W, iters, mask, forced):
    monkeypatch.setenv("MAL_CRF_EMU_GPU", gpu)
    if forced != "auto":
        monkeypatch.setenv("MAL_CRF_CUDA_PATH", forced)
    img, prob, box, r64 = emu_case(B, H, W, iters, mask)
    q = ops.mean_field(img, prob, box, iters, 0.5, 2.0)
    assert q.shape == (B, H, W) and q.dtype == torch.float32
    assert ops.launches() == expected_launches(gpu, B, H, W, iters, forced)
    assert (q.double() - r64).abs().max().item() <= TOL
    if box is not None:
        assert (q[~box] == 0).all()


# The reg kernel's pixels per thread: 1 for 1×1 and 300×1, 2 for 1×700, 4 for 37×53, 8 for 64×64.
EMU_CASES = [  # gpu, B, H, W, iters, mask
    ("h100", 3, 1, 1, 10, "box"),
    ("h100", 2, 1, 700, 2, "none"),
    ("h100", 2, 300, 1, 1, "holes"),
    ("h100", 4, 37, 53, 0, "holes"),
    ("h100", 4, 37, 53, 10, "box"),
    ("h100", 2, 64, 64, 2, "holes"),    # the largest reg crop (4096 pixels)
    ("h100", 2, 65, 65, 10, "none"),    # the smallest smem crop
    ("h100", 4, 128, 128, 1, "holes"),  # smem above the default 48 KB: needs cudaFuncSetAttribute
    ("h100", 2, 128, 128, 10, "box"),
    ("a100", 2, 150, 150, 2, "box"),    # smem on an H100 (176 KB <= 227 KB), global on an A100 (> 163 KB)
]


@pytest.mark.parametrize("forced", ["auto", "reg", "smem", "global"])
@pytest.mark.parametrize("gpu,B,H,W,iters,mask", EMU_CASES)
def test_cuda_emu_kernels_match_float64(cuda_emu_ops, monkeypatch, gpu, B, H, W, iters, mask, forced):
    run_cuda_emu(cuda_emu_ops, monkeypatch, gpu, B, H, W, iters, mask, forced)


def test_cuda_emu_512_global_grid_stride(cuda_emu_ops, monkeypatch):
    """B = 4 512×512 on an A100: the global path with its grid capped at 32 × 108 blocks, so the prepare
    and step kernels' grid-stride loops take a second lap over 164k of the 1M pixels."""
    assert expected_launches("a100", 4, 512, 512, 2, "auto")[1] == "mf_global_step_kernel grid=3456 block=256 smem=0"
    run_cuda_emu(cuda_emu_ops, monkeypatch, "a100", 4, 512, 512, 2, "box", "auto")


@pytest.mark.parametrize("gpu,H,W,path", [
    ("h100", 64, 64, "reg"), ("h100", 1, 4096, "reg"), ("h100", 1, 4097, "smem"), ("a100", 65, 65, "smem"),
    ("h100", 1, 29056, "smem"), ("h100", 1, 29057, "global"),  # 8 B/px against 227 KB = 232448 B
    ("a100", 1, 20864, "smem"), ("a100", 1, 20865, "global"),  # and against 163 KB = 166912 B
])
def test_cuda_emu_auto_path_boundaries(cuda_emu_ops, monkeypatch, gpu, H, W, path):
    monkeypatch.setenv("MAL_CRF_EMU_GPU", gpu)
    img, prob, box = emu_inputs(1, H, W, "box")
    q = cuda_emu_ops.mean_field(img, prob, box, 1, 0.5, 2.0)
    kernels = [line.split()[0] for line in cuda_emu_ops.launches()]
    assert kernels == {"reg": ["mf_reg_kernel<PPT>"], "smem": ["mf_prepare_kernel", "mf_smem_kernel"],
                       "global": ["mf_prepare_kernel", "mf_global_step_kernel"]}[path]
    assert (q.double() - mean_field_float64(img, prob, box, iters=1)).abs().max().item() <= TOL


def test_cuda_emu_empty_batch_and_unknown_gpu(cuda_emu_ops, monkeypatch):
    q = cuda_emu_ops.mean_field(torch.zeros(0, 3, 5, 7), torch.zeros(0, 5, 7), None, 3, 0.5, 2.0)
    assert q.shape == (0, 5, 7) and cuda_emu_ops.launches() == []
    monkeypatch.setenv("MAL_CRF_EMU_GPU", "v100")
    with pytest.raises(RuntimeError, match="MAL_CRF_EMU_GPU must be h100 or a100, got 'v100'"):
        cuda_emu_ops.mean_field(*emu_inputs(1, 5, 7, "box"), 3, 0.5, 2.0)


def test_cuda_emu_without_barrier_disagrees(monkeypatch):
    """The emulator can fail: built with __syncthreads() doing nothing, the reg and smem kernels (one block
    per crop, iterations separated by barriers) read neighbours before they are written and disagree with
    float64; the global path, whose barrier between iterations is the launch boundary, still agrees."""
    broken = crf_ext.cuda_emu(nobarrier=True)
    monkeypatch.setenv("MAL_CRF_EMU_GPU", "h100")
    img, prob, box, r64 = emu_case(2, 37, 53, 2, "box")
    for path in ("reg", "smem", "global"):
        monkeypatch.setenv("MAL_CRF_CUDA_PATH", path)
        q = broken.mean_field(img, prob, box, 2, 0.5, 2.0)
        assert broken.launches() == expected_launches("h100", 2, 37, 53, 2, path)
        err = (q.double() - r64).abs().nan_to_num(nan=math.inf).max().item()
        assert err <= TOL if path == "global" else err > 0.1, (path, err)


# ------------------------------------------------------------------ CUDA (needs a GPU)
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

GPU_CASES = [  # B, C, H, W, iters, kind, mask
    (3, 3, 1, 1, 10, "smooth", True), (2, 3, 1, 29, 10, "smooth", False), (2, 3, 29, 1, 10, "smooth", True),
    (5, 3, 37, 53, 0, "smooth", True), (5, 3, 37, 53, 100, "smooth", False), (32, 3, 37, 53, 10, "noise", True),
    (4, 3, 64, 64, 100, "smooth", True), (3, 3, 1, 4096, 10, "smooth", True), (3, 3, 70, 70, 20, "smooth", True),
    (8, 3, 128, 128, 100, "smooth", True), (2, 3, 200, 300, 10, "smooth", False), (32, 3, 512, 512, 20, "smooth", True),
]


@needs_gpu
@pytest.mark.parametrize("path", ["auto", "reg", "smem", "global"])
@pytest.mark.parametrize("B,C,H,W,iters,kind,mask", GPU_CASES)
def test_cuda_matches_cpu(monkeypatch, path, B, C, H, W, iters, kind, mask):
    assert crf_ext.available("cuda"), crf_ext.unavailable_reason("cuda")
    if path != "auto":
        monkeypatch.setenv("MAL_CRF_CUDA_PATH", path)  # falls back to auto where it does not apply
    img, prob, box = make_inputs(B, C, H, W, kind, mask)
    q_cpu = crf_ext.mean_field(img, prob, box, iters=iters)
    q_gpu = crf_ext.mean_field(img.cuda(), prob.cuda(), None if box is None else box.cuda(), iters=iters)
    assert q_gpu.device.type == "cuda" and q_gpu.dtype == torch.float32
    assert (q_gpu.cpu() - q_cpu).abs().max().item() <= TOL
    if B * H * W <= 20000 and iters <= 20:
        assert (q_gpu.cpu().double() - mean_field_float64(img, prob, box, iters=iters)).abs().max().item() <= TOL


@needs_gpu
def test_cuda_misc():
    assert crf_ext.available("cuda")
    img, prob, box = make_inputs(2, 3, 20, 30, "smooth", True)
    d = torch.device("cuda")
    q = crf_ext.mean_field(img.to(d).half(), prob.to(d).bfloat16(), box.to(d).float(), iters=10)
    ref = mean_field_float64(img.half().double(), prob.bfloat16().double(), box, iters=10)
    assert (q.cpu().double() - ref).abs().max().item() <= TOL
    assert crf_ext.mean_field(torch.zeros(0, 3, 5, 7, device=d), torch.zeros(0, 5, 7, device=d), iters=3).shape == (0, 5, 7)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.mal.mean_field(img.to(d), prob, None, 1, 0.5, 2.0)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.mal.mean_field(img.to(d), prob.to(d), box, 1, 0.5, 2.0)
    torch.library.opcheck(torch.ops.mal.mean_field, (img.to(d), prob.to(d), box.to(d), 5, 0.5, 2.0))


# ==============================================================================================
# data.py: datasets, RoI crops, augmentations, the demo set

def _write_coco(path, images, annotations):
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=[{"id": 1, "name": "x"}]), f)
    return str(path)


def _ann(i, image_id, bbox, iscrowd=0):
    return dict(id=i, image_id=image_id, category_id=1, bbox=bbox, area=1.0, iscrowd=iscrowd)


def _rect_image(path, size=(200, 150), rect=(50, 40, 120, 90), bg=(30, 60, 200), fg=(230, 200, 20)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = bg
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = fg
    Image.fromarray(a).save(path)  # PNG: exact colours
    return a


def _check_mask_matches_colour(crop, mask, fg, bg):
    """Pixels clearly of fg colour must be in the mask, clearly bg outside; disagreements only in
    the 1-px band around the mask border."""
    c = crop.permute(1, 2, 0).float()
    d_fg = (c - torch.tensor(fg, dtype=torch.float)).norm(dim=-1)
    d_bg = (c - torch.tensor(bg, dtype=torch.float)).norm(dim=-1)
    is_fg = d_fg < d_bg
    m = mask > 0.5
    assert m.any() and is_fg.any()
    wrong = is_fg != m
    mf = m.float()[None, None]
    dil = torch.nn.functional.max_pool2d(mf, 3, 1, 1)[0, 0] > 0
    ero = -torch.nn.functional.max_pool2d(-mf, 3, 1, 1)[0, 0] > 0
    band = dil & ~ero
    assert not (wrong & ~band).any(), int((wrong & ~band).sum())


def test_normalize_uint8_and_float():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    y = data.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y, data.normalize(x.float()))
    ref = (x.float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(y, ref, atol=1e-5)


def test_load_rgb_all_modes(tmp_path):
    g = np.tile(np.linspace(0, 1, 64), (16, 1))
    cases = {
        "L.png": Image.fromarray((g * 255).astype(np.uint8), "L"),
        "RGBA.png": Image.new("RGBA", (64, 16), (10, 20, 30, 0)),
        "LA.png": Image.new("LA", (64, 16), (100, 50)),
        "P.png": Image.new("RGB", (64, 16), (5, 200, 9)).convert("P", palette=Image.ADAPTIVE),
        "1.png": Image.fromarray(g > 0.5).convert("1"),
        "CMYK.jpg": Image.new("CMYK", (64, 16), (0, 255, 255, 0)),
        "I16.png": Image.fromarray((g * 65535).astype(np.uint16)),
        "I.tif": Image.fromarray((g * 65535).astype(np.int32), "I"),
        "F.tif": Image.fromarray(g.astype(np.float32), "F"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = data.load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (64, 16), name
        if name[:2] in ("I1", "I.", "F."):  # high bit depth: scaled to the full 0..255, not clipped
            a = np.asarray(out)[..., 0].astype(int)
            assert a.min() <= 2 and a.max() >= 250 and 100 < a[0, 32] < 160, (name, a.min(), a.max())
    assert np.asarray(data.load_rgb(tmp_path / "P.png"))[0, 0].tolist() == [5, 200, 9]


def test_load_rgb_errors_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    (tmp_path / "notes.bmp").write_bytes(b"BM" + b"x" * 100)  # a header Pillow knows, then nothing it can read
    for name, says in (("missing.jpg", "file not found"), ("trunc.jpg", "not a readable image (OSError: "),
                       ("garbage.jpg", "not a readable image"),
                       ("notes.bmp", "not a readable image (OSError: Truncated File Read)")):  # Pillow's words kept
        with pytest.raises(data.ImageError) as e:
            data.load_rgb(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name) + ": " + says) and "\n" not in msg, msg


def test_roi_crop_mapping_identity_and_tiny_box():
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    crop, mask, used = data.roi_crop(img, (8, 4, 24, 20), (0, 0, 48, 32), 16)
    assert used == (0.0, 0.0, 48.0, 32.0) and crop.dtype == torch.uint8 and crop.shape == (3, 16, 16)
    # pixel centres x = (u+0.5)*3 -> inside [8, 24] for u = 3..7; y = (v+0.5)*2 in [4, 20] for v = 2..9
    assert mask.nonzero()[:, 1].unique().tolist() == [3, 4, 5, 6, 7]
    assert mask.nonzero()[:, 0].unique().tolist() == list(range(2, 10))
    _, m, _ = data.roi_crop(img, (10.2, 10.2, 10.3, 10.25), (0, 0, 48, 32), 8)  # thinner than a pixel
    assert m.sum() == 1
    # padded, not clamped: 3.2 and 2.1 crop pixels leave the image -> 3 and 2 whole pad pixels,
    # the far edges moved so that the image's edges fall on pixel boundaries
    _, _, used = data.roi_crop(img, (40, 20, 46, 30), (30, 10, 60, 40), 8)
    assert used[:2] == (30.0, 10.0) and used[2:] == pytest.approx((48 + 3 * 18 / 5, 32 + 2 * 22 / 6))


def test_roi_crop_exact_at_scale_one():
    a = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop, _, _ = data.roi_crop(Image.fromarray(a), (5, 5, 10, 10), (7, 3, 27, 23), 20)
    assert torch.equal(crop, torch.from_numpy(a[3:23, 7:27]).permute(2, 0, 1))


def test_roi_crop_pads_outside_the_image():
    """At scale one the crop is the image's pixels where the expanded box is inside the image and the
    pad colour (0 after normalize) elsewhere; the box mask stays on the image's pixels."""
    a = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop, mask, used = data.roi_crop(Image.fromarray(a), (0, 0, 5, 5), (-4, -3, 16, 17), 20)
    assert used == (-4.0, -3.0, 16.0, 17.0)
    want = torch.tensor(data.PAD_RGB, dtype=torch.uint8).view(3, 1, 1).repeat(1, 20, 20)
    want[:, 3:, 4:] = torch.from_numpy(a[:17, :16]).permute(2, 0, 1)
    assert torch.equal(crop, want)
    assert data.normalize(crop)[:, 0, 0].abs().max() < 0.01
    assert mask.nonzero().min(0).values.tolist() == [3, 4] and mask.nonzero().max(0).values.tolist() == [7, 8]


@pytest.fixture
def rect_set(tmp_path):
    fg, bg = (230, 200, 20), (30, 60, 200)
    _rect_image(tmp_path / "a.png", rect=(50, 40, 120, 90), fg=fg, bg=bg)
    _rect_image(tmp_path / "b.png", rect=(0, 100, 30, 150), fg=fg, bg=bg)  # touches the border
    js = _write_coco(tmp_path / "a.json",
                     [dict(id=1, file_name="a.png", width=200, height=150),
                      dict(id=2, file_name="b.png", width=200, height=150)],
                     [_ann(1, 1, [50, 40, 70, 50]), _ann(2, 2, [0, 100, 30, 50])])
    return js, str(tmp_path), fg, bg


def test_box_mask_lines_up_with_crop_eval_and_train(rect_set):
    js, root, fg, bg = rect_set
    ev = data.BoxDataset(js, root, size=64, train=False)
    for i in range(2):
        s = ev[i]
        assert s["valid"] and not s["flipped"] and torch.equal(s["image"], s["teacher_image"])
        _check_mask_matches_colour(s["teacher_image"], s["box_mask"], fg, bg)
    tr = data.BoxDataset(js, root, size=64, train=True, seed=3)
    flips, padded = set(), set()
    for epoch in range(6):
        tr.set_epoch(epoch)
        for i in range(2):
            s = tr[i]
            flips.add(s["flipped"])
            _check_mask_matches_colour(s["teacher_image"], s["box_mask"], fg, bg)  # the pad is nearer bg
            x0, y0, x1, y1 = s["crop_box"].tolist()
            box = ((50, 40, 120, 90), (0, 100, 30, 150))[i]
            assert x0 <= box[0] < box[2] <= x1 and y0 <= box[1] < box[3] <= y1
            padded.add((i, x0 < 0 or y0 < 0 or x1 > 200 or y1 > 150))
    assert flips == {True, False} and padded == {(0, False), (1, True)}  # b.png's box touches the edge


def test_gt_mask_crops_follow_the_image_crops(tmp_path):
    """gt_masks=True: the GT mask goes through the same expansion, crop, resize and flip as the image,
    so a white-on-black image's crop is its mask's crop."""
    m = np.zeros((60, 80), np.uint8)
    m[10:45, 20:70] = 1
    m[20:35, 35:55] = 0  # a hole
    Image.fromarray(m * 255).convert("RGB").save(tmp_path / "a.png")
    rle = mask_utils.encode(np.asfortranarray(m))
    ann = dict(_ann(1, 1, [20, 10, 50, 35]), segmentation=dict(size=[60, 80], counts=rle["counts"].decode()))
    js = _write_coco(tmp_path / "a.json", [dict(id=1, file_name="a.png", width=80, height=60)], [ann])
    ds = data.BoxDataset(js, str(tmp_path), size=40, train=True, seed=1, color_aug=False, gt_masks=True)
    flips, pads = set(), set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        s = ds[0]
        flips.add(s["flipped"])
        pad = (s["teacher_image"] == torch.tensor(data.PAD_RGB, dtype=torch.uint8).view(3, 1, 1)).all(0)
        pads.add(bool(pad.any()))  # where the crop leaves the image: the pad colour, and no mask
        assert not s["gt_mask"][pad].any()
        assert torch.allclose(s["gt_mask"][~pad], s["teacher_image"][0][~pad].float() / 255, atol=1 / 255)
        assert 0.2 < s["gt_mask"].mean() < 0.8
    assert flips == {True, False} and pads == {True, False}
    batch = data.collate_boxes([ds[0], ds[0]])
    assert batch["gt_mask"].shape == (2, 40, 40)
    with pytest.raises(ValueError, match="annotation 2: --gt-masks needs a segmentation"):
        data.BoxDataset(_write_coco(tmp_path / "b.json", [dict(id=1, file_name="a.png", width=80, height=60)],
                                    [_ann(2, 1, [1, 1, 9, 9])]), str(tmp_path), gt_masks=True)


def test_teacher_image_never_jittered(rect_set):
    js, root, _, _ = rect_set
    tr = data.BoxDataset(js, root, size=48, train=True, seed=0)
    img = data.load_rgb(os.path.join(root, "a.png"))
    differs = 0
    for epoch in range(10):
        tr.set_epoch(epoch)
        s = tr[0]
        ref, mask, _ = data.roi_crop(img, (50, 40, 120, 90), s["crop_box"].tolist(), 48)
        if s["flipped"]:
            ref, mask = ref.flip(-1), mask.flip(-1)
        assert torch.equal(s["teacher_image"], ref) and torch.equal(s["box_mask"], mask)
        differs += not torch.equal(s["image"], s["teacher_image"])
    assert differs >= 3


def test_dataset_skips_and_counts(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.jpg")
    anns = [_ann(1, 1, [10, 10, 50, 50]), _ann(2, 1, [10, 10, 50, 50], iscrowd=1),
            _ann(3, 1, [0, 0, 10, 10]), _ann(4, 1, [10, 10, 0, 5]), _ann(5, 1, [10, 10, 5, -1]),
            _ann(6, 1, [float("nan"), 1, 5, 5]), _ann(7, 1, [150, 10, 10, 10]), _ann(8, 99, [1, 1, 50, 50]),
            _ann(9, 1, [90, 70, 40, 40])]  # partly outside: kept
    js = _write_coco(tmp_path / "a.json", [dict(id=1, file_name="a.jpg", width=100, height=80)], anns)
    ds = data.BoxDataset(js, tmp_path, size=32, min_area=200)
    assert ds.ann_ids.tolist() == [1, 9]
    assert ds.skipped == dict(missing_image_entry=1, iscrowd=1, degenerate=3, outside_image=1, small_area=1)
    assert "skipped 7" in ds.describe()
    assert data.BoxDataset(js, tmp_path, min_area=0).skipped["small_area"] == 0


def test_missing_and_corrupt_images_are_invalid_not_raised(tmp_path, capsys):
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(500))
    Image.new("RGB", (50, 48)).save(tmp_path / "wrongsize.jpg")
    names = ["ok.jpg", "missing.jpg", "trunc.jpg", "garbage.jpg", "wrongsize.jpg"]
    images = [dict(id=k + 1, file_name=n, width=64, height=48) for k, n in enumerate(names)]
    anns = [_ann(10 * (k + 1) + j, k + 1, [5, 5, 20, 20]) for k in range(5) for j in range(2)]
    ds = data.BoxDataset(_write_coco(tmp_path / "a.json", images, anns), tmp_path, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one plain line per file on stderr, no Python warning
        samples = [ds[i] for i in range(len(ds))] + [ds[2]]
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == sorted(f"data.py: skipping unusable image {r}" for r in ds.bad_images.values())
    assert len(lines) == 4 and all(any(os.path.join(str(tmp_path), n) + ": " in x for x in lines) for n in names[1:])
    assert [s["valid"] for s in samples[:10]] == [True, True] + [False] * 8
    assert all(s["image"].shape == (3, 16, 16) and s["box_mask"].shape == (16, 16) for s in samples)
    assert ds.n_invalid == 9 and len(ds.bad_images) == 4
    batch = data.collate_boxes(samples[:4])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["n_invalid"] == 2
    assert batch["ann_id"].tolist() == [10, 11]
    empty = data.collate_boxes(samples[2:4])
    assert empty["image"].shape == (0, 3, 16, 16) and empty["n_invalid"] == 2


def test_stats_size_classes_by_annotation_area_and_usable_counts(tmp_path, capsys):
    """data.py stats: COCO's size classes by the annotation's area (box w×h only where it has none), and
    with --check-images one plain line per unusable image and a headline that counts only usable ones."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (200, 150)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    images = [dict(id=k + 1, file_name=n, width=200, height=150) for k, n in enumerate(("a.png", "b.png", "bad.png"))]
    anns = [dict(_ann(1, 1, [0, 0, 40, 40]), area=900),  # box medium, mask small
            dict(_ann(2, 1, [0, 0, 120, 100]), area=5000),  # box large, mask medium
            _ann(3, 2, [0, 0, 100, 100]), _ann(4, 3, [0, 0, 10, 10]), _ann(5, 3, [0, 0, 0, 10])]
    del anns[2]["area"], anns[3]["area"]
    js = _write_coco(tmp_path / "a.json", images, anns)
    data.main(["stats", "--json", js, "--images", str(tmp_path)])
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "4 boxes on 3 of 3 images (min_area=0); skipped 1: degenerate=1",
        "boxes by COCO size class (annotation area): small(<32²)=2 medium=1 large(>=96²)=1; "
        "2 without an area, classed by their box w×h"] and out.err == ""
    data.main(["stats", "--json", js, "--images", str(tmp_path), "--check-images"])
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "images checked: 3, unusable: 1",
        "3 boxes on 2 of 3 images (min_area=0); skipped 2: degenerate=1, unusable_image=1",
        "boxes by COCO size class (annotation area): small(<32²)=1 medium=1 large(>=96²)=1; "
        "1 without an area, classed by their box w×h"]
    assert out.err == f"data.py: skipping unusable image {tmp_path / 'bad.png'}: not a readable image " \
                      f"(OSError: Truncated File Read)\n"


def test_training_samples_independent_of_workers(tmp_path):
    out = synthetic.make_demo(tmp_path / "demo", n_train=4, n_val=0)
    ds = data.BoxDataset(out["train_json"], out["train_images"], size=32, train=True, seed=5)
    ds.set_epoch(2)
    sampler = data.ImageGroupedSampler(ds)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    rows = ds.img_rows[order]
    assert (np.diff(rows) != 0).sum() == len(np.unique(rows)) - 1  # boxes of an image consecutive

    def run(workers):
        dl = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler, num_workers=workers,
                                         collate_fn=data.collate_boxes)
        return [b for b in dl]

    a, b = run(0), run(2)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("image", "teacher_image", "box_mask", "crop_box", "ann_id", "flipped"):
            assert torch.equal(x[k], y[k]), k
    ds.set_epoch(3)
    assert not torch.equal(run(0)[0]["crop_box"], a[0]["crop_box"])


def test_demo_deterministic_cached_and_content(tmp_path, capsys):
    from pycocotools import mask as mask_utils

    p1 = synthetic.make_demo(tmp_path / "d1", n_train=14, n_val=2, seed=1)
    made = capsys.readouterr().err.splitlines()  # a line when it starts and one when done, with the time
    assert len(made) == 2 and made[0].startswith(f"making the demo set in {tmp_path / 'd1'}")
    assert made[1].startswith(f"made the demo set in {tmp_path / 'd1'} (") and made[1].endswith(" s)")
    p2 = synthetic.make_demo(tmp_path / "d2", n_train=14, n_val=2, seed=1)
    for key in ("train_json", "val_json"):
        assert open(p1[key], "rb").read() == open(p2[key], "rb").read()
    for name in ("000000.jpg", "000007.jpg", "000013.jpg"):
        assert open(os.path.join(p1["train_images"], name), "rb").read() == \
            open(os.path.join(p2["train_images"], name), "rb").read()
    mtime = os.path.getmtime(p1["train_json"])
    capsys.readouterr()
    assert synthetic.make_demo(tmp_path / "d1", n_train=14, n_val=2, seed=1) == p1  # cached: silent
    assert os.path.getmtime(p1["train_json"]) == mtime and capsys.readouterr().err == ""

    coco = json.load(open(p1["train_json"]))
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    counts = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=15)[1:]
    assert counts.min() >= 1 and counts.max() <= 7
    areas, fill = [], []
    for a in coco["annotations"]:
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == sizes[a["image_id"]] and a["iscrowd"] == 0
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum()
        areas.append(a["area"])
        fill.append(a["area"] / (w * h))
    areas = np.array(areas)
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
    assert np.mean(np.array(fill) < 0.5) > 0.2  # many clearly non-convex / holed shapes
    img = data.load_rgb(os.path.join(p1["train_images"], "000000.jpg"))
    assert img.size == (256, 192)


def test_image_boxes_reports_errors_and_bad_boxes(tmp_path):
    Image.new("RGB", (100, 80), (200, 10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    images = [dict(id=1, file_name="a.jpg", width=100, height=80),
              dict(id=2, file_name="missing.jpg", width=100, height=80),
              dict(id=3, file_name="bad.jpg", width=100, height=80),
              dict(id=4, file_name="a.jpg", width=90, height=80)]
    boxes = {1: [(1, [10, 10, 30, 20]), (2, [10, 10, 0, 20]), (3, [float("inf"), 1, 2, 2]), (4, [200, 5, 5, 5]),
                 (5, [90, 70, 50, 50])],
             2: [(6, [1, 1, 5, 5])], 3: [(7, [1, 1, 5, 5])], 4: [(8, [1, 1, 5, 5])]}
    ds = data.ImageBoxes(images, boxes, tmp_path, size=24)
    it = ds[0]
    assert it["error"] is None and it["ann_ids"].tolist() == [1, 5] and (it["width"], it["height"]) == (100, 80)
    assert it["crops"].shape == (2, 3, 24, 24) and it["crops"].dtype == torch.uint8
    assert it["box_masks"].shape == (2, 24, 24) and it["box_masks"].dtype == torch.bool
    assert it["crop_boxes"].dtype == torch.float64
    assert [a for a, _ in it["bad"]] == [2, 3, 4] and all(isinstance(r, str) and r for _, r in it["bad"])
    for k, what in ((1, "missing.jpg"), (2, "bad.jpg"), (3, "decoded size")):
        it = ds[k]
        assert what in it["error"] and it["crops"].shape == (0, 3, 24, 24)
        assert it["bad"] == [(6 + k - 1, it["error"])]
    batch = data.collate_images([ds[0], ds[1], ds[0]])
    assert batch["crops"].shape == (4, 3, 24, 24) and batch["image_index"].tolist() == [0, 0, 2, 2]
    assert [m["n"] for m in batch["images"]] == [2, 0, 2] and batch["images"][1]["error"]


def test_blur_on_source_region_matches_blur_at_output():
    rng = np.random.default_rng(2)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC))
    img = Image.fromarray(a)
    crop = (20.5, 10.0, 84.0, 74.0)  # 63.5 x 64 source pixels -> 128: upscaled, blurred on the source
    fast = np.asarray(data._blurred_crop(img, crop, 128, 1.5)).astype(float)
    ref = np.asarray(data._crop_pil(img, crop, 128).filter(ImageFilter.GaussianBlur(1.5))).astype(float)
    assert np.abs(fast - ref)[8:-8, 8:-8].mean() < 2.0


# ==============================================================================================
# train.py: a few steps lower the loss, exact resume, torchrun DDP on CPU

def tiny_argv(tiny_set, out, *extra):
    return ["--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"], "--out", str(out),
            "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32", "--decoder-dim", "16",
            "--batch-size", "4", "--min-area", "16", "--loss-size", "32", "--crf-iters", "5", "--workers", "0",
            "--warmup-steps", "1", "--mil-ramp", "1", "--crf-ramp", "1", "--drop-path", "0.1", "--device", "cpu",
            "--log-every", "0", *extra]


def test_train_dinov2_reg4_from_authors_file_then_label(tiny_set, tmp_path, capsys):
    """train.py --init with a DINOv2-layout file (released at 37 × 37 positions) at patch 14, then label.py."""
    init = _save(_dinov2_authors_layout(mal.vit("vit_small_dinov2_reg4", depth=1, img_size=518)), tmp_path / "d.pth")
    train.main(tiny_argv(tiny_set, tmp_path / "run", "--arch", "vit_small_dinov2_reg4", "--patch-size", "14",
                         "--img-size", "28", "--init", init, "--epochs", "1", "--max-steps", "2"))
    err = capsys.readouterr().err
    assert f"load_pretrained {init}: loaded 21 tensors; missing none; unused none" in err
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_args"]["arch"] == "vit_small_dinov2_reg4"
    assert ckpt["teacher"]["encoder.reg_token"].shape == (1, 4, 384)
    out = tmp_path / "labels.json"
    label.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--json", tiny_set["val_json"], "--images",
                tiny_set["val_images"], "--out", str(out), "--workers", "0", "--quiet"])
    anns = json.loads(out.read_text())["annotations"]
    assert anns and all("segmentation" in a for a in anns)


def test_grouped_sampler_splits_ranks_into_grouped_blocks(tiny_set):
    ds = data.BoxDataset(tiny_set["train_json"], tiny_set["train_images"], size=32, min_area=16)
    blocks = [list(data.ImageGroupedSampler(ds, world=2, rank=r)) for r in range(2)]
    assert len(blocks[0]) == len(blocks[1]) == len(ds) // 2
    assert not set(blocks[0]) & set(blocks[1])
    for b in blocks:  # each image's boxes are consecutive within a rank's block
        rows = [int(ds.img_rows[i]) for i in b]
        changes = sum(x != y for x, y in zip(rows, rows[1:]))
        assert changes == len(set(rows)) - 1
    ds.set_epoch(1)
    assert list(data.ImageGroupedSampler(ds, world=2, rank=0)) != blocks[0]  # reshuffled each epoch


def test_train_lr_schedule():
    lrs = [train.lr_at(s, 100, 1.0, 10, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then cosine, decreasing
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)  # to the floor


def test_train_steps_lower_the_loss(tiny_set, tmp_path):
    train.main(tiny_argv(tiny_set, tmp_path, "--epochs", "30", "--lr-per-image", "2e-4", "--drop-path", "0"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) >= 20 and log[-1]["step"] == log[-1]["total"]
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(ckpt) >= {"model_args", "task", "teacher", "optimizer", "step", "epoch", "world", "rng", "args"}
    # No validation: no best.pt; epoch_N.pt only with --keep-epochs.
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["last.pt"]


def test_train_keeps_last_and_best_rates_training_only_and_logs_loss_weights(tiny_set, tmp_path, monkeypatch, capsys):
    """last.pt, and best.pt at the epoch of the best validation mIoU (remembered across a resume); epoch_N.pt
    only with --keep-epochs. The rate leaves validation time out. Progress lines and log.jsonl carry the loss
    weights as they ramp in."""
    mious, clock, real_time = {1: float("nan"), 2: 0.5, 3: 0.4}, [0.0], time.time

    def validate(args, net, teacher, device, epoch, step):  # takes 1000 s of a fake clock
        clock[0] += 1000.0
        return {"miou": mious[epoch]}

    monkeypatch.setattr(train, "validate", validate)
    monkeypatch.setattr(time, "time", lambda: real_time() + clock[0])
    spe = len(data.BoxDataset(tiny_set["train_json"], tiny_set["train_images"], min_area=16)) // 4  # steps/epoch
    common = ("--epochs", "3", "--val-json", tiny_set["val_json"], "--val-images", tiny_set["val_images"],
              "--mil-ramp", "4", "--crf-ramp", "8")
    train.main(tiny_argv(tiny_set, tmp_path, *common, "--max-steps", str(2 * spe)))
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["best.pt", "last.pt"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (best["epoch"], best["step"], best["best"]) == (2, 2 * spe, {"epoch": 2, "miou": 0.5})
    train.main(tiny_argv(tiny_set, tmp_path, *common, "--resume"))  # epoch 3's 0.4 is not better than 0.5
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 2 * spe
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (last["step"], last["best"]) == (3 * spe, {"epoch": 2, "miou": 0.5})
    err = capsys.readouterr().err
    assert "weights ramp in over 4 and 8 steps" in err and "best.pt: epoch 2, mIoU 0.500" in err
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log[-1]["step"] == 3 * spe
    for r in log:
        assert r["w_mil"] == pytest.approx(4.0 * min(1, r["step"] / 4))
        assert r["w_crf"] == pytest.approx(0.5 * min(1, r["step"] / 8))
        assert r["crops_per_s"] > 0.1  # 4 crops in 1000 s if a validation counted
    assert f"crf {log[-1]['crf']:.4f}, w_mil 4, w_crf 0.5) lr" in err
    train.main(tiny_argv(tiny_set, tmp_path / "k", "--epochs", "2", "--keep-epochs"))
    assert sorted(os.listdir(tmp_path / "k")) == ["epoch_1.pt", "epoch_2.pt", "last.pt", "log.jsonl"]
    assert torch.load(tmp_path / "k" / "epoch_2.pt", weights_only=True)["step"] == 2 * spe


@pytest.mark.parametrize("order", [(), ("--group-by-image",)])
def test_train_resume_is_exact(tiny_set, tmp_path, order):
    """2 steps + resume + 2 steps gives bit-identical weights to 4 steps straight (a mid-epoch resume)."""
    common = ("--epochs", "3", "--seed", "7", *order)
    train.main(tiny_argv(tiny_set, tmp_path / "straight", *common, "--max-steps", "4"))
    train.main(tiny_argv(tiny_set, tmp_path / "resumed", *common, "--max-steps", "2"))
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["step"] == 2
    train.main(tiny_argv(tiny_set, tmp_path / "resumed", *common, "--max-steps", "4", "--resume"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for part in ("task", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_train_compile_follows_eager(tiny_set, tmp_path):
    """train.py --compile (torch.compile of the task network and the teacher: inductor, C++ on the CPU)
    trains and follows the eager run: the same crops and no stochastic depth, so the same losses."""
    common = ("--epochs", "1", "--max-steps", "2", "--drop-path", "0")
    train.main(tiny_argv(tiny_set, tmp_path / "eager", *common))
    train.main(tiny_argv(tiny_set, tmp_path / "compiled", *common, "--compile"))
    eager, compiled = ([json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("eager", "compiled"))
    assert [r["step"] for r in compiled] == [1, 2]
    for a, b in zip(eager, compiled):
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_train_refuses_a_resume_that_changes_the_run(tiny_set, tmp_path):
    train.main(tiny_argv(tiny_set, tmp_path, "--epochs", "2", "--max-steps", "1"))
    with pytest.raises(SystemExit, match=r"last.pt: batch_size was 4 and is now 2"):
        train.main(tiny_argv(tiny_set, tmp_path, "--epochs", "2", "--batch-size", "2", "--resume"))
    with pytest.raises(SystemExit, match=r"nothing.pt: no checkpoint to resume from"):
        train.main(tiny_argv(tiny_set, tmp_path, "--resume", str(tmp_path / "nothing.pt")))
    with pytest.raises(SystemExit, match=r"nothing.pth: cannot load"):
        train.main(tiny_argv(tiny_set, tmp_path / "b", "--init", str(tmp_path / "nothing.pth")))
    with pytest.raises(SystemExit, match=r"missing.json: no such file"):
        train.main(tiny_argv(tiny_set, tmp_path / "c", "--val-json", str(tmp_path / "missing.json"),
                             "--val-images", str(tmp_path)))


def test_train_gt_masks_upper_bound_learns(tiny_set, tmp_path):
    train.main(tiny_argv(tiny_set, tmp_path, "--gt-masks", "--epochs", "30", "--lr-per-image", "2e-4",
                         "--drop-path", "0"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {"dice", "bce"} <= set(log[0]) and "mil" not in log[0]
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_train_demo_recipe_on_other_data(tiny_set, tmp_path, monkeypatch):
    """--demo with --train-json: the demo's model and schedule on that data, not the demo set."""
    monkeypatch.setattr(train, "DEMO_ROOT", str(tmp_path / "never"))
    args = train.get_args(["--demo", "--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"],
                           "--out", str(tmp_path / "run"), "--epochs", "3"])
    assert args.demo and not args.demo_data and args.val_json is None and args.out == str(tmp_path / "run")
    assert (args.arch, args.depth, args.img_size, args.loss_size, args.epochs) == ("vit_tiny", 3, 96, 48, 3)
    assert (args.crf_unary, args.crf_size, args.ema, args.color_aug) == (1e-4, 24, 0.99, False)
    assert train.get_args(["--train-json", "x.json", "--images", "."]).out == "runs/mal"
    assert train.get_args([]).demo_data and train.get_args([]).val_json == train.DEMO_DATA["val_json"]
    train.main(["--demo", "--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"],
                "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--workers", "0",
                "--min-area", "16", "--crf-iters", "2"])
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # The demo's CRF loss is the flood (weak unary): labels are refined with the paper's CRF instead.
    assert ck["model_args"]["img_size"] == 96 and ck["label_defaults"] == dict(
        train.DEMO_LABEL, crf_iters=100, crf_size=48, crf_zeta=0.5, crf_omega=2.0, crf_unary=0.3)
    assert not os.path.exists(tmp_path / "never")


def test_help_gives_the_defaults(capsys):
    """--help shows each flag's default; label.py's test-time flags say where theirs come from, not None."""
    for mod, expect in ((train, ["--epochs EPOCHS epochs; the learning-rate schedule spans all of them (default: 10)"]),
                        (label, ["--thr THR mask = probability > thr (default: the checkpoint's recipe, else 0.5)",
                                 "--batch-size BATCH_SIZE crops per forward (across images) (default: 32)"]),
                        (pretrain, ["(MAE: 0.75) (default: 0.75)"])):
        with pytest.raises(SystemExit):
            mod.get_args(["--help"])
        out = capsys.readouterr().out
        assert all(e in " ".join(out.split()) for e in expect) and "None" not in out, mod.__name__
    assert "views:\n  --images DIR alone " in out  # pretrain.py's epilog keeps its layout


def test_more_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    label_args = label.get_args(["--ckpt", "c", "--json", "j", "--images", "i", "--out", "o", "--device", "cuda"])
    for start in (lambda: train.init_distributed("cuda"), lambda: label.dist_setup(label_args)):
        with pytest.raises(SystemExit, match=r"^cuda:1 asked for, but this node has 1 CUDA device\(s\): "
                                             r".*--nproc_per_node 1"):
            start()


def test_train_torchrun_two_cpu_ranks(tiny_set, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(HERE, "train.py"), *tiny_argv(tiny_set, tmp_path, "--epochs", "1", "--batch-size", "2")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher identical on all 2 ranks" in res.stderr
    assert "on 2× cpu" in res.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] >= 1


# ==============================================================================================
# pretrain.py: MAE masking, loss, position embeddings, a few steps, exact resume, train.py --init,
# unreadable images, torchrun DDP on CPU

TINY_MAE = dict(arch="vit_tiny", patch_size=8, img_size=32, depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def pretrain_argv(out, *extra):
    return ["--out", str(out), "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "4", "--workers", "0",
            "--device", "cpu", "--log-every", "0", "--warmup-steps", "1", *extra]


def pretrain_boxes(tiny_set, out, *extra):
    return pretrain_argv(out, "--json", tiny_set["train_json"], "--images", tiny_set["train_images"],
                         "--min-area", "16", "--batch-size", "4", *extra)


def pretrain_folder(tiny_set, out, *extra):
    return pretrain_argv(out, "--images", tiny_set["train_images"], "--batch-size", "2", *extra)


def test_pretrain_masking_keeps_round_n_visible_and_is_reproducible():
    for n, ratio in ((16, 0.75), (144, 0.75), (49, 0.75), (10, 0.33)):
        k = round(n * (1 - ratio))
        ids, mask = pretrain.random_masking(5, n, ratio, torch.Generator().manual_seed(3))
        assert ids.shape == (5, k) and mask.shape == (5, n) and (~mask).sum(1).tolist() == [k] * 5
        for row in range(5):  # the kept ids are exactly the unmasked patches
            assert sorted(ids[row].tolist()) == torch.nonzero(~mask[row]).flatten().tolist()
        assert len({tuple(r) for r in mask.tolist()}) == 5  # a mask per view
        again = pretrain.random_masking(5, n, ratio, torch.Generator().manual_seed(3))
        assert torch.equal(again[0], ids) and torch.equal(again[1], mask)
        assert not torch.equal(pretrain.random_masking(5, n, ratio, torch.Generator().manual_seed(4))[1], mask)
    _, mask = pretrain.random_masking(4000, 16, 0.75, torch.Generator().manual_seed(0))
    assert ((~mask).float().mean(0) - 0.25).abs().max() < 0.035  # every patch equally likely (5 sigma)


def test_pretrain_patchify_order_matches_the_patch_embedding():
    net = pretrain.MaskedAutoencoder(**TINY_MAE)
    x = torch.zeros(1, 3, 32, 32)
    x[..., 8:16, 16:24] = torch.randn(3, 8, 8)  # the patch in row 1, column 2: token 1·4 + 2
    tokens = net.patch_embed(x).flatten(2).transpose(1, 2)[0]
    assert torch.nonzero((tokens != net.patch_embed.proj.bias).any(1)).flatten().tolist() == [6]
    patches = pretrain.patchify(x, 8)[0]
    assert torch.nonzero(patches.abs().sum(1)).flatten().tolist() == [6]
    assert torch.equal(patches[6], x[0, :, 8:16, 16:24].permute(1, 2, 0).flatten())  # rows, columns, channels
    y = torch.randn(2, 3, 16, 24)
    assert torch.equal(pretrain.unpatchify(pretrain.patchify(y, 8), 8, 2, 3), y)


def test_pretrain_loss_only_on_masked_patches():
    torch.manual_seed(0)
    net = pretrain.MaskedAutoencoder(**TINY_MAE)
    x = torch.randn(2, 3, 32, 32)
    ids, mask = pretrain.random_masking(2, 16, 0.75, torch.Generator().manual_seed(1))
    pred = net(x, ids).detach().requires_grad_()
    loss = pretrain.reconstruction_loss(pred, x, mask, 8)

    def patch(img, b, n):
        r, c = divmod(int(n), 4)
        return img[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8]

    # By hand: each masked patch normalised by its own mean and variance, the MSE averaged over them.
    errors = []
    for b, n in torch.nonzero(mask).tolist():
        t = patch(x, b, n).permute(1, 2, 0).flatten()
        t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
        errors.append(((pred[b, n] - t) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(errors).mean())
    # Perturbing the visible patches of the target leaves the loss unchanged, bit for bit.
    y = x.clone()
    for b in range(2):
        for n in ids[b]:
            patch(y, b, n).add_(3 * torch.randn(3, 8, 8))
    assert torch.equal(pretrain.reconstruction_loss(pred, y, mask, 8), loss)
    # Perturbing one masked patch changes it.
    n = torch.nonzero(mask[1]).flatten()[0]
    patch(y, 1, n).add_(torch.randn(3, 8, 8))
    assert pretrain.reconstruction_loss(pred, y, mask, 8) != loss
    # No gradient reaches the predictions of visible patches.
    loss.backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask].abs().sum(-1) > 0).all()
    # A perfect prediction of the normalised pixels un-normalises to the view itself (for --vis).
    target, _, _ = pretrain.patch_targets(x, 8)
    torch.testing.assert_close(pretrain.reconstruct_pixels(target, x, 8), x)
    # --no-norm-pix: the targets are the pixels themselves.
    raw = [((pred[b, n] - patch(x, b, n).permute(1, 2, 0).flatten()) ** 2).mean() for b, n in torch.nonzero(mask).tolist()]
    torch.testing.assert_close(pretrain.reconstruction_loss(pred, x, mask, 8, norm_pix=False), torch.stack(raw).mean())
    target, _, _ = pretrain.patch_targets(x, 8, norm_pix=False)
    torch.testing.assert_close(pretrain.reconstruct_pixels(target, x, 8, norm_pix=False), x)


def test_pretrain_pos_embed_is_mae_2d_sincos():
    def closed_form(dim, grid):  # channel ch of patch (r, c): the column in the first half, the row in the second
        out = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
        half, quarter = dim // 2, dim // 4
        for r in range(grid):
            for c in range(grid):
                for ch in range(dim):
                    pos, j = (c, ch) if ch < half else (r, ch - half)
                    angle = pos / 10000 ** ((j % quarter) / quarter)
                    out[1 + r * grid + c, ch] = math.sin(angle) if j < quarter else math.cos(angle)
        return out[None].float()

    for dim, grid in ((8, 3), (192, 4), (32, 4)):
        torch.testing.assert_close(mal.sincos_pos_embed(dim, grid), closed_form(dim, grid))
    net = pretrain.MaskedAutoencoder(**TINY_MAE)
    assert torch.equal(net.pos_embed, mal.sincos_pos_embed(192, 4)) and not net.pos_embed.requires_grad
    assert torch.equal(net.decoder_pos_embed, mal.sincos_pos_embed(32, 4))
    assert not net.decoder_pos_embed.requires_grad
    with pytest.raises(ValueError, match="divisible by 4"):
        mal.sincos_pos_embed(18, 2)


def test_pretrain_steps_lower_the_loss_and_write_mae_layout(tiny_set, tmp_path):
    pretrain.main(pretrain_boxes(tiny_set, tmp_path, "--epochs", "12", "--lr-per-image", "3e-4", "--vis", "3"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == log[-1]["step"] == log[-1]["total"] == 12 * (25 // 4)
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    encoder = mal.vit_tiny(depth=1, patch_size=8, img_size=32).state_dict()
    decoder = {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
               "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    decoder |= {f"decoder_blocks.0.{k}" for k in mal.Block(32, 4).state_dict()}
    assert set(ckpt["model"]) == set(encoder) | decoder
    assert ckpt["model"]["decoder_pred.weight"].shape == (8 * 8 * 3, 32)
    assert torch.equal(ckpt["model"]["pos_embed"], mal.sincos_pos_embed(192, 4))  # kept fixed
    assert torch.equal(ckpt["model"]["decoder_pos_embed"], mal.sincos_pos_embed(32, 4))
    pngs = sorted(os.listdir(tmp_path / "vis"))
    assert pngs == ["000.png", "001.png", "002.png"]
    assert Image.open(tmp_path / "vis" / pngs[0]).size == (3 * 32 + 2 * 2, 32)


@pytest.mark.parametrize("views", ["boxes", "folder"])
def test_pretrain_resume_is_exact(tiny_set, tmp_path, views):
    """2 steps + resume + 2 steps == 4 steps, bit for bit: weights, optimizer, masks, data order (the
    resume is mid-epoch, the 4th step in the next epoch)."""
    argv = dict(boxes=lambda out, *e: pretrain_boxes(tiny_set, out, "--accum", "2", *e),
                folder=lambda out, *e: pretrain_folder(tiny_set, out, *e))[views]
    common = ("--epochs", "3", "--seed", "7")
    pretrain.main(argv(tmp_path / "straight", *common, "--max-steps", "4"))
    pretrain.main(argv(tmp_path / "resumed", *common, "--max-steps", "2"))
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["step"] == 2
    pretrain.main(argv(tmp_path / "resumed", *common, "--max-steps", "4", "--resume"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
    assert torch.equal(a["rng"][0]["mask"], b["rng"][0]["mask"])
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")] for run in ("straight", "resumed")]
    assert losses[0] == losses[1]
    with pytest.raises(SystemExit, match=r"last.pt: batch_size was \d and is now 1"):
        pretrain.main(argv(tmp_path / "resumed", *common, "--batch-size", "1", "--resume"))


def test_pretrain_checkpoint_loads_into_train_init(tiny_set, tmp_path, capsys):
    pretrain.main(pretrain_boxes(tiny_set, tmp_path / "mae", "--epochs", "1", "--max-steps", "2"))
    ckpt = str(tmp_path / "mae" / "last.pt")
    net = mal.load_pretrained(mal.MAL("vit_tiny", patch_size=8, img_size=32, depth=1, decoder_dim=16), ckpt)
    n = len(net.encoder.state_dict())
    assert f"load_pretrained {ckpt}: loaded {n} tensors; missing none; unused none" in capsys.readouterr().err
    saved = torch.load(ckpt, weights_only=True)["model"]
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, saved[k]), k
    train.main(tiny_argv(tiny_set, tmp_path / "mal", "--init", ckpt, "--epochs", "1", "--max-steps", "1"))
    assert "missing none; unused none" in capsys.readouterr().err


def test_pretrain_skips_and_counts_unreadable_images(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b" / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a/1.JPG", "b/c/2.png", "3.Tiff", "4.bmp"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(imgs / name)
    (imgs / "broken.jpg").write_bytes(os.urandom(300))
    raw = (imgs / "b" / "c" / "2.png").read_bytes()
    (imgs / "b" / "trunc.png").write_bytes(raw[: len(raw) // 2])
    (imgs / "notes.txt").write_text("not an image")
    (imgs / "a" / "loop").symlink_to(imgs)  # followed once, not forever
    assert pretrain.find_images(imgs) == ["3.Tiff", "4.bmp", "a/1.JPG", "b/c/2.png", "b/trunc.png", "broken.jpg"]
    # 6 views a batch of 2, 3 steps an epoch, 3 epochs, workers recreated every epoch: each bad file named once.
    pretrain.main(pretrain_argv(tmp_path / "run", "--images", str(imgs), "--batch-size", "2", "--epochs", "3",
                                "--workers", "1"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "unreadable image" in line]
    assert len(lines) == 2 and any("broken.jpg" in x for x in lines) and any("trunc.png" in x for x in lines)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["step"] == 9 and log[-1]["unreadable"] == 6 and all(math.isfinite(r["loss"]) for r in log)
    # A run whose batches are all unreadable goes on (zero-weighted), counting them.
    (tmp_path / "bad").mkdir()
    for k in range(2):
        (tmp_path / "bad" / f"{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    pretrain.main(pretrain_argv(tmp_path / "bad_run", "--images", str(tmp_path / "bad"), "--batch-size", "2",
                                "--epochs", "1"))
    assert json.loads(open(tmp_path / "bad_run" / "log.jsonl").readline())["unreadable"] == 2
    # Box views of a missing image: the error names the file, no warning of its own.
    js = _write_coco(tmp_path / "boxes.json", [dict(id=1, file_name="gone.jpg", width=50, height=40)],
                     [_ann(1, 1, [5, 5, 30, 20])])
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = pretrain.BoxViews(js, imgs, 32, 0.0)[0]
    assert "gone.jpg" in sample["error"] and sample["image"].shape == (3, 32, 32)
    assert capsys.readouterr().err == ""


def test_pretrain_bad_flags_are_one_line_errors(tiny_set, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--images", str(tmp_path), "--views", "boxes"])
    assert "--views boxes needs --json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--images", str(tmp_path), "--mask-ratio", "0.99", "--img-size", "32", "--patch-size", "8"])
    assert "--mask-ratio 0.99 leaves 0 of 16 patches visible" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"nodir: no such image folder"):
        pretrain.main(pretrain_argv(tmp_path / "o", "--images", str(tmp_path / "nodir")))
    with pytest.raises(SystemExit, match=r"empty: no images \(.jpg"):
        (tmp_path / "empty").mkdir()
        pretrain.main(pretrain_argv(tmp_path / "o", "--images", str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match=r"nothing.pt: no checkpoint to resume from"):
        pretrain.main(pretrain_folder(tiny_set, tmp_path / "o", "--resume", str(tmp_path / "nothing.pt")))


def test_pretrain_torchrun_two_cpu_ranks(tiny_set, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29532",
           os.path.join(HERE, "pretrain.py"), *pretrain_folder(tiny_set, tmp_path, "--epochs", "2", "--batch-size", "1")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2× cpu" in res.stderr and "global batch 2" in res.stderr
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["world"] == 2
    assert not torch.equal(ckpt["rng"][0]["mask"], ckpt["rng"][1]["mask"])  # each rank masks its own views


# ==============================================================================================
# label.py: pasting, oracle labeling, COCO output, faults, resume, ranks, evaluation

TINY = dict(arch="vit_tiny", patch_size=8, img_size=32, depth=1)


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def _bbox(m):
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint and a small synthetic COCO set with a missing image, a corrupt image,
    a degenerate box, a box on an unknown image and a box sticking out of its image."""
    d = tmp_path_factory.mktemp("label")
    torch.manual_seed(0)
    net = mal.MAL(**TINY)
    sd = net.state_dict()
    torch.save(dict(model_args=TINY, task=sd, teacher=sd, step=0, epoch=0, args={}), d / "tiny.pt")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    images, anns, aid = [], [], 1
    for i in range(1, 8):  # 7 good images, 2 discs each, with GT masks
        H, W = 48, 64
        pix = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
        for cx, cy, r in [(20, 20, 10), (48 + i, 30, 12)]:
            m = _disc(H, W, cx, cy, r)
            pix[m] = (220, 30, 30)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(dict(id=aid, image_id=i, category_id=1 + aid % 2, bbox=_bbox(m), iscrowd=0,
                             area=int(m.sum()), segmentation=dict(size=[H, W], counts=rle["counts"].decode()),
                             extra="kept"))
            aid += 1
        Image.fromarray(pix).save(d / "img" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", width=W, height=H))
    anns[0]["bbox"] = [-5.0, -3.0, 30.0, 30.0]  # sticks out of the image: labeled, mask clipped
    (d / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    images += [dict(id=20, file_name="missing.png", width=64, height=48),
               dict(id=21, file_name="corrupt.png", width=64, height=48)]
    anns += [dict(id=100, image_id=20, category_id=1, bbox=[1, 1, 10, 10], iscrowd=0, area=100),
             dict(id=101, image_id=21, category_id=1, bbox=[1, 1, 10, 10], iscrowd=0, area=100),
             dict(id=102, image_id=1, category_id=1, bbox=[5, 5, 0, 10], iscrowd=0, area=0),
             dict(id=103, image_id=99, category_id=1, bbox=[5, 5, 10, 10], iscrowd=0, area=100)]
    coco = dict(images=images, annotations=anns, categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                info={"note": "test"})
    (d / "boxes.json").write_text(json.dumps(coco))
    return d


def _argv(w, out, *extra):
    # On the CPU on any machine: these compare bytes across runs and ranks (two gloo ranks on one GPU
    # are refused) and check the fingerprint's device.
    return ["--ckpt", str(w / "tiny.pt"), "--json", str(w / "boxes.json"), "--images", str(w / "img"),
            "--out", str(out), "--chunk-images", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--quiet", *extra]


def _run(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=HERE, env=e, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------


def paste_mask(prob, crop_box, H, W, thr=0.5, box=None):
    """label.paste_region's mask, in its whole [H, W] image."""
    out = np.zeros((H, W), bool)
    ya, xa, region = label.paste_region(prob, crop_box, H, W, thr, box)
    out[ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
    return out


def test_paste_region_inverts_data_crop_mapping():
    """Every image pixel samples the crop at data.image_to_crop of its centre (bilinear, clamped)."""
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(12, 9, generator=g)
    crop = (3.3, 5.7, 30.1, 41.9)
    H, W = 50, 40
    got = paste_mask(prob, crop, H, W, thr=0.5)
    p = prob.double().numpy()
    ref, near = np.zeros((H, W), bool), np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            if not (crop[0] <= x + 0.5 < crop[2] and crop[1] <= y + 0.5 < crop[3]):
                continue
            u = data.image_to_crop(x + 0.5, crop, 9)  # the x mapping...
            v = data.image_to_crop(y + 0.5, (crop[1], 0, crop[3], 0), 12)  # ...and the same for y
            u, v = min(max(u, 0), 8), min(max(v, 0), 11)
            u0, v0 = min(int(u), 7), min(int(v), 10)
            fu, fv = u - u0, v - v0
            val = ((1 - fv) * ((1 - fu) * p[v0, u0] + fu * p[v0, u0 + 1])
                   + fv * ((1 - fu) * p[v0 + 1, u0] + fu * p[v0 + 1, u0 + 1]))
            ref[y, x], near[y, x] = val > 0.5, abs(val - 0.5) < 1e-5
    assert ref.any() and (~ref).any()
    assert np.array_equal(got & ~near, ref & ~near)
    # A box restricts the mask to its pixel centres; an identity crop pastes pixel for pixel.
    assert not paste_mask(torch.ones(4, 4), crop, H, W, 0.5, box=(10, 10, 20, 20))[:, :10].any()
    one = torch.zeros(6, 8)
    one[2:4, 1:7] = 1
    m = paste_mask(one, (10, 20, 18, 26), 30, 30, 0.5)
    assert np.array_equal(np.argwhere(m), np.argwhere(np.pad(one.numpy() > 0.5, ((20, 4), (10, 12)))))


def test_encode_region_matches_encoding_the_whole_image():
    """encode_region (what labeling runs) gives encode's RLE of the whole-image mask, on
    random regions of random images, a region that starts at pixel 0 or ends at the last pixel, the
    whole image, an empty one, and the regions paste_region gives for random crops and boxes."""
    rng = np.random.default_rng(0)
    cases = [(5, 7, 0, 0, np.ones((5, 7), bool)), (5, 7, 2, 3, np.ones((3, 4), bool)),
             (5, 7, 0, 0, np.zeros((0, 0), bool)), (5, 7, 1, 1, np.zeros((2, 2), bool))]
    for k in range(400):
        H, W = (int(v) for v in rng.integers(1, 30, 2))
        ya, xa = int(rng.integers(0, H)), int(rng.integers(0, W))
        h, w = int(rng.integers(0, H - ya + 1)), int(rng.integers(0, W - xa + 1))
        cases.append((H, W, ya, xa, rng.random((h, w)) < (0.05, 0.5, 0.95)[k % 3]))
    for H, W, ya, xa, region in cases:
        full = np.zeros((H, W), bool)
        full[ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
        assert label.encode_region(ya, xa, region, H, W) == label.encode(full), (H, W, ya, xa, region)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x0, y0 = (float(v) for v in torch.rand(2, generator=g) * 40 - 10)
        crop = (x0, y0, x0 + 5 + 40 * float(torch.rand(1, generator=g)), y0 + 5 + 30 * float(torch.rand(1, generator=g)))
        box = (crop[0] + 2, crop[1] + 1, crop[2] - 1, crop[3] - 2)
        prob = torch.rand(6, 7, generator=g)
        full = paste_mask(prob, crop, 30, 40, 0.5, box)
        ya, xa, region = label.paste_region(prob, crop, 30, 40, 0.5, box)
        assert label.encode_region(ya, xa, region, 30, 40) == label.encode(full) and region.sum() == full.sum()


class Oracle(torch.nn.Module):
    """Stands in for MAL: logits from the crop's colour (the object is pure red), at half resolution."""

    img_size = 64

    def forward(self, x):
        mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
        rgb = x * std + mean
        red = ((rgb[:, 0] > 150) & (rgb[:, 1] < 100)).float()
        return torch.nn.functional.avg_pool2d(red[:, None], 2)[:, 0] * 20 - 10


@pytest.mark.parametrize("flip,crf", [(False, 0), (True, 0), (False, 5)])
def test_oracle_masks_land_where_the_objects_are(tmp_path, flip, crf):
    H, W = 80, 96
    objs = [_disc(H, W, 30, 40, 15), _disc(H, W, 88, 12, 14)]  # the second runs off the image
    pix = np.full((H, W, 3), 128, np.uint8)
    for m in objs:
        pix[m] = (255, 0, 0)
    Image.fromarray(pix).save(tmp_path / "a.png")
    images = [dict(id=7, file_name="a.png", width=W, height=H)]
    todo = {7: [dict(id=k + 1, bbox=_bbox(m)) for k, m in enumerate(objs)]}
    res = label.label_dataset(Oracle(), images, todo, str(tmp_path), "cpu", flip=flip, crf_iters=crf,
                              crf_size=32, batch_size=1)
    for k, m in enumerate(objs):
        got = mask_utils.decode(label._to_bytes(res[k + 1]["segmentation"])).astype(bool)
        assert got.shape == (H, W) and res[k + 1]["area"] == got.sum()
        iou = (got & m).sum() / (got | m).sum()
        assert iou > 0.93, iou
        assert np.abs(np.argwhere(got).mean(0) - np.argwhere(m).mean(0)).max() < 0.5


def test_mask_score_of_hand_made_masks():
    """1 for a sure mask that fills every row and column of its box and nothing outside it; less for one
    that spills over the box, misses half the object, or hesitates."""
    box = torch.zeros(1, 20, 20)
    box[:, 4:16, 4:16] = 1
    spill = torch.zeros(1, 20, 20)
    spill[:, 2:18, 2:18] = 1
    half = box.clone()
    half[..., 10:] = 0
    s = label.mask_score(torch.cat([box, spill, half, 0.8 * box]), box.expand(4, -1, -1)).tolist()
    # Rows and columns are 20 bags each: spill gets 4 of each wrong, half 6 columns, and the unsure
    # mask's 12 crossing rows and columns score 0.8 each, with a confidence |2·0.8 − 1| = 0.6 in the box.
    assert s == pytest.approx([1, 1 - 4 / 20, 1 - 6 / 20 / 2, (1 - 0.2 * 12 / 20) * 0.6])
    assert s[0] > s[2] > s[1] > s[3]


class Spill(Oracle):
    """The object grown by 8 crop pixels each way: the network's mask runs over the box."""

    def forward(self, x):
        return F.max_pool2d(super().forward(x)[:, None], 9, 1, 4)[:, 0]


class Half(Oracle):
    """The left half of the object only."""

    def forward(self, x):
        y = super().forward(x)
        y[..., y.shape[-1] // 2:] = -10
        return y


def test_mask_score_is_deterministic(world):
    """The same scores on a rerun and with other batch sizes (batches differ across ranks and resumes)."""
    net = label.load_nets(str(world / "tiny.pt"))[0]
    src = json.loads((world / "boxes.json").read_text())
    images = [im for im in src["images"] if im["id"] <= 7]
    todo = {im["id"]: [a for a in src["annotations"] if a["image_id"] == im["id"] and a["id"] < 100] for im in images}
    runs = [label.label_dataset(net, images, todo, str(world / "img"), "cpu", batch_size=b, crf_iters=3, crf_size=16)
            for b in (4, 4, 1, 32)]
    scores = [{a: r["mask_score"] for a, r in res.items()} for res in runs]
    assert len(scores[0]) == 14 and all(s == scores[0] for s in scores)
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in scores[0].values())


@pytest.mark.parametrize("crf", [0, 5])
def test_mask_score_ranks_oracle_masks_by_iou(tmp_path, crf):
    H, W = 80, 96
    obj = _disc(H, W, 40, 40, 20)
    pix = np.full((H, W, 3), 128, np.uint8)
    pix[obj] = (255, 0, 0)
    Image.fromarray(pix).save(tmp_path / "a.png")
    images = [dict(id=7, file_name="a.png", width=W, height=H)]
    todo = {7: [dict(id=1, bbox=_bbox(obj))]}
    got = {}
    for net in (Oracle(), Spill(), Half()):
        r = label.label_dataset(net, images, todo, str(tmp_path), "cpu", crf_iters=crf, crf_size=32)[1]
        m = mask_utils.decode(label._to_bytes(r["segmentation"])).astype(bool)
        got[type(net).__name__] = (r["mask_score"], (m & obj).sum() / (m | obj).sum())
    (s_perfect, iou_perfect), (s_spill, iou_spill), (s_half, iou_half) = got["Oracle"], got["Spill"], got["Half"]
    assert iou_perfect > 0.95 and 0.7 < iou_spill < 0.85 and 0.4 < iou_half < 0.6  # the cases are what they say
    assert 1 >= s_perfect > s_spill > s_half >= 0


def test_cli_writes_valid_coco_and_reports_every_unlabeled_box(world, tmp_path):
    out = tmp_path / "labels.json"
    label.main(_argv(world, out, "--eval", "--vis", "2"))
    src = json.loads((world / "boxes.json").read_text())
    res = json.loads(out.read_text())
    assert [a["id"] for a in res["annotations"]] == [a["id"] for a in src["annotations"]]
    assert res["images"] == src["images"] and res["categories"] == src["categories"] and res["info"] == src["info"]
    coco = COCO(str(out))  # loads as an instances JSON
    unlabeled = {100, 101, 102, 103}
    ims = {im["id"]: im for im in src["images"]}
    for a, s in zip(res["annotations"], src["annotations"]):
        assert {k: a[k] for k in ("image_id", "bbox", "category_id", "iscrowd")} == \
               {k: s[k] for k in ("image_id", "bbox", "category_id", "iscrowd")}
        if a["id"] in unlabeled:
            assert "segmentation" not in a
            continue
        assert a["extra"] == "kept" and isinstance(a["segmentation"]["counts"], str)
        m = coco.annToMask(a).astype(bool)
        assert m.shape == (ims[a["image_id"]]["height"], ims[a["image_id"]]["width"]) and a["area"] == m.sum()
        x, y, w, h = a["bbox"]
        inside = label.box_mask((x, y, x + w, y + h), *m.shape)
        assert not (m & ~inside).any()  # the mask lies in the box, clipped to the image
    rep = json.loads((tmp_path / "labels.report.json").read_text())
    reasons = {u["id"]: u["reason"] for u in rep["unlabeled"]}
    assert set(reasons) == unlabeled and rep["summary"]["unlabeled"] == 4 and rep["summary"]["labeled"] == 14
    assert "not found" in reasons[100] and "missing.png" in reasons[100]
    assert "corrupt.png" in reasons[101] and "degenerate" in reasons[102] and "not in images" in reasons[103]
    ev = json.loads((tmp_path / "labels.eval.json").read_text())
    assert 0 <= ev["miou"] <= 1 and ev["box_miou"] > 0.5 and ev["n"] == 14
    assert len(os.listdir(tmp_path / "labels.vis")) == 2
    assert not (tmp_path / "labels.json.parts").exists()  # cleaned up after the merge


def test_cli_scores_every_mask_and_writes_the_review(world, tmp_path, capsys):
    out = tmp_path / "labels.json"
    label.main(_argv(world, out, "--eval", "--review", "3"))
    res = json.loads(out.read_text())
    labeled = [a for a in res["annotations"] if "segmentation" in a]
    assert len(labeled) == 14 and all(0 <= a["mask_score"] <= 1 for a in labeled)
    assert not any("mask_score" in a for a in res["annotations"] if "segmentation" not in a)
    review = json.loads((tmp_path / "labels.review.json").read_text())
    assert sorted(r["id"] for r in review) == sorted(a["id"] for a in labeled)  # complete, once each
    assert review == sorted(review, key=lambda r: (r["mask_score"], r["id"]))  # lowest first
    assert {r["id"]: (r["image_id"], r["mask_score"]) for r in review} == {
        a["id"]: (a["image_id"], a["mask_score"]) for a in labeled}
    pngs = sorted(os.listdir(tmp_path / "labels.review"))
    assert pngs == [f"{k + 1}_score{r['mask_score']:.4f}_ann{r['id']}.png" for k, r in enumerate(review[:3])]
    ev = json.loads((tmp_path / "labels.eval.json").read_text())
    assert ev["score_n"] == 14 and -1 <= ev["score_spearman"] <= 1
    assert ev["score_n_bad"] == 0 or 0 <= ev["score_bad_in_low10"] <= ev["score_bad_in_low20"] <= 1
    assert "mask_score vs IoU over 14 masks: Spearman" in capsys.readouterr().out
    # A rerun replaces the review overlays instead of mixing two runs' files; other files stay.
    (tmp_path / "labels.review" / "notes.txt").write_text("checked 1-3")
    label.main(_argv(world, out, "--review", "2"))
    assert sorted(os.listdir(tmp_path / "labels.review")) == [*pngs[:2], "notes.txt"]


def test_resume_after_kill_is_byte_identical_and_refuses_other_configs(world, tmp_path):
    ref, out = tmp_path / "ref.json", tmp_path / "out.json"
    r = _run(["label.py", *_argv(world, ref)])
    assert r.returncode == 0, r.stderr
    r = _run(["label.py", *_argv(world, out)], env={"MAL_LABEL_STOP_AFTER": "2"})  # dies like kill -9
    assert r.returncode == 75 and not out.exists()
    chunks = sorted(f for f in os.listdir(f"{out}.parts") if f.startswith("chunk"))
    assert len(chunks) == 2
    results = json.loads(open(f"{out}.parts/{chunks[0]}").read())["results"]
    assert all("mask_score" in r for r in results.values() if "segmentation" in r)  # resumed with its score
    with pytest.raises(SystemExit, match="another configuration.*thr.*--fresh"):
        label.main(_argv(world, out, "--thr", "0.3"))
    label.main(_argv(world, out, "--batch-size", "3"))  # resumes (batching is not part of the config)
    assert out.read_bytes() == ref.read_bytes()
    label.main(_argv(world, out, "--keep-parts", "--fresh"))
    assert out.read_bytes() == ref.read_bytes() and os.path.exists(f"{out}.parts/fingerprint.json")
    # Parts made on another device (cuda bf16 vs cpu float32) are not mixed in either.
    fp = json.loads(open(f"{out}.parts/fingerprint.json").read())
    assert fp["device"] == "cpu"
    # Nor parts whose masks were scored otherwise, or not at all.
    open(f"{out}.parts/fingerprint.json", "w").write(json.dumps({k: v for k, v in fp.items() if k != "mask_score"}))
    with pytest.raises(SystemExit, match="another configuration.*mask_score"):
        label.main(_argv(world, out))
    open(f"{out}.parts/fingerprint.json", "w").write(json.dumps(dict(fp, device="cuda")))
    with pytest.raises(SystemExit, match="another configuration.*device"):
        label.main(_argv(world, out))


def test_two_gloo_ranks_equal_one_process(world, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = _run(["label.py", *_argv(world, one)])
    assert r.returncode == 0, r.stderr
    argv = [a for a in _argv(world, two) if a != "--quiet"]
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "label.py", *argv])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "label[rank 0]" in r.stderr and "label[rank 1]" in r.stderr  # both ranks did work
    assert two.read_bytes() == one.read_bytes()


def test_missing_inputs_and_bad_checkpoint_are_one_line_errors(world, tmp_path):
    for flag, bad in (("--ckpt", tmp_path / "nope.pt"), ("--json", tmp_path / "nope.json"),
                      ("--images", tmp_path / "nodir")):
        argv = _argv(world, tmp_path / "x.json")
        argv[argv.index(flag) + 1] = str(bad)
        with pytest.raises(SystemExit, match=f"label.py: {flag} .*{bad.name} not found"):
            label.main(argv)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = _argv(world, tmp_path / "x.json")
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "junk.pt")
    with pytest.raises(SystemExit, match="junk.pt: cannot load checkpoint"):
        label.main(argv)
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "nope.pt")  # from the shell: that line, no traceback
    r = _run(["label.py", *argv])
    assert r.returncode == 1 and r.stderr.strip() == f"label.py: --ckpt {tmp_path / 'nope.pt'} not found"


def test_non_integer_ids_are_rejected_by_name(tmp_path):
    base = dict(images=[dict(id=1, file_name="a.png")], categories=[{"id": 1}],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5])])
    for where, key, value, msg in (("annotations", "id", "a7", "annotation #1 has a non-integer id 'a7'"),
                                   ("annotations", "image_id", True, "annotation #1 has a non-integer image_id True"),
                                   ("images", "id", "1", "image #0 has a non-integer id '1'")):
        coco = json.loads(json.dumps(base))
        if where == "annotations":
            coco["annotations"].append(dict(coco["annotations"][0], id=2))
        coco[where][-1][key] = value
        (tmp_path / "b.json").write_text(json.dumps(coco))
        with pytest.raises(SystemExit, match=msg):
            label.load_boxes(str(tmp_path / "b.json"))


def test_failed_image_without_size_is_reported_and_the_run_goes_on(world, tmp_path):
    src = json.loads((world / "boxes.json").read_text())
    src["images"] = [im for im in src["images"] if im["id"] in (1, 20)]
    del src["images"][1]["width"], src["images"][1]["height"]  # missing.png, no size in the JSON
    src["annotations"] = [a for a in src["annotations"] if a["image_id"] in (1, 20)]
    (tmp_path / "b.json").write_text(json.dumps(src))
    argv = _argv(world, tmp_path / "out.json")
    argv[argv.index("--json") + 1] = str(tmp_path / "b.json")
    label.main(argv)
    rep = json.loads((tmp_path / "out.report.json").read_text())
    reasons = {u["id"]: u["reason"] for u in rep["unlabeled"]}
    assert "missing.png" in reasons[100] and "not found" in reasons[100]
    assert rep["summary"]["labeled"] == 2 and set(reasons) == {100, 102}


def test_test_time_settings_come_from_the_checkpoint_unless_given(world, tmp_path, capsys):
    ck = torch.load(world / "tiny.pt", weights_only=True)
    recipe = dict(net="teacher", thr=0.3, expand=0.1, flip=True, crf_refine=True, crf_iters=3, crf_size=16,
                  crf_zeta=0.4, crf_omega=1.5, crf_unary=0.5)
    torch.save(dict(ck, label_defaults=recipe), tmp_path / "r.pt")
    argv = lambda out, *x: [*_argv(world, out, "--keep-parts"), "--ckpt", str(tmp_path / "r.pt"), *x]  # noqa: E731
    label.main(argv(tmp_path / "a.json"))
    cfg = json.loads((tmp_path / "a.json.parts" / "fingerprint.json").read_text())
    assert {k: cfg[k] for k in recipe} == recipe
    assert "from the checkpoint's recipe\n" in capsys.readouterr().err
    label.main(argv(tmp_path / "b.json", "--thr", "0.6", "--no-crf-refine"))
    cfg = json.loads((tmp_path / "b.json.parts" / "fingerprint.json").read_text())
    assert (cfg["thr"], cfg["crf_refine"], cfg["crf_iters"], cfg["net"], cfg["flip"]) == (0.6, False, 0, "teacher", True)
    assert "except --thr, --crf-refine" in capsys.readouterr().err
    label.main(_argv(world, tmp_path / "c.json", "--keep-parts"))  # no recipe in the file: TEST_TIME
    cfg = json.loads((tmp_path / "c.json.parts" / "fingerprint.json").read_text())
    assert {k: cfg[k] for k in ("net", "thr", "expand", "flip", "crf_refine")} == {
        k: label.TEST_TIME[k] for k in ("net", "thr", "expand", "flip", "crf_refine")}


def test_unlabeled_boxes_can_get_their_filled_box():
    out = dict(images=[dict(id=1, width=10, height=8), dict(id=2, file_name="nosize.png")], categories=[])
    anns = [dict(id=1, image_id=1, bbox=[2, 1, 4, 3], segmentation=[[0, 0, 1, 1]], mask_score=0.9),
            dict(id=2, image_id=2, bbox=[0, 0, 2, 2]), dict(id=3, image_id=1, bbox=[2, 1, 0, 3]),
            dict(id=4, image_id=1, bbox=[20, 1, 4, 3]), dict(id=5, image_id=1, bbox=[float("inf"), 1, 4, 3])]
    results = {1: {"reason": "missing image"}, 2: {"reason": "missing image"}, 3: {"reason": "zero width"},
               4: {"reason": "outside"}, 5: {"reason": "non-finite"}}
    plain = label.apply_labels(out, anns, results)["annotations"]
    assert "segmentation" not in plain[0] and plain[0]["area"] == 12.0  # the GT polygon is never passed on
    assert "mask_score" not in plain[0]  # nor an earlier labeling's score
    boxed = label.apply_labels(out, anns, results, unlabeled_as="box")["annotations"]
    assert "mask_score" not in boxed[0]  # a filled box is no scored mask
    m = mask_utils.decode({"size": boxed[0]["segmentation"]["size"],
                           "counts": boxed[0]["segmentation"]["counts"].encode()})
    assert m.shape == (8, 10) and m.sum() == 12 and m[1:4, 2:6].all() and boxed[0]["area"] == 12.0
    assert "segmentation" not in boxed[1]  # no image size: no mask can be drawn
    for a in boxed[2:]:  # a box that covers no pixel: an empty mask of the image's size, still a mask on every box
        m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        assert m.shape == (8, 10) and m.sum() == 0 and a["area"] == 0


def test_counts_agree_strict_fails_and_unlabeled_masks_are_reported(world, tmp_path, capsys):
    """The progress total is the summary's labelable count; --strict exits 3 when a box is unlabeled; the
    unlabeled count ends the output; --unlabeled-as box says in the report which mask each unlabeled box got."""
    out = tmp_path / "s.json"
    argv = [a for a in _argv(world, out, "--unlabeled-as", "box", "--strict") if a != "--quiet"]
    with pytest.raises(SystemExit) as e:
        label.main(argv)
    assert e.value.code == 3
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if x.startswith("label: ")][-1].startswith("label: images 9/9 boxes 16/16 (14 labeled) ")
    assert err[-1].startswith(f"label.py: wrote {out}: 18 boxes (16 labelable): 14 labeled (0 empty masks), "
                              f"4 unlabeled (masks: 2 filled box, 1 empty, 1 none: image size unknown), reasons in ")
    assert err[-1].endswith("; --strict: exit status 3")
    rep = json.loads((tmp_path / "s.report.json").read_text())
    assert {k: rep["summary"][k] for k in ("boxes", "labelable", "labeled", "unlabeled")} == dict(
        boxes=18, labelable=16, labeled=14, unlabeled=4)
    masks = {u["id"]: u["mask"] for u in rep["unlabeled"]}
    assert masks == {100: "filled box", 101: "filled box", 102: "empty", 103: "none: image size unknown"}
    res = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert res[102]["area"] == 0 and res[102]["segmentation"]["size"] == [48, 64] and "segmentation" not in res[103]
    label.main(argv[:-1])  # the same without --strict: exit status 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"label.py: wrote {out}: 18 boxes (16 labelable)") and "exit status" not in last


def _rle(m):
    return label.encode(m)


def test_evaluate_matches_hand_computation():
    H, W = 100, 100
    g1, g2 = np.zeros((H, W), bool), np.zeros((H, W), bool)
    g1[10:30, 10:30] = True  # 400 px: small
    g2[50:90, 40:80] = True  # 1600 px: medium
    gt = dict(images=[dict(id=1, width=W, height=H)], categories=[{"id": 1}, {"id": 2}], annotations=[
        dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 20, 20], iscrowd=0, area=400, segmentation=_rle(g1)),
        dict(id=2, image_id=1, category_id=2, bbox=[40, 50, 40, 40], iscrowd=0, area=1600, segmentation=_rle(g2))])
    r = label.evaluate(gt, gt)  # perfect pseudo-labels
    assert r["miou"] == 1 and r["ap"] == pytest.approx(1.0) and r["box_miou"] == 1 and r["box_ap"] == pytest.approx(1.0)
    half = g2.copy()
    half[:, 60:] = False  # IoU 0.5 exactly
    pred = json.loads(json.dumps(gt))
    pred["annotations"][1]["segmentation"] = _rle(half)
    r = label.evaluate(gt, pred)
    assert r["miou"] == pytest.approx(0.75) and r["miou_small"] == 1 and r["miou_medium"] == pytest.approx(0.5)
    assert r["miou_large"] is None and (r["n_small"], r["n_medium"], r["n_large"]) == (1, 1, 0)
    # Category 1 is right at every IoU threshold, category 2 only at 0.5: AP = (1 + 1/10) / 2.
    assert r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(0.5) and r["ap"] == pytest.approx(0.55)
    del pred["annotations"][1]["segmentation"]  # an unlabeled box counts IoU 0
    assert label.evaluate(gt, pred)["miou"] == pytest.approx(0.5)


def test_ellipse_baseline_is_the_inscribed_ellipse():
    e = label.ellipse_mask((10, 20, 50, 40), 60, 70)  # centre (30, 30), semi-axes 20 and 10
    ys, xs = np.mgrid[0:60, 0:70]
    inside = ((xs + 0.5 - 30) / 20) ** 2 + ((ys + 0.5 - 30) / 10) ** 2 <= 1
    assert e.dtype == bool and (e == inside).all() and abs(e.sum() - math.pi * 200) < 10
    assert not label.ellipse_mask((5, 5, 5, 9), 10, 10).any()  # a zero-width box
    gt = dict(images=[dict(id=1, width=70, height=60)], categories=[{"id": 1}], annotations=[
        dict(id=1, image_id=1, category_id=1, bbox=[10, 20, 40, 20], iscrowd=0, segmentation=_rle(e))])
    r = label.evaluate(gt, gt)
    assert r["ellipse_miou"] == 1 and r["ellipse_ap"] == pytest.approx(1.0)
    assert r["box_miou"] == pytest.approx(e.sum() / 800)
    assert "ellipse" in label.format_eval(r)


def test_spearman_and_score_ranking_by_hand():
    assert label.ranks([3, 1, 3, 3, 2]).tolist() == [4, 1, 4, 4, 2]  # the three 3s share ranks 3, 4, 5
    # Ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: deviations (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5);
    # Σ products 4.5, Σ squares 4.5 and 5: ρ = 4.5 / sqrt(22.5) = 3 / sqrt(10).
    assert label.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10))
    assert label.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert label.spearman([1, 1, 1], [1, 2, 3]) is None and label.spearman([1], [1]) is None
    # Ten masks, three bad (IoU < 0.5): the lowest-scored one (10%) is bad, the next one is not, and
    # the third bad mask has the highest score: 1/3 in the lowest 10%, 1/3 in the lowest 20%.
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    ious = [0.2, 0.9, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.3]
    r = label.score_ranking(scores, ious)
    assert (r["score_n"], r["score_n_bad"]) == (10, 3)
    assert r["score_bad_in_low10"] == pytest.approx(1 / 3) and r["score_bad_in_low20"] == pytest.approx(1 / 3)
    assert r["score_spearman"] == pytest.approx(label.spearman(scores, ious))
    assert label.score_ranking([0.5, 0.6], [0.9, 0.8])["score_bad_in_low10"] is None  # no bad mask


def test_results_list_with_score_threshold(world, tmp_path):
    dets = [dict(image_id=1, bbox=[10, 10, 20, 20], score=0.9, category_id=1),
            dict(image_id=2, bbox=[5, 5, 20, 20], score=0.2, category_id=2),
            dict(image_id=3, bbox=[30, 15, 25, 25], score=0.6, category_id=1),
            dict(image_id=3, bbox=[0, 0, 10, 10], score=0.05, category_id=1)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "lab.json"
    argv = _argv(world, out, "--images-json", str(world / "boxes.json"), "--score-thr", "0.5", "--eval")
    argv[argv.index("--json") + 1] = str(tmp_path / "dets.json")
    label.main(argv)
    res = json.loads(out.read_text())
    assert [(a["id"], a["score"]) for a in res["annotations"]] == [(1, 0.9), (3, 0.6)]
    assert all("segmentation" in a for a in res["annotations"]) and res["categories"][0]["name"] == "a"
    COCO(str(out))
    rep = json.loads((tmp_path / "lab.report.json").read_text())
    assert rep["summary"]["filtered_by_score"] == 2 and rep["summary"]["labeled"] == 2
    ev = json.loads((tmp_path / "lab.eval.json").read_text())
    assert "ap" in ev and "miou" not in ev  # detections have no GT ids: AP only
    argv = _argv(world, tmp_path / "x.json")
    argv[argv.index("--json") + 1] = str(tmp_path / "dets.json")
    with pytest.raises(SystemExit, match="results list.*--images-json"):
        label.main(argv)
