"""pretrain.py: MAE masking, loss, position embeddings, a few steps, exact resume, train.py --init,
torchrun."""
import json
import math
import os
import shlex
import signal
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mal
import pretrain
import train
from conftest import HERE, ann, interrupt, run_py, tiny_argv, write_coco

TINY_MAE = dict(arch="vit_tiny", patch_size=8, img_size=32, depth=1, decoder_dim=32, decoder_depth=1,
                decoder_heads=4)


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
        assert not torch.equal(pretrain.random_masking(5, n, ratio, torch.Generator().manual_seed(4))[1],
                               mask)
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
    raw = [((pred[b, n] - patch(x, b, n).permute(1, 2, 0).flatten()) ** 2).mean()
           for b, n in torch.nonzero(mask).tolist()]
    torch.testing.assert_close(pretrain.reconstruction_loss(pred, x, mask, 8, norm_pix=False),
                               torch.stack(raw).mean())
    target, _, _ = pretrain.patch_targets(x, 8, norm_pix=False)
    torch.testing.assert_close(pretrain.reconstruct_pixels(target, x, 8, norm_pix=False), x)


def test_pretrain_pos_embed_is_mae_2d_sincos():
    def closed_form(dim, grid):  # channel ch of patch (r, c): the column in the first half, the row in
                                 # the second
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
    pretrain.main(pretrain_boxes(tiny_set, tmp_path, "--epochs", "12", "--lr-per-image", "3e-4",
                                 "--vis", "3"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == log[-1]["step"] == log[-1]["total"] == 12 * (25 // 4)
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    encoder = mal.vit_tiny(depth=1, patch_size=8, img_size=32).state_dict()
    decoder = {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
               "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
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
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]
              for run in ("straight", "resumed")]
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
    assert pretrain.find_images(imgs) == ["3.Tiff", "4.bmp", "a/1.JPG", "b/c/2.png", "b/trunc.png",
                                          "broken.jpg"]
    # 6 views a batch of 2, 3 steps an epoch, 3 epochs, workers recreated every epoch: each bad file
    # named once.
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
    js = write_coco(tmp_path / "boxes.json", [dict(id=1, file_name="gone.jpg", width=50, height=40)],
                     [ann(1, 1, [5, 5, 30, 20])])
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = pretrain.BoxViews(js, imgs, 32, 0.0)[0]
    assert "gone.jpg" in sample["error"] and sample["image"].shape == (3, 32, 32)
    assert capsys.readouterr().err == ""


def test_pretrain_image_views_of_a_json_read_its_names_from_the_box_index(tiny_set, tmp_path, monkeypatch):
    """--json --views images: the JSON's listed images, in its order, named from its box index (the JSON is
    never read whole) and the same views as those images listed by hand."""
    whole = lambda *a, **k: pytest.fail("the JSON was read whole")  # noqa: E731
    monkeypatch.setattr(json, "load", whole)
    args = pretrain.get_args(pretrain_argv(tmp_path / "run", "--json", tiny_set["train_json"], "--images",
                                           tiny_set["train_images"], "--views", "images"))
    views = pretrain.make_views(args)
    monkeypatch.undo()
    listed = [im["file_name"] for im in json.load(open(tiny_set["train_json"]))["images"]]
    assert list(views.files) == listed and len(views) == len(listed) == 6
    by_hand = pretrain.ImageViews(tiny_set["train_images"], listed, 32)
    for i in (0, 5):
        assert torch.equal(views[i]["image"], by_hand[i]["image"]) and views[i]["error"] is None


def test_pretrain_bad_flags_are_one_line_errors(tiny_set, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--images", str(tmp_path), "--views", "boxes"])
    assert "--views boxes needs --json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--images", str(tmp_path), "--mask-ratio", "0.99", "--img-size", "32",
                       "--patch-size", "8"])
    assert "--mask-ratio 0.99 leaves 0 of 16 patches visible" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"nodir: no such image folder"):
        pretrain.main(pretrain_argv(tmp_path / "o", "--images", str(tmp_path / "nodir")))
    with pytest.raises(SystemExit, match=r"empty: no images \(.jpg"):
        (tmp_path / "empty").mkdir()
        pretrain.main(pretrain_argv(tmp_path / "o", "--images", str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match=r"nothing.pt: no checkpoint to resume from"):
        pretrain.main(pretrain_folder(tiny_set, tmp_path / "o", "--resume", str(tmp_path / "nothing.pt")))


@pytest.mark.slow
def test_pretrain_torchrun_two_cpu_ranks(tiny_set, tmp_path):
    res = run_py(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29532",
                  "pretrain.py",
                  *pretrain_folder(tiny_set, tmp_path, "--epochs", "2", "--batch-size", "1")], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2× cpu" in res.stderr and "global batch 2" in res.stderr
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["world"] == 2
    assert not torch.equal(ckpt["rng"][0]["mask"], ckpt["rng"][1]["mask"])  # each rank masks its own views


@pytest.mark.slow
def test_sigterm_saves_last_pt_in_one_line_and_the_resume_is_exact(tiny_set, tmp_path):
    """kill PID (SIGTERM) ends the run after its step with last.pt written, one line with the command
    that continues, exit status 143; that command then continues exactly."""
    common = ("--epochs", "500", "--seed", "7")
    argv = pretrain_boxes(tiny_set, tmp_path / "stopped", *common)
    rc, lines, command = interrupt(["pretrain.py", *argv], " step 3/", signum=signal.SIGTERM, group=False)
    assert rc == 143 and not any("Traceback" in line for line in lines), "".join(lines[-20:])
    step = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["step"]
    total = json.loads(open(tmp_path / "stopped" / "log.jsonl").readline())["total"]
    assert step >= 3 and lines[-1] == (
        f"pretrain.py: stopped by SIGTERM: {tmp_path / 'stopped' / 'last.pt'} at step {step} of {total}; "
        f"continue with: {shlex.join(['python', 'pretrain.py', *argv])} --resume\n")
    r = subprocess.run([*command, "--max-steps", str(step + 2)], cwd=HERE, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    straight = pretrain_boxes(tiny_set, tmp_path / "straight", *common, "--max-steps", str(step + 2))
    assert run_py(["pretrain.py", *straight]).returncode == 0
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "stopped"))
    assert a["step"] == b["step"] == step + 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
