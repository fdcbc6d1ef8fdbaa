import pytest
import torch


# ==============================================================================================
# train.py: a few steps lower the loss, exact resume, torchrun DDP on CPU

import json
import os
import subprocess
import sys

import data
import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    return data.make_demo(tmp_path_factory.mktemp("tiny_demo"), n_train=6, n_val=3, image_size=(96, 64), seed=3)


def tiny_argv(tiny_set, out, *extra):
    return ["--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"], "--out", str(out),
            "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32", "--decoder-dim", "16",
            "--batch-size", "4", "--min-area", "16", "--loss-size", "32", "--crf-iters", "5", "--workers", "0",
            "--warmup-steps", "1", "--mil-ramp", "1", "--crf-ramp", "1", "--drop-path", "0.1", "--device", "cpu",
            "--log-every", "0", *extra]


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
    assert set(ckpt) >= {"model_args", "task", "teacher", "optimizer", "step", "epoch", "rng", "args"}
    assert os.path.exists(tmp_path / "epoch_30.pt")


def test_train_resume_is_exact(tiny_set, tmp_path):
    """2 steps + resume + 2 steps gives bit-identical weights to 4 steps straight (a mid-epoch resume)."""
    common = ("--epochs", "3", "--seed", "7")
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


def test_train_torchrun_two_cpu_ranks(tiny_set, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(HERE, "train.py"), *tiny_argv(tiny_set, tmp_path, "--epochs", "1", "--batch-size", "2")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher identical on all 2 ranks" in res.stderr
    assert "on 2× cpu" in res.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] >= 1
