"""Fixtures and helpers shared by the test files: a tiny demo-kind set, a tiny labeling world with
faults in it, oracle networks, and the argument lists of small runs. The project's modules are
imported where they are used, so that one that fails to import fails only the tests that need it."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

# pycocotools' compiled mask functions trip NumPy 2's copy-keyword deprecation on every call. Ignored as
# a mark on each test: a mark's filter outranks the command line's, so that `pytest -W
# error::DeprecationWarning` fails on our own deprecations only.
PYCOCOTOOLS_COPY_WARNING = ("ignore:__array__ implementation doesn't accept a copy keyword"
                            ":DeprecationWarning:pycocotools")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a CUDA device: skipped, with the reason, where there is none. Every test
    ignores PYCOCOTOOLS_COPY_WARNING."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="no CUDA device")
    for item in items:
        item.add_marker(pytest.mark.filterwarnings(PYCOCOTOOLS_COPY_WARNING))
        if skip and "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """A demo-kind set of 6 + 3 images of 96 × 64, made once per pytest run."""
    import synthetic

    return synthetic.make_demo(tmp_path_factory.mktemp("tiny_demo"), n_train=6, n_val=3, image_size=(96, 64),
                               seed=3)


HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_argv(tiny_set, out, *extra):
    return ["--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"], "--out", str(out),
            "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32",
            "--decoder-dim", "16", "--batch-size", "4", "--min-area", "16", "--workers", "0",
            "--warmup-steps", "1", "--drop-path", "0.1", "--device", "cpu",
            "--recipe", "loss_size=32", "crf_iters=5", "mil_ramp=1", "crf_ramp=1", "log_every=0", *extra]


TINY = dict(arch="vit_tiny", patch_size=8, img_size=32, depth=1)


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def bbox(m):
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint and a small synthetic COCO set with a missing image, a corrupt image,
    a degenerate box, a box on an unknown image and a box sticking out of its image."""
    import mal

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
            m = disc(H, W, cx, cy, r)
            pix[m] = (220, 30, 30)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(dict(id=aid, image_id=i, category_id=1 + aid % 2, bbox=bbox(m), iscrowd=0,
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


def label_argv(w, out, *extra):
    # On the CPU on any machine: these compare bytes across runs and ranks (two gloo ranks on one GPU
    # are refused) and check the fingerprint's device.
    return ["--ckpt", str(w / "tiny.pt"), "--json", str(w / "boxes.json"), "--images", str(w / "img"),
            "--out", str(out), "--chunk-images", "2", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--quiet", *extra]


def run_py(args, env=None, timeout=120):
    """python ARGS in the project folder at one thread, its output captured."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=HERE, env=e, capture_output=True, text=True,
                          timeout=timeout)


def interrupt(args, after, signum=signal.SIGINT, group=True, timeout=180, then=None):
    """python ARGS in the project folder (one thread) sent `signum` once a line of its stderr contains
    `after` (or, a function, once after() is true, asked every 0.1 s): to its whole process group, as
    Ctrl-C in a terminal does (its DataLoader workers too), or to the process alone (kill PID); and
    then then(), if given. Returns
    (exit status, stderr lines, the command its last line says continues the work, as an argument list
    for subprocess)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, *args], cwd=HERE, env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        if callable(after):
            while not after() and p.poll() is None:
                time.sleep(0.1)
            (os.killpg if group else os.kill)(p.pid, signum)
        for line in [] if callable(after) else p.stderr:
            lines.append(line)
            if after in line:
                (os.killpg if group else os.kill)(p.pid, signum)
                break
        if then:
            then()
        lines += p.stderr.readlines()
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    command = shlex.split(lines[-1].rpartition("continue with: ")[2]) if lines else []
    if command[:1] == ["python"]:
        command[0] = sys.executable
    return rc, lines, command


class Pipe:
    """A named pipe in place of an input file, to hold a run at a known point: waiting() is true once the
    run has opened it (a writer opened then, the run waits in read()); feed() gives it the file's bytes."""

    def __init__(self, path):
        self.path, self.fd = str(path), None
        os.mkfifo(self.path)

    def waiting(self):
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # fails until the reader is there
            return True
        except OSError:
            return False

    def feed(self, payload=b""):
        os.set_blocking(self.fd, True)
        os.write(self.fd, payload)
        os.close(self.fd)


class Oracle(torch.nn.Module):
    """Stands in for MAL: logits from the crop's colour (the object is pure red), at half resolution."""

    img_size = 64

    def forward(self, x):
        import data

        mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
        rgb = x * std + mean
        red = ((rgb[:, 0] > 150) & (rgb[:, 1] < 100)).float()
        return torch.nn.functional.avg_pool2d(red[:, None], 2)[:, 0] * 20 - 10


def rle_of(m):
    import coco

    return coco.encode(m)


def ann(i, image_id, bbox, iscrowd=0):
    return dict(id=i, image_id=image_id, category_id=1, bbox=bbox, area=1.0, iscrowd=iscrowd)


def write_coco(path, images, annotations):
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=[{"id": 1, "name": "x"}]), f)
    return str(path)


def dinov2_authors_layout(model):
    """A VisionTransformer's weights as the DINOv2 authors release them: a bare state dict with
    register_tokens, the SwiGLU MLP as w12 / w3 (ViT-g only; the others have fc1 / fc2 as we do) and a
    mask_token."""
    import mal

    swiglu = isinstance(model.blocks[0].mlp, mal.SwiGLU)
    out = {"mask_token": torch.zeros(1, model.embed_dim)}
    for k, v in model.state_dict().items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k.replace("reg_token", "register_tokens")] = v
    return out


def save(obj, path):
    torch.save(obj, path)
    return str(path)
