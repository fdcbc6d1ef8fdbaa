"""Recipes: what train.py trains with (the paper's, its defaults; the demo's, `--demo`), the public
pretrained encoders `--init` takes by name, and what a checkpoint tells label.py to label with
(LabelSettings, saved in the checkpoint).
"""
import dataclasses
import os
import urllib.error

import torch

import util

HERE = os.path.dirname(os.path.abspath(__file__))
# Where the embedded demo lives: demo/ in the clone (an editable install included); an installed copy
# (no pyproject.toml beside it, its folder site-packages) writes demo/ in the current folder instead.
DEMO_HOME = os.path.join(HERE if os.path.isfile(os.path.join(HERE, "pyproject.toml")) else os.getcwd(),
                         "demo")

# The embedded demo: the synthetic set (synthetic.make_demo writes it here once) and its run folder.
DEMO_ROOT = os.path.join(DEMO_HOME, "data")
DEMO_DATA = dict(train_json=os.path.join(DEMO_ROOT, "annotations", "instances_train.json"),
                 images=os.path.join(DEMO_ROOT, "train"),
                 val_json=os.path.join(DEMO_ROOT, "annotations", "instances_val.json"),
                 val_images=os.path.join(DEMO_ROOT, "val"), out=os.path.join(DEMO_HOME, "run"))

# The demo's recipe, train.py --demo: what it sets over train.py's defaults (the paper's recipe, for
# ViT-B on GPUs). A 3-block vit_tiny/8 at 96 px with a 64-channel decoder, sized for a 2-core CPU
# (the decoder's 256 channels at 2× the token grid would cost most of the time), about 750 steps of
# 16 crops whatever the number of boxes, EMA 0.99 and no colour jitter. Its CRF loss is the paper's,
# with the flood (mal.Flood): the labels lose what a flood of the box's outside takes from them in
# thick pieces.
# Chosen by its worst evaluation set, synthetic and real (QUALITY.md).
DEMO = dict(arch="vit_tiny", depth=3, patch_size=8, img_size=96, decoder_dim=64, batch_size=16,
            steps=750, lr_per_image=5e-5, warmup_steps=50, mil_ramp=50, crf_ramp=100, loss_size=48,
            flood=True, ema=0.99, color_aug=False, min_area=64.0, drop_path=0.0, workers=1, val_max_images=60)


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """How label.py (and train.py's validation) turns a checkpoint's masks into labels: which network,
    the threshold, the test-time box expansion, the flip, and the mean-field refinement (its
    iterations, resolution, colour bandwidth ζ, pairwise weight ω and unary weight τ). The defaults
    are for a checkpoint that recommends none."""
    net: str = "task"
    thr: float = 0.5
    expand: float = 0.2
    flip: bool = False
    crf_refine: bool = False
    crf_iters: int = 100
    crf_size: int = 128
    crf_zeta: float = 0.5
    crf_omega: float = 2.0
    crf_unary: float = 1.0

    def predict_kw(self):
        """mal_predict's refinement options (no refinement: 0 iterations)."""
        return dict(flip=self.flip, crf_iters=self.crf_iters if self.crf_refine else 0,
                    crf_size=self.crf_size, crf_zeta=self.crf_zeta, crf_omega=self.crf_omega,
                    crf_unary=self.crf_unary)

    def describe(self):
        crf = (f"CRF refinement {self.crf_iters} iterations at {self.crf_size}px (ζ {self.crf_zeta:g}, "
               f"ω {self.crf_omega:g}, τ {self.crf_unary:g})" if self.crf_refine else "no CRF refinement")
        return (f"net {self.net}, thr {self.thr:g}, expand {self.expand:g}, "
                f"flip {'on' if self.flip else 'off'}, {crf}")


# The demo's label-time settings: the paper's mean field refines each mask, its unary weighted by
# 0.3 and its colour bandwidth ζ narrowed to 0.3, so that colour edges, faint ones included,
# overrule the mask more (QUALITY.md).
DEMO_REFINE = dict(crf_refine=True, crf_iters=100, crf_zeta=0.3, crf_omega=2.0, crf_unary=0.3)


def label_settings(args):
    """The LabelSettings a train.py run's checkpoints recommend: the demo's refine each mask
    (DEMO_REFINE, at the loss size); the paper's label with the network's masks as they are, and
    refine, when asked (label.py --crf-refine), with the training loss's CRF."""
    if args.demo:
        return LabelSettings(crf_size=args.loss_size, **DEMO_REFINE)
    return LabelSettings(crf_iters=args.crf_iters, crf_size=args.loss_size, crf_zeta=args.zeta,
                         crf_omega=args.omega, crf_unary=args.crf_unary)


def checkpoint_settings(ck):
    """(LabelSettings, whether the checkpoint recommends them): its own settings, or for a checkpoint
    from before they were saved, the defaults with its training loss's CRF iterations and size."""
    saved = ck.get("label_settings") or ck.get("label_defaults")  # the latter: checkpoints written before
    args = ck.get("args") or {}
    if saved is None:
        return LabelSettings(crf_iters=args.get("crf_iters", 100), crf_size=args.get("loss_size", 128)), False
    fields = {f.name for f in dataclasses.fields(LabelSettings)}
    base = dict(crf_iters=args.get("crf_iters", 100), crf_size=args.get("loss_size", 128))
    return LabelSettings(**{**base, **{k: v for k, v in saved.items() if k in fields}}), True


# Public pretrained encoders by name (train.py --init NAME): their authors' releases, which
# mal.load_pretrained reads as they are. Each is downloaded once, by torch.hub, into torch.hub's
# own checkpoint cache (where torch.hub.load_state_dict_from_url keeps the same files).
_MAE, _DEIT, _DINOV2 = ("https://dl.fbaipublicfiles.com/mae/pretrain", "https://dl.fbaipublicfiles.com/deit",
                        "https://dl.fbaipublicfiles.com/dinov2")
PRETRAINED = {
    "mae_vit_base": f"{_MAE}/mae_pretrain_vit_base.pth",
    "mae_vit_large": f"{_MAE}/mae_pretrain_vit_large.pth",
    "mae_vit_huge": f"{_MAE}/mae_pretrain_vit_huge.pth",
    "deit_tiny": f"{_DEIT}/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small": f"{_DEIT}/deit_small_patch16_224-cd65a155.pth",
    "deit_base": f"{_DEIT}/deit_base_patch16_224-b5f2ef4d.pth",
    **{f"dinov2_vit{s}14{reg}": f"{_DINOV2}/dinov2_vit{s}14/dinov2_vit{s}14{reg}_pretrain.pth"
       for s in "sblg" for reg in ("", "_reg4")},
}


def pretrained_cache():
    """Where the named encoders are kept: torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def pretrained_file(init, download=True):
    """The local file of --init: a path as it is, or a PRETRAINED name's file in pretrained_cache(),
    downloaded first when absent (download=False: only looked up). A one-line error for a name that
    is neither, and, when the download fails (no network), one that says which file to fetch and where
    to put it."""
    if os.path.exists(init) or init not in PRETRAINED:
        if not os.path.exists(init) and os.sep not in init and not init.endswith((".pth", ".pt")):
            raise util.InputError(f"{init}: neither a file nor a known encoder ({', '.join(PRETRAINED)})")
        return init
    url = PRETRAINED[init]
    path = os.path.join(pretrained_cache(), os.path.basename(url))
    if os.path.exists(path) or not download:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, progress=True)  # to a temporary file, then renamed
    except (OSError, urllib.error.URLError) as e:
        raise util.InputError(f"{init}: cannot download {url} ({getattr(e, 'reason', e)}); fetch it on a "
                              f"machine that is online and put it at {path}") from None
    return path
