"""train.py: a few steps lower the loss, exact resume, recipes, torchrun DDP on CPU."""
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error

import pytest
import torch

import data
import label
import mal
import pretrain
import recipes
import train
import util
from conftest import HERE, Pipe, dinov2_authors_layout, interrupt, run_py, save, tiny_argv


def test_train_dinov2_reg4_from_authors_file_then_label(tiny_set, tmp_path, capsys):
    """train.py --init with a DINOv2-layout file (released at 37 × 37 positions) at patch 14, then
    label.py."""
    init = save(dinov2_authors_layout(mal.vit("vit_small_dinov2_reg4", depth=1, img_size=518)),
                tmp_path / "d.pth")
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


ONE_RANK = util.Dist(False, 0, 1, torch.device("cpu"))


def test_init_decides_the_encoder_and_a_mismatch_is_one_line(tiny_set, tmp_path):
    """--init's weights set --arch, --patch-size and --depth over --demo's; flags given must agree,
    --depth may keep fewer blocks."""
    init = save(mal.vit("vit_small_dinov2", depth=2, img_size=28).state_dict(), tmp_path / "d.pth")
    base = ["--demo", "--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"],
            "--init", init]
    args = train.get_args(base)
    train.encoder_from_init(args, ONE_RANK)
    assert (args.arch, args.patch_size, args.depth) == ("vit_small_dinov2", 14, 2)
    args = train.get_args(base + ["--depth", "1", "--arch", "vit_small_dinov2"])
    train.encoder_from_init(args, ONE_RANK)
    assert (args.arch, args.patch_size, args.depth) == ("vit_small_dinov2", 14, 1)
    for extra, why in ((["--arch", "vit_small"], "its encoder is vit_small_dinov2 with patch 14, but --arch "
                                                 "vit_small was given"),
                       (["--patch-size=16"], "but --patch-size 16 was given"),
                       (["--depth", "3"], "its encoder has 2 blocks, --depth 3 was given")):
        with pytest.raises(util.InputError, match=re.escape(why)) as e:
            train.encoder_from_init(train.get_args(base + extra), ONE_RANK)
        assert "\n" not in str(e.value)
    # --demo's 96 px is no whole number of DINOv2's 14 px patches: one line, before any step
    args = train.get_args(base)
    train.encoder_from_init(args, ONE_RANK)
    why = ("--img-size 96 is not a multiple of the encoder's patch, 14 px (vit_small_dinov2): "
           "use --img-size 84 or 98")
    with pytest.raises(util.InputError, match=re.escape(why)):
        train.check_inputs(args)
    args = train.get_args(base + ["--img-size", "98"])
    train.encoder_from_init(args, ONE_RANK)
    train.check_inputs(args)


def test_init_by_name_downloads_once_into_torch_hub_s_cache(tiny_set, tmp_path, monkeypatch):
    """--init NAME goes through torch.hub's download into its checkpoint cache, then reads the file like
    any other; a second run finds it there. Without a network: one line naming the URL and where to put
    the file."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    local = save(mal.vit("vit_small_dinov2", depth=1, img_size=28).state_dict(), tmp_path / "d.pth")
    fetched = []

    def download(url, dst, progress=True):
        fetched.append(url)
        shutil.copy(local, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    argv = ["--demo", "--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"],
            "--init", "dinov2_vits14"]
    for _ in range(2):
        args = train.get_args(argv)
        train.encoder_from_init(args, ONE_RANK)
    url = recipes.PRETRAINED["dinov2_vits14"]
    assert fetched == [url] and args.init == str(tmp_path / "hub" / "checkpoints" / os.path.basename(url))
    assert (args.arch, args.patch_size, args.depth) == ("vit_small_dinov2", 14, 1)

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = recipes.PRETRAINED["deit_small"]
    why = (f"deit_small: cannot download {url} (Name or service not known); fetch it on a machine that is "
           f"online and put it at {tmp_path / 'hub'}")
    with pytest.raises(util.InputError, match=re.escape(why)):
        train.encoder_from_init(train.get_args(argv[:-1] + ["deit_small"]), ONE_RANK)
    with pytest.raises(util.InputError, match="dinov9: neither a file nor a known encoder"):
        train.encoder_from_init(train.get_args(argv[:-1] + ["dinov9"]), ONE_RANK)


def test_train_lr_schedule():
    lrs = [util.lr_at(s, 100, 1.0, 10, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then cosine, decreasing
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)  # to the floor


def test_train_steps_lower_the_loss(tiny_set, tmp_path):
    train.main(tiny_argv(tiny_set, tmp_path, "--epochs", "8", "--lr-per-image", "2e-4", "--drop-path", "0"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) >= 20 and log[-1]["step"] == log[-1]["total"]
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(ckpt) >= {"model_args", "task", "teacher", "optimizer", "step", "epoch", "world", "rng",
                         "args"}
    # No validation: no best.pt; epoch_N.pt only with --recipe keep_epochs=1.
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["last.pt"]


def test_train_keeps_last_and_best_rates_training_only_and_logs_loss_weights(tiny_set, tmp_path, monkeypatch,
                                                                              capsys):
    """last.pt, and best.pt at the epoch of the best validation mIoU (remembered across a resume);
    epoch_N.pt only with --recipe keep_epochs=1. The rate leaves validation time out. Progress lines and
    log.jsonl carry the loss weights as they ramp in."""
    mious, clock, real_time = {1: float("nan"), 2: 0.5, 3: 0.4}, [0.0], time.time

    def log_validation(args, val, net, teacher, device, epoch, step):  # takes 1000 s of a fake clock
        clock[0] += 1000.0
        return {"miou": mious[epoch]}

    monkeypatch.setattr(train, "log_validation", log_validation)
    monkeypatch.setattr(time, "time", lambda: real_time() + clock[0])
    spe = len(data.BoxDataset(tiny_set["train_json"], tiny_set["train_images"],
                              min_area=16)) // 4  # steps/epoch
    common = ("--epochs", "3", "--val-json", tiny_set["val_json"], "--val-images", tiny_set["val_images"],
              "--recipe", "mil_ramp=4", "crf_ramp=8")
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
    train.main(tiny_argv(tiny_set, tmp_path / "k", "--epochs", "2", "--recipe", "keep_epochs=1"))
    assert sorted(os.listdir(tmp_path / "k")) == ["epoch_1.pt", "epoch_2.pt", "last.pt", "log.jsonl"]
    assert torch.load(tmp_path / "k" / "epoch_2.pt", weights_only=True)["step"] == 2 * spe


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


@pytest.mark.slow
def test_train_compile_follows_eager(tiny_set, tmp_path):
    """train.py --compile (torch.compile of the task network and the teacher: inductor, C++ on the CPU)
    trains and follows the eager run: the same crops and no stochastic depth, so the same losses."""
    common = ("--epochs", "1", "--max-steps", "2", "--drop-path", "0")
    train.main(tiny_argv(tiny_set, tmp_path / "eager", *common))
    train.main(tiny_argv(tiny_set, tmp_path / "compiled", *common, "--compile"))
    eager, compiled = ([json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
                       for run in ("eager", "compiled"))
    assert [r["step"] for r in compiled] == [1, 2]
    for a, b in zip(eager, compiled):
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_train_refuses_a_resume_that_changes_the_run(tiny_set, tmp_path):
    train.main(tiny_argv(tiny_set, tmp_path, "--epochs", "2", "--max-steps", "1"))
    with pytest.raises(SystemExit, match=r"last.pt: batch_size was 4 and is now 2"):
        train.main(tiny_argv(tiny_set, tmp_path, "--epochs", "2", "--batch-size", "2", "--resume"))
    with pytest.raises(SystemExit, match=r"nothing.pt: no checkpoint to resume from"):
        train.main(tiny_argv(tiny_set, tmp_path, "--resume", str(tmp_path / "nothing.pt")))
    with pytest.raises(SystemExit, match=r"--init .*nothing.pth: no such file"):
        train.main(tiny_argv(tiny_set, tmp_path / "b", "--init", str(tmp_path / "nothing.pth")))
    with pytest.raises(SystemExit, match=r"missing.json: no such file"):
        train.main(tiny_argv(tiny_set, tmp_path / "c", "--val-json", str(tmp_path / "missing.json"),
                             "--val-images", str(tmp_path)))


@pytest.mark.slow
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
    monkeypatch.setattr(recipes, "DEMO_ROOT", str(tmp_path / "never"))
    args = train.get_args(["--demo", "--train-json", tiny_set["train_json"],
                           "--images", tiny_set["train_images"],
                           "--out", str(tmp_path / "run"), "--epochs", "3"])
    assert args.demo and not args.demo_data and args.val_json is None and args.out == str(tmp_path / "run")
    assert ((args.arch, args.depth, args.img_size, args.loss.loss_size, args.epochs)
            == ("vit_tiny", 3, 96, 48, 3))
    assert ((args.loss.tau, args.loss.crf_size, args.loss.flood, args.ema, args.color_aug)
            == (1.0, None, recipes.Flood(), 0.99, False))
    # The paper's objective is one flag away: the demo's with τ 1, the CRF at the loss size, no flood.
    paper = train.get_args(["--demo", "--paper-loss", "--train-json", "x.json", "--images", "."]).loss
    assert paper == recipes.LossConfig(loss_size=48, mil_ramp=50, crf_ramp=100) == args.loss.paper()
    assert train.get_args(["--train-json", "x.json", "--images", "."]).out == "runs/mal"
    assert train.get_args([]).demo_data and train.get_args([]).val_json == recipes.DEMO_DATA["val_json"]
    train.main(["--demo", "--train-json", tiny_set["train_json"], "--images", tiny_set["train_images"],
                "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--workers", "0",
                "--min-area", "16", "--recipe", "crf_iters=2"])
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    spe = len(data.BoxDataset(tiny_set["train_json"], tiny_set["train_images"], min_area=16)) // 2
    assert ck["args"]["steps"] == 750 and ck["args"]["epochs"] == round(750 / spe)  # the budget, in epochs
    # The demo labels with the paper's CRF refining each mask, its unary and colour bandwidth at 0.3.
    assert (ck["model_args"]["img_size"] == 96
            and ck["label_settings"] == dataclasses.asdict(recipes.LabelSettings(
                crf_refine=True, crf_iters=100, crf_size=48, zeta=0.3, omega=2.0, tau=0.3)))
    assert recipes.loss_config(ck["args"]["loss"]) == dataclasses.replace(recipes.DEMO["loss"], crf_iters=2)
    # A flood saved before keep_bags or bag_margin existed resumes as it ran, without them.
    saved = ck["args"]["loss"]
    old = dict(saved, flood={k: v for k, v in saved["flood"].items() if k not in ("keep_bags", "bag_margin")})
    assert recipes.loss_config(old).flood == recipes.Flood(keep_bags=False, bag_margin=0)
    old = dict(saved, flood={k: v for k, v in saved["flood"].items() if k != "bag_margin"})
    assert recipes.loss_config(old).flood == recipes.Flood(bag_margin=0)
    assert not os.path.exists(tmp_path / "never")


def test_help_gives_the_defaults(capsys):
    """--help shows each flag's default; label.py's test-time flags say where theirs come from, not None."""
    for mod, expect in ((train, ["--epochs EPOCHS epochs; the learning-rate schedule spans all of them "
                                 "(default: those that give --steps, else 10)"]),
                        (label, ["--thr THR mask = probability > thr (default: the checkpoint's, else 0.5)",
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
    with pytest.raises(util.InputError, match=r"^cuda:1 asked for, but this node has 1 CUDA device\(s\): "
                                             r".*--nproc_per_node 1"):
        util.setup_distributed("cuda")


@pytest.mark.slow
def test_train_torchrun_two_cpu_ranks(tiny_set, tmp_path):
    res = run_py(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                  "train.py",
                  *tiny_argv(tiny_set, tmp_path, "--epochs", "1", "--batch-size", "2")], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher identical on all 2 ranks" in res.stderr
    assert "on 2× cpu" in res.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] >= 1


def test_bad_inputs_stop_the_run_before_its_first_step(tiny_set, tmp_path):
    """Each is one line naming the file (and the key), and no step is taken: no log.jsonl, no last.pt."""
    (tmp_path / "random.pt").write_bytes(b"\x13\x37 random bytes")
    (tmp_path / "noimages.json").write_text(json.dumps({"annotations": []}))
    (tmp_path / "broken.json").write_text('{"images": [1, 2')
    (tmp_path / "boxes_only.json").write_text(json.dumps(dict(
        json.load(open(tiny_set["val_json"])),
        annotations=[{k: v for k, v in a.items() if k != "segmentation"}
                     for a in json.load(open(tiny_set["val_json"]))["annotations"]])))
    val = ["--val-images", tiny_set["val_images"]]
    for k, (extra, msg) in enumerate([
            (["--init", str(tmp_path / "random.pt")], r"--init .*random.pt: not a PyTorch checkpoint"),
            (["--val-json", str(tmp_path / "noimages.json"), *val],
             r"--val-json .*noimages.json: no 'images' key"),
            (["--val-json", str(tmp_path / "broken.json"), *val],
             r"--val-json .*broken.json: not valid JSON \("),
            (["--val-json", str(tmp_path / "boxes_only.json"), *val],
             r".*boxes_only.json: no annotation has a 'segmentation'"),
            (["--val-json", tiny_set["val_json"], "--val-images", str(tmp_path / "nowhere")],
             r"--val-images .*nowhere: no "),
            (["--val-json", tiny_set["val_json"], "--val-images", str(tmp_path)],
             r".*none of its 3 images is under")]):
        out = tmp_path / f"run{k}"
        with pytest.raises(SystemExit, match="^train.py: " + msg) as e:
            train.main(tiny_argv(tiny_set, out, *extra))
        assert "\n" not in str(e.value.code) and "weights_only" not in str(e.value.code)
        assert not os.path.exists(out / "log.jsonl") and not os.path.exists(out / "last.pt")


@pytest.mark.slow
def test_ctrl_c_saves_last_pt_in_one_line_and_the_resume_is_exact(tiny_set, tmp_path):
    """Ctrl-C (SIGINT to the process group, DataLoader worker included) ends the run after its step with
    last.pt written, one line that says so and how to continue, exit status 130; that command then
    continues exactly: its weights equal an uninterrupted run's to the same step."""
    common = ("--epochs", "300", "--seed", "7", "--workers", "1")
    rc, lines, command = interrupt(["train.py", *tiny_argv(tiny_set, tmp_path / "stopped", *common)],
                                   after=" step 3/")
    assert rc == 130 and not any("Traceback" in line for line in lines), "".join(lines[-20:])
    step = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["step"]
    total = json.loads(open(tmp_path / "stopped" / "log.jsonl").readline())["total"]
    argv = tiny_argv(tiny_set, tmp_path / "stopped", *common)
    assert lines[-1] == (f"train.py: stopped by SIGINT: {tmp_path / 'stopped' / 'last.pt'} at step {step} of "
                         f"{total}; continue with: {shlex.join(['python', 'train.py', *argv])} --resume\n")
    assert step >= 3 and not lines[-2].startswith("train.py: stopped")  # the one line
    r = subprocess.run([*command, "--max-steps", str(step + 2)], cwd=HERE, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    straight = tiny_argv(tiny_set, tmp_path / "straight", *common, "--max-steps", str(step + 2))
    r = run_py(["train.py", *straight])
    assert r.returncode == 0, r.stderr[-2000:]  # a subprocess too: one thread, the same float sums
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "stopped"))
    assert a["step"] == b["step"] == step + 2
    for part in ("task", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.slow
def test_a_signal_before_the_first_step_says_nothing_was_saved(tiny_set, tmp_path):
    """SIGTERM while the run sets up (here: reading --train-json, a pipe that stays empty): one line, the
    same command to rerun, exit status 143."""
    pipe = Pipe(tmp_path / "boxes.json")
    argv = tiny_argv(tiny_set, tmp_path / "early", "--epochs", "300")
    argv[argv.index("--train-json") + 1] = pipe.path
    rc, lines, _ = interrupt(["train.py", *argv], pipe.waiting, signal.SIGTERM, group=False, then=pipe.feed)
    assert rc == 143 and lines == [f"train.py: stopped by SIGTERM: nothing saved; continue with: "
                                   f"{shlex.join(['python', 'train.py', *argv])}\n"], "".join(lines[-20:])


def test_a_cpu_run_without_demo_says_what_it_costs_and_warns_of_long_ramps_once(tiny_set, tmp_path, capsys):
    argv = tiny_argv(tiny_set, tmp_path, "--max-steps", "2", "--warmup-steps", "5",
                     "--recipe", "crf_ramp=9")
    train.main(argv)
    err = capsys.readouterr().err
    ramps = "train.py: warning: --warmup-steps 5 and crf_ramp 9 steps, longer than the run's 2: "
    assert err.count(ramps) == 1
    guard = [line for line in err.splitlines() if line.startswith("train.py: warning: no GPU and no --demo")]
    assert len(guard) == 1 and "2 steps of 4 crops of vit_tiny/8 at 32px take about " in guard[0]
    assert guard[0].endswith(" ".join(argv) + " --demo")
    assert err.index(guard[0]) < err.index("epoch 0 step 1/")  # before the first step
    train.main([*argv, "--demo", "--out", str(tmp_path / "demo")])
    assert "no GPU" not in capsys.readouterr().err


def test_the_duration_reads_at_a_glance():
    assert [util.duration(s) for s in (45, 720, 27000)] == ["45 s", "12 min", "7.5 h"]


def test_a_truncated_resume_checkpoint_is_named_once(tiny_set, tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:2000])
    with pytest.raises(SystemExit, match=r"^train.py: --resume checkpoint .*cut.pt: truncated: 2,000 bytes"):
        train.main(tiny_argv(tiny_set, tmp_path, "--resume", str(tmp_path / "cut.pt")))


def test_the_usage_block_names_the_architectures_once(capsys):
    for mod in (train, pretrain):
        with pytest.raises(SystemExit):
            mod.get_args(["--help"])
        out = capsys.readouterr().out
        assert out.count("vit_large,") == 1 and "[--arch ARCH]" in out, mod.__name__
