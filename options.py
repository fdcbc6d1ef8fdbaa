"""The command lines of train.py, label.py, pretrain.py and export.py: what a user sets, grouped for
--help. Torch-free, so that `--help` answers before the commands import torch; the commands read the
parsed flags into their recipes (recipes.py).
"""
import argparse
import importlib

import recipes


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show: None (unset, or said in
    the help), off switches and empty lists."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _flag_list(settings):
    return " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                    f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in settings.items())


def train_parser():
    demo = {k: v for k, v in recipes.DEMO.items() if k in recipes.DEMO_FLAGS}
    demo_recipe = " ".join(recipes.recipe_items({k: v for k, v in recipes.DEMO.items() if k not in demo}))
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=HelpFormatter,
        description="Train MAL (phase 1) on a COCO-format box set. Without --demo: the paper's recipe "
                    "(ViT-B/16 at 512², for GPUs).")
    p.add_argument("--demo", action="store_true",
                   help=f"the CPU recipe (the default with no arguments), on the embedded demo set unless "
                        f"--train-json is given; it sets {_flag_list(demo)} --recipe {demo_recipe} "
                        f"(flags given override them)".replace("%", "%%"))
    g = p.add_argument_group("data").add_argument
    g("--train-json", help="COCO-format instances JSON; only boxes are read (no segmentation needed)")
    g("--images", help="folder of the training images (file_name in the JSON is relative to it)")
    g("--val-json", help="COCO JSON with GT masks for per-epoch pseudo-label mIoU (optional)")
    g("--val-images", help="folder of the validation images")
    g("--min-area", type=float, default=recipes.MIN_AREA,
      help="skip boxes smaller than this many px² (public recipe)")
    g("--color-aug", action=argparse.BooleanOptionalAction, default=True,
      help="colour jitter, greyscale and blur on the task network's input (§4.2)")
    g("--workers", type=int, default=4, help="DataLoader worker processes per process")
    g = p.add_argument_group("model").add_argument
    g("--arch", default="vit_base", metavar="ARCH",
      help="ViT image encoder: vit_tiny, vit_small, vit_base, vit_large, vit_huge, or a DINOv2 / DeiT III "
           "variant (mal.VIT_CONFIGS; a wrong name lists them)")
    g("--depth", type=int, default=None, help="override the encoder's number of blocks")
    g("--patch-size", type=int, default=16,
      help="ViT patch size (8, 14 and 16 work; DINOv2's weights need 14)")
    g("--img-size", type=int, default=512, help="RoI crop size fed to the network (§3.1: 512)")
    g("--decoder-dim", type=int, default=256, help="channels of the decoder's K and V heads (paper: 256)")
    g("--init", help="pretrained encoder: a file (MAE, DeiT, DeiT III, DINOv2, timm or a MAL checkpoint) "
                     "or a public encoder's name, downloaded once (mae_vit_{base,large,huge}, "
                     "deit_{tiny,small,base}, dinov2_vit{s,b,l,g}14[_reg4]); it decides --arch, --patch-size "
                     "and --depth (--depth may keep fewer blocks)")
    g("--drop-path", type=float, default=0.1, help="stochastic depth rate of the encoder")
    g = p.add_argument_group("optimisation").add_argument
    g("--batch-size", type=int, default=4, help="crops per process per micro-step (paper: 4 per GPU × 8)")
    g("--accum", type=int, default=1, help="micro-steps accumulated per optimizer step")
    g("--epochs", type=int, default=None,
      help="epochs; the learning-rate schedule spans all of them (default: those that give --steps, else 10)")
    g("--steps", type=int, default=None,
      help="about this many optimizer steps, whatever the number of boxes: the epochs are set to give them, "
           "unless --epochs is given")
    g("--max-steps", type=int, default=None, help="stop after this global step (the schedule is unchanged)")
    g("--lr-per-image", type=float, default=1.5e-6, help="learning rate per image of the global batch (§4.2)")
    g("--warmup-steps", type=int, default=1000, help="linear learning-rate warm-up steps")
    g("--ema", type=float, default=0.996, help="EMA teacher momentum (§3.2)")
    g = p.add_argument_group("losses (Eq. 1-5)").add_argument
    g("--paper-loss", action="store_true",
      help="the paper's objective exactly (mal.mal_loss with the ramps): no flood, τ 1, the CRF at the loss "
           "size, whatever the recipe says")
    g("--gt-masks", action="store_true",
      help="the fully supervised upper bound, not MAL: train the same network on the JSON's GT masks "
           "(dice + BCE) instead of the box losses, to measure MAL's retention")
    g("--recipe", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
      help="the recipe's other settings, for experiments: the losses' (recipes.LossConfig: "
           f"{', '.join(recipes.LOSS_KEYS)}; flood=on|off and flood.FIELD for recipes.Flood) and the run's "
           f"({', '.join(f'{k} {v}' for k, v in recipes.RUN_SETTINGS.items())})")
    g = p.add_argument_group("run").add_argument
    g("--out", default=None, help="run folder (last.pt, best.pt, log.jsonl, val.jsonl); default runs/mal, "
                                  "demo/run for the embedded demo")
    g("--resume", nargs="?", const="last", default=None,
      help="continue from OUT/last.pt (or the given checkpoint), exactly where it stopped")
    g("--seed", type=int, default=0, help="seed of the weights, the data order and the augmentations")
    g("--device", default="auto", help="auto (CUDA if there is one), cuda or cpu")
    g("--save-minutes", type=float, default=10.0, help="write last.pt about this often between epoch ends")
    g("--compile", action="store_true", help="torch.compile the task network and the teacher")
    return p


def label_parser():
    s = recipes.LabelSettings()
    p = argparse.ArgumentParser(
        prog="label.py", formatter_class=HelpFormatter,
        description="Label every box of a COCO JSON with a MAL mask. No arguments: the demo (label "
                    "demo/data's val set with demo/run/last.pt, training it first if absent; --vis 8 "
                    "--review 8 --eval; output demo/labels.json).")
    g = p.add_argument_group("input and output").add_argument
    g("--ckpt", help="train.py checkpoint (e.g. RUN/last.pt); needed unless the demo or --encoder")
    g("--encoder", help="a pretrained ViT encoder: masks from its features and the box alone, no training; a "
                        "file or a public encoder's name, as train.py --init takes (e.g. dinov2_vits14). "
                        "With --ckpt, whichever of the two scores higher (mean mask_score) on a sample of "
                        "the boxes labels them all: the encoder on photos (README)")
    g("--json", help="COCO instances JSON (GT boxes) or COCO results list; needed unless the demo")
    g("--images", help="image folder (file_name is relative to it); needed unless the demo")
    g("--images-json", help="for a results list: JSON with the image entries (its categories are copied; "
                            "its GT masks, if any, are used by --eval)")
    g("--score-thr", type=float, help="keep results with score >= this (others are dropped and counted)")
    g("--out", help="output: a COCO JSON file for --format coco and coco-polygons (with OUT.report.json, "
                    "OUT.parts/ beside it), a folder for yolo and png; needed unless the demo")
    g("--format", choices=["coco", *recipes.FORMATS], default="coco",
      help="coco: instances with compressed RLE; coco-polygons: with polygons (holes filled, counted); yolo: "
           "an ultralytics YOLO-seg dataset (images/, labels/, data.yaml); png: 16-bit instance-label images "
           "with instances.json. The RLE labels are always written too: OUT itself, OUT without .json + "
           "'.rle.json' (coco-polygons), or OUT/labels.json")
    g("--unlabeled-as", choices=["none", "box"], default="none",
      help="mask of a box that could not be labeled: none (no segmentation key) or its filled box, empty "
           "where the box covers no pixel (for trainers that need a mask on every box); the report lists "
           "them either way, and says which mask each got")
    g("--strict", action="store_true", help="exit with status 3 when any box is unlabeled (for pipelines; "
                                            "OUT is written all the same)")
    # Label-time settings (recipes.LabelSettings): given here they win, then the checkpoint's, then
    # LabelSettings' defaults; their default is None on purpose (unset: from the checkpoint).
    recipe = lambda v: f" (default: the checkpoint's, else {v})"  # noqa: E731
    g = p.add_argument_group("label-time settings (each from the checkpoint unless given)").add_argument
    g("--expand", type=float, help="test-time box expansion (each side's distance from the centre "
                                   "×(1 + expand))" + recipe(s.expand))
    g("--thr", type=float, help="mask = probability > thr" + recipe(s.thr))
    g("--flip", action=argparse.BooleanOptionalAction,
      help="average with the horizontally flipped crop" + recipe("off"))
    g("--crf-refine", action=argparse.BooleanOptionalAction,
      help="mean-field CRF refinement of each mask" + recipe("off"))
    g("--recipe", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
      help="the other label-time settings, for experiments (recipes.LabelSettings): "
           + ", ".join(f"{k} {getattr(s, k)}" for k in recipes.LABEL_RECIPE_KEYS)
           + " (net: task, teacher or avg; crf_iters and crf_size default to the training loss's)")
    g = p.add_argument_group("what else to write").add_argument
    g("--eval", action="store_true", help="evaluate against GT masks: mIoU, mask AP, vs box")
    g("--vis", type=int, default=0, help="write N overlay PNGs")
    g("--vis-dir", help="overlay folder (default OUT without .json + '.vis')")
    g("--review", type=int, default=0, metavar="N",
      help="write an overlay of each of the N lowest-scored masks (mask_score in the file name) to OUT "
           "without .json + '.review/'")
    g = p.add_argument_group("run").add_argument
    g("--batch-size", type=int, default=32, help="crops per forward (across images)")
    g("--workers", type=int, default=2, help="DataLoader workers (decode + crop)")
    g("--threads", type=int, default=4, help="threads that paste and RLE-encode masks")
    g("--chunk-images", type=int, default=64, help="images per resumable chunk")
    g("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda")
    g("--fresh", action="store_true", help="discard OUT.parts/ and start over")
    g("--keep-parts", action="store_true", help="keep OUT.parts/ after the merge")
    g("--dist-timeout", type=float, default=24.0, help="hours ranks wait for each other")
    g("--quiet", action="store_true", help="no progress lines")
    return p


class PretrainHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default, and the epilog's tables as written."""


def pretrain_parser():
    p = argparse.ArgumentParser(
        description="MAE pretraining of MAL's ViT encoder; train.py --init OUT/last.pt starts MAL from it.",
        formatter_class=PretrainHelpFormatter, prog="pretrain.py",
        epilog="""\
views:
  --images DIR alone       every image under DIR (recursively; jpg, jpeg, png, bmp, tif, tiff, webp in
                           any letter case) as MAE's random resized crops (scale 0.2-1, aspect 3/4-4/3)
                           with horizontal flips
  --json BOXES.json        the RoI crops of its boxes (file_name relative to --images): the crops MAL
                           trains on (data.BoxDataset with its random expansion and flip, no colour
                           augmentation); --min-area as train.py's
  --json ... --views images  the JSON's listed images whole, as random resized crops

the demo (no arguments, or --demo with flags that override it):
  train.py's demo encoder (vit_tiny, 3 blocks, patch 8, 96 px) on the box crops of the demo's training
  set, decoder 1x128, 8 epochs (about 2.5 min on 2 CPU cores), into demo/pretrain/. Longer runs
  reconstruct better: python pretrain.py --demo --epochs 80. Then MAL from it:
  python train.py --demo --init demo/pretrain/last.pt

A killed run continues with the same command plus --resume.""")
    a = p.add_argument
    a("--demo", action="store_true", help="pretrain on the embedded demo set (the default with no arguments)")
    a("--images",
      help="image folder: every image under it, or the folder that --json's file_name is relative to")
    a("--json", help="COCO-format JSON: its boxes' RoI crops (or, with --views images, its images)")
    a("--views", choices=["boxes", "images"], help="with --json: box crops (default) or whole images")
    a("--min-area", type=float, default=recipes.MIN_AREA,
      help="box views: skip boxes smaller than this many px²")
    a("--arch", default="vit_base", metavar="ARCH",
      help="ViT image encoder: vit_tiny, vit_small, vit_base, vit_large, vit_huge (MAE's plain ViTs; a "
           "wrong name lists them)")
    a("--depth", type=int, default=None, help="override the encoder's number of blocks")
    a("--patch-size", type=int, default=16, help="ViT patch size")
    a("--img-size", type=int, default=224,
      help="view size (MAE: 224; mal.load_pretrained resamples pos_embed)")
    a("--mask-ratio", type=float, default=0.75, help="fraction of the patches masked (MAE: 0.75)")
    a("--norm-pix", action=argparse.BooleanOptionalAction, default=True,
      help="targets: each patch's pixels normalised by its own mean and variance (MAE's default), or "
           "--no-norm-pix for the pixels themselves (colour included)")
    a("--decoder-dim", type=int, default=512, help="width of MAE's decoder (MAE: 512)")
    a("--decoder-depth", type=int, default=8, help="blocks of MAE's decoder (MAE: 8)")
    a("--decoder-heads", type=int, default=16, help="attention heads of MAE's decoder (MAE: 16)")
    a("--batch-size", type=int, default=64, help="views per process per micro-step")
    a("--accum", type=int, default=1, help="micro-steps accumulated per optimizer step")
    a("--epochs", type=int, default=400,
      help="epochs; the learning-rate schedule spans all of them (MAE: 800)")
    a("--max-steps", type=int, default=None, help="stop after this global step (the schedule is unchanged)")
    a("--lr-per-image", type=float, default=1.5e-4 / 256,
      help="peak learning rate per image of the global batch (MAE: base lr 1.5e-4 per 256 images)")
    a("--warmup-steps", type=int, default=None, help="linear warm-up steps before the cosine decay to 0 "
      "(default: 5%% of all steps, as MAE's 40 of 800 epochs)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, tokens)")
    a("--out", default="runs/mae", help="run folder (last.pt, log.jsonl, vis/)")
    a("--resume", nargs="?", const="last", default=None,
      help="continue from OUT/last.pt (or the given checkpoint), exactly where it stopped")
    a("--seed", type=int, default=0, help="seed of the weights, the data order, the views and the masks")
    a("--device", default="auto", help="auto (CUDA if there is one), cuda or cpu")
    a("--workers", type=int, default=4, help="DataLoader worker processes per process")
    a("--save-minutes", type=float, default=10.0, help="write last.pt about this often between epoch ends")
    a("--save-every", type=int, default=None, help="write last.pt every this many steps instead")
    a("--log-every", type=float, default=5.0, help="seconds between progress lines")
    a("--vis", type=int, default=0, help="at the end, write N reconstruction PNGs to OUT/vis/")
    return p


def export_parser():
    p = argparse.ArgumentParser(
        description="Export a labels file that label.py wrote (COCO instances with RLE masks) without "
                    "labeling again: --format's files, --vis overlays, --review's lowest-scored masks; the "
                    "same files as label.py's own flags.", formatter_class=HelpFormatter, prog="export.py")
    p.add_argument("labels", help="label.py's output (its --out, or OUT/labels.json for yolo and png)")
    p.add_argument("--images", required=True, help="the image folder the labels' file_name is relative to")
    p.add_argument("--format", choices=["coco", *recipes.FORMATS], default="coco",
                   help="coco-polygons: a COCO JSON with polygons (holes filled, counted); yolo: an "
                        "ultralytics YOLO-seg dataset (images/, labels/, data.yaml); png: 16-bit "
                        "instance-label images with instances.json; coco: none (the labels are those)")
    p.add_argument("--out", help="where --format writes: a JSON file (coco-polygons) or a folder")
    p.add_argument("--vis", type=int, default=0, help="write N overlay PNGs")
    p.add_argument("--vis-dir", help="overlay folder (default LABELS without .json + '.vis')")
    p.add_argument("--review", type=int, default=0, metavar="N",
                   help="write an overlay of each of the N lowest-scored masks (mask_score in the file name) "
                        "to LABELS without .json + '.review/'")
    return p


# The console scripts (pyproject.toml): like `python train.py`, --help answers before the command's
# module, and torch with it, is imported.

def _command(module, parser):
    parser().parse_known_args()
    importlib.import_module(module).main()


def mal_train():
    _command("train", train_parser)


def mal_label():
    _command("label", label_parser)


def mal_pretrain():
    _command("pretrain", pretrain_parser)


def mal_export():
    _command("export", export_parser)
