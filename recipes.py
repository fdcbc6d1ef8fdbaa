"""Recipes: what train.py trains with (the paper's, its defaults; the demo's, `--demo`; the losses,
LossConfig), the public pretrained encoders `--init` takes by name, and what a checkpoint tells
label.py to label with (LabelSettings, saved in the checkpoint). Plain data, torch-free: the command
lines (options.py) read it before torch is imported.
"""
import dataclasses
import os
from typing import Optional

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

@dataclasses.dataclass(frozen=True)
class Flood:
    """A mean field with a weak unary τ (tau) and ω near the critical 1/(4k̄) (0.25 for 8 neighbours of
    affinity ~1): a slow diffusion, in which the crop outside the box, held at background, floods every
    region connected to it through similar colours (a crescent's or an L's concavity, the gaps between
    limbs), and regions closed off by colour edges follow the network. It takes ~L² iterations to
    reach L pixels deep, hence the low resolution `size`. Where edges are soft or the object is
    textured it also eats into the object from its rim, in thin bands: the CRF loss takes from it only
    the regions at least 2·open_radius + 1 pixels across (objective.opening). Where edges are soft all
    round (a nucleus fading into a dark background) the band is thick and the flood shrinks the object
    towards its core, emptying the rows and columns at the box's sides: with keep_bags a crop whose
    flood would leave a MIL bag empty that the paper's labels fill keeps the paper's labels (the box
    says the object crosses every one of them, §3.3). A bag within bag_margin pixels of what the flood
    keeps does not count: the flood's coarse grid clips thin extremities (a crescent's horn tips) by
    about that much, and a crop sent back for them would keep its concavity filled."""
    iters: int = 1000
    zeta: float = 0.3
    omega: float = 0.25
    tau: float = 1e-4
    size: int = 24
    open_radius: int = 2
    keep_bags: bool = True
    bag_margin: int = 2


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What train.py's objective is (objective.loss): the paper's Eq. 1-5 with its values (α_mil,
    α_crf, ζ, ω, the loss resolution and the mean field's iterations), then what this implementation
    adds, each a no-op at its paper value: the public recipe's loss-weight ramps, the CRF's unary
    weight τ (1: the paper's), the resolution its mean field runs at (None: the loss's) and the flood
    (None: none)."""
    alpha_mil: float = 4.0
    alpha_crf: float = 0.5
    loss_size: int = 128
    crf_iters: int = 100
    zeta: float = 0.5
    omega: float = 2.0
    mil_ramp: int = 1000
    crf_ramp: int = 4000
    tau: float = 1.0
    crf_size: Optional[int] = None
    flood: Optional[Flood] = None

    def paper(self):
        """The paper's objective exactly: these weights, ζ, ω and ramps, without τ, crf_size or the flood."""
        return dataclasses.replace(self, tau=1.0, crf_size=None, flood=None)

    def updated(self, items):
        """A copy with `key=value` items applied (train.py --recipe): a field, or flood.FIELD (which
        turns the flood on), or flood=on / off. Values take the field's type; an unknown key or a
        value of the wrong type is an InputError naming it."""
        fields, flood = {f.name: f for f in dataclasses.fields(self)}, {}
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            try:
                if not sep:
                    raise ValueError("not KEY=VALUE")
                if key == "flood":
                    out["flood"] = _switch(value, self.flood or Flood())
                elif key.startswith("flood."):
                    name = key[len("flood."):]
                    default = {f.name: f.default for f in dataclasses.fields(Flood)}
                    if name not in default:
                        raise KeyError(name)
                    flood[name] = (_on_off(value) if isinstance(default[name], bool)
                                   else type(default[name])(value))
                elif key in fields and key != "flood":
                    out[key] = None if value == "none" else _number(fields[key].type, value)
                else:
                    raise KeyError(key)
            except KeyError:
                names = [f for f in fields if f != "flood"] + ["flood", *(f"flood.{f.name}"
                                                                        for f in dataclasses.fields(Flood))]
                known = ", ".join([*RUN_SETTINGS, *names])
                raise ValueError(f"{item}: unknown setting (known: {known})") from None
            except ValueError as e:
                raise ValueError(f"{item}: {e}") from None
        if flood:
            out["flood"] = dataclasses.replace(out.get("flood") or self.flood or Flood(), **flood)
        return dataclasses.replace(self, **out)


def _on_off(value):
    if value not in ("on", "off"):
        raise ValueError("on or off")
    return value == "on"


def _switch(value, on):
    return on if _on_off(value) else None


def _text(value):
    return ("on" if value else "off") if isinstance(value, bool) else value


def _number(kind, value):
    return (int if "int" in str(kind) else float)(value)


# The demo's recipe, train.py --demo: what it sets over train.py's defaults (the paper's recipe, for
# ViT-B on GPUs). A 3-block vit_tiny/8 at 96 px with a 64-channel decoder, sized for a 2-core CPU
# (the decoder's 256 channels at 2× the token grid would cost most of the time), about 750 steps of
# 16 crops whatever the number of boxes, EMA 0.99 and no colour jitter. Its losses are the paper's at
# 48 px with short ramps, and the flood (Flood): the CRF's labels lose what a flood of the box's
# outside takes from them in thick pieces, unless that would empty a MIL bag.
# Chosen by its worst evaluation set, synthetic and real (QUALITY.md).
DEMO = dict(arch="vit_tiny", depth=3, patch_size=8, img_size=96, decoder_dim=64, batch_size=16,
            steps=750, lr_per_image=5e-5, warmup_steps=50, ema=0.99, color_aug=False, min_area=64.0,
            drop_path=0.0, workers=1, val_max_images=60,
            loss=LossConfig(loss_size=48, mil_ramp=50, crf_ramp=100, flood=Flood()))

# pretrain.py's demo: train.py's demo encoder (a 3-block vit_tiny/8 at 96 px) on the box crops of the
# demo's training set, what MAL then trains on, so that `train.py --demo --init demo/pretrain/last.pt`
# works.
PRETRAIN_DEMO = dict(json=DEMO_DATA["train_json"], images=DEMO_DATA["images"], views="boxes",
                     min_area=DEMO["min_area"], arch=DEMO["arch"], depth=DEMO["depth"],
                     patch_size=DEMO["patch_size"], img_size=DEMO["img_size"], decoder_dim=128,
                     decoder_depth=1, decoder_heads=4, batch_size=32, epochs=8, lr_per_image=1e-4,
                     warmup_steps=30, out=os.path.join(DEMO_HOME, "pretrain"), workers=1, vis=8)

# Those of DEMO's settings that are train.py flags; the others are --recipe's.
DEMO_FLAGS = ("arch", "depth", "patch_size", "img_size", "decoder_dim", "batch_size", "steps", "lr_per_image",
              "warmup_steps", "ema", "color_aug", "min_area", "drop_path", "workers")

# Minimum box area (px²) of the public MAL recipe (train.py's default; BoxDataset's own is 0).
MIN_AREA = 2048.0

# The run's settings that are no flag of train.py (--recipe KEY=VALUE sets them), at the paper's or the
# public recipe's values: the box expansion θ (§3.1), AdamW's weight decay, the cosine schedule's floor
# (a fraction of the peak), the validation subset, the checkpoint and log cadence, per-epoch checkpoints.
RUN_SETTINGS = dict(theta=1.2, weight_decay=0.05, min_lr_ratio=0.01, val_max_images=200, save_every=0,
                    log_every=5.0, keep_epochs=False)
LOSS_KEYS = tuple(f.name for f in dataclasses.fields(LossConfig) if f.name != "flood")


def recipe_items(settings):
    """--recipe's KEY=VALUE items that give these settings (RUN_SETTINGS' keys, and `loss`: a
    LossConfig, as its differences from the paper's defaults)."""
    items = [f"{k}={v}" for k, v in settings.items() if k != "loss"]
    loss = settings.get("loss")
    if loss is not None:
        base = LossConfig()
        items += [f"{k}={getattr(loss, k)}" for k in LOSS_KEYS if getattr(loss, k) != getattr(base, k)]
        if loss.flood is not None:
            items += ["flood=on"] + [f"flood.{f.name}={_text(getattr(loss.flood, f.name))}"
                                     for f in dataclasses.fields(Flood)
                                     if getattr(loss.flood, f.name) != getattr(Flood(), f.name)]
    return items


def read_recipe(items, loss, run):
    """(LossConfig, run settings) after --recipe's KEY=VALUE items: a RUN_SETTINGS key, a LossConfig
    field, flood=on|off or flood.FIELD (which turns the flood on). A ValueError names an unknown key
    or a value of the wrong type."""
    run, rest = dict(run), []
    for item in items:
        key, sep, value = item.partition("=")
        if key in RUN_SETTINGS and sep:
            kind = type(RUN_SETTINGS[key])
            try:
                run[key] = (value in ("1", "true", "on")) if kind is bool else kind(value)
            except ValueError:
                raise ValueError(f"{item}: {key} takes a {kind.__name__}") from None
        else:
            rest.append(item)
    return loss.updated(rest), run


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """How label.py (and train.py's validation) turns a checkpoint's masks into labels: which network,
    the threshold, the test-time box expansion, the flip, and the mean-field refinement (its
    iterations, resolution, colour bandwidth ζ, pairwise weight ω and unary weight τ, as in
    LossConfig). The defaults are for a checkpoint that recommends none."""
    net: str = "task"
    thr: float = 0.5
    expand: float = 0.2
    flip: bool = False
    crf_refine: bool = False
    crf_iters: int = 100
    crf_size: int = 128
    zeta: float = 0.5
    omega: float = 2.0
    tau: float = 1.0

    def predict_kw(self):
        """predictor.predict's refinement options (no refinement: 0 iterations)."""
        return dict(flip=self.flip, crf_iters=self.crf_iters if self.crf_refine else 0,
                    crf_size=self.crf_size, zeta=self.zeta, omega=self.omega, tau=self.tau)

    def describe(self):
        crf = (f"CRF refinement {self.crf_iters} iterations at {self.crf_size}px (ζ {self.zeta:g}, "
               f"ω {self.omega:g}, τ {self.tau:g})" if self.crf_refine else "no CRF refinement")
        return (f"net {self.net}, thr {self.thr:g}, expand {self.expand:g}, "
                f"flip {'on' if self.flip else 'off'}, {crf}")

    def updated(self, items):
        """A copy with label.py's --recipe KEY=VALUE items (LABEL_RECIPE_KEYS) applied; a ValueError
        names an unknown key or a value of the wrong type."""
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            if key not in LABEL_RECIPE_KEYS or not sep:
                raise ValueError(f"{item}: unknown setting (known: {', '.join(LABEL_RECIPE_KEYS)})")
            kind = type(getattr(self, key))
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"{item}: {key} takes a {kind.__name__}") from None
        return dataclasses.replace(self, **out)


# label.py's --recipe keys: the label-time settings a checkpoint supplies and only experiments change.
LABEL_RECIPE_KEYS = ("net", "crf_iters", "crf_size", "zeta", "omega", "tau")
# The names of LabelSettings' fields in checkpoints written before they had these.
_OLD_LABEL_NAMES = {"crf_zeta": "zeta", "crf_omega": "omega", "crf_unary": "tau"}

# The demo's label-time settings: the paper's mean field refines each mask, its unary weighted by
# 0.3 and its colour bandwidth ζ narrowed to 0.3, so that colour edges, faint ones included,
# overrule the mask more (QUALITY.md).
DEMO_REFINE = dict(crf_refine=True, crf_iters=100, zeta=0.3, omega=2.0, tau=0.3)


# label.py --encoder's settings (predictor.BoxPrompted): the mean field refines each mask as the
# demo's checkpoints do.
BOX_PROMPTED_LABEL = LabelSettings(crf_size=48, **DEMO_REFINE)


def label_settings(args):
    """The LabelSettings a train.py run's checkpoints recommend: the demo's refine each mask
    (DEMO_REFINE, at the loss size); the paper's label with the network's masks as they are, and
    refine, when asked (label.py --crf-refine), with the training loss's CRF."""
    loss = args.loss
    if args.demo:
        return LabelSettings(crf_size=loss.loss_size, **DEMO_REFINE)
    return LabelSettings(crf_iters=loss.crf_iters, crf_size=loss.loss_size, zeta=loss.zeta, omega=loss.omega,
                         tau=loss.tau)


def checkpoint_settings(ck):
    """(LabelSettings, whether the checkpoint recommends them): its own settings, or for a checkpoint
    from before they were saved, the defaults with its training loss's CRF iterations and size."""
    saved = ck.get("label_settings") or ck.get("label_defaults")  # the latter: checkpoints written before
    args = ck.get("args") or {}
    loss = args.get("loss") or args  # checkpoints written before LossConfig kept its fields in args
    base = dict(crf_iters=loss.get("crf_iters", 100), crf_size=loss.get("loss_size", 128))
    if saved is None:
        return LabelSettings(**base), False
    fields = {f.name for f in dataclasses.fields(LabelSettings)}
    saved = {_OLD_LABEL_NAMES.get(k, k): v for k, v in saved.items()}
    return LabelSettings(**{**base, **{k: v for k, v in saved.items() if k in fields}}), True


def loss_config(d):
    """A LossConfig from its dict in a checkpoint's args (dataclasses.asdict)."""
    flood = d.get("flood")  # a flood saved before keep_bags or bag_margin existed ran without them
    old = {"keep_bags": False, "bag_margin": 0}
    return LossConfig(**{**d, "flood": Flood(**{**old, **flood}) if flood else None})


# The export formats label.py and export.py write besides COCO RLE.
FORMATS = ("coco-polygons", "yolo", "png")


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
