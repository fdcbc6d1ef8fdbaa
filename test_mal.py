"""Tests for MAL: `pytest test_mal.py`. Sections follow the files: mal.py, crf_ext/, data.py, train.py, label.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import mal

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


def mean_field_float64(image, prob, box_mask, iters, zeta=0.5, omega=2.0):
    """An independent, loop-based float64 mean field (Eq. 3-4) to check implementations against."""
    image, prob = image.double(), prob.double()
    B, C, H, W = image.shape
    p = prob.clamp(1e-6, 1 - 1e-6)
    u = torch.log(p) - torch.log(1 - p)
    inside = torch.ones_like(p) if box_mask is None else (box_mask != 0).double()
    k = torch.zeros(B, H, W, 3, 3, dtype=torch.float64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            for i in range(H):
                for j in range(W):
                    if 0 <= i + dy < H and 0 <= j + dx < W:
                        d = ((image[:, :, i, j] - image[:, :, i + dy, j + dx]) ** 2).sum(1)
                        k[:, i, j, dy + 1, dx + 1] = torch.exp(-d / (2 * zeta ** 2))
    q = p * inside
    for _ in range(iters):
        s = F.pad(2 * q - 1, (1, 1, 1, 1))
        msg = torch.zeros_like(q)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                msg += k[..., dy + 1, dx + 1] * s[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
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
    want = mean_field_float64(image, prob, box, iters)
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
