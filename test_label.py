"""label.py: the command: COCO output, faults, resume after a kill, ranks, settings, results lists."""
import json
import os
import shlex
import subprocess

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import coco
import evaluation
import label
import mal
import predictor
import recipes
import synthetic
import util
from conftest import HERE, Pipe, dinov2_authors_layout, interrupt, label_argv, run_py, save


def _ious_by_hand(world, res):
    """{id: IoU of the labeled mask with its GT mask} for the boxes of the world that have a GT mask."""
    gt = {a["id"]: a for a in json.loads((world / "boxes.json").read_text())["annotations"]
          if "segmentation" in a}
    ious = {}
    for a in res["annotations"]:
        if a["id"] in gt:
            m, g = (mask_utils.decode(coco.to_bytes(x["segmentation"])) > 0 for x in (a, gt[a["id"]]))
            ious[a["id"]] = (m & g).sum() / (m | g).sum()
    return ious


def test_cli_writes_valid_coco_and_reports_every_unlabeled_box(world, tmp_path):
    out = tmp_path / "labels.json"
    label.main(label_argv(world, out, "--eval", "--vis", "2"))
    src = json.loads((world / "boxes.json").read_text())
    res = json.loads(out.read_text())
    assert [a["id"] for a in res["annotations"]] == [a["id"] for a in src["annotations"]]
    assert (res["images"] == src["images"] and res["categories"] == src["categories"]
            and res["info"] == src["info"])
    api = COCO(str(out))  # loads as an instances JSON
    unlabeled = {100, 101, 102, 103}
    ims = {im["id"]: im for im in src["images"]}
    for a, s in zip(res["annotations"], src["annotations"]):
        assert {k: a[k] for k in ("image_id", "bbox", "category_id", "iscrowd")} == \
               {k: s[k] for k in ("image_id", "bbox", "category_id", "iscrowd")}
        if a["id"] in unlabeled:
            assert "segmentation" not in a
            continue
        assert a["extra"] == "kept" and isinstance(a["segmentation"]["counts"], str)
        m = api.annToMask(a).astype(bool)
        assert m.shape == (ims[a["image_id"]]["height"], ims[a["image_id"]]["width"]) and a["area"] == m.sum()
        x, y, w, h = a["bbox"]
        inside = coco.box_mask((x, y, x + w, y + h), *m.shape)
        assert not (m & ~inside).any()  # the mask lies in the box, clipped to the image
    rep = json.loads((tmp_path / "labels.report.json").read_text())
    reasons = {u["id"]: u["reason"] for u in rep["unlabeled"]}
    assert set(reasons) == unlabeled and rep["summary"]["unlabeled"] == 4 and rep["summary"]["labeled"] == 14
    assert "not found" in reasons[100] and "missing.png" in reasons[100]
    assert "corrupt.png" in reasons[101] and "degenerate" in reasons[102] and "not in images" in reasons[103]
    ev = json.loads((tmp_path / "labels.eval.json").read_text())
    ious = _ious_by_hand(world, res)
    assert ev["miou"] == pytest.approx(np.mean(list(ious.values()))) and ev["n"] == len(ious) == 14
    assert ev["box_miou"] > 0.5
    assert len(os.listdir(tmp_path / "labels.vis")) == 2
    assert not (tmp_path / "labels.json.parts").exists()  # cleaned up after the merge


def test_cli_scores_every_mask_and_writes_the_review(world, tmp_path, capsys):
    out = tmp_path / "labels.json"
    label.main(label_argv(world, out, "--eval", "--review", "3"))
    res = json.loads(out.read_text())
    labeled = [a for a in res["annotations"] if "segmentation" in a]
    assert len(labeled) == 14 and all(a["mask_score"] == round(a["mask_score"], 4) for a in labeled)
    assert not any("mask_score" in a for a in res["annotations"] if "segmentation" not in a)
    review = json.loads((tmp_path / "labels.review.json").read_text())
    assert sorted(r["id"] for r in review) == sorted(a["id"] for a in labeled)  # complete, once each
    assert review == sorted(review, key=lambda r: (r["mask_score"], r["id"]))  # lowest first
    assert {r["id"]: (r["image_id"], r["mask_score"]) for r in review} == {
        a["id"]: (a["image_id"], a["mask_score"]) for a in labeled}
    pngs = sorted(os.listdir(tmp_path / "labels.review"))
    assert pngs == [f"{k + 1}_score{r['mask_score']:.4f}_ann{r['id']}.png" for k, r in enumerate(review[:3])]
    ev = json.loads((tmp_path / "labels.eval.json").read_text())
    # Each mask's score is paired with its own IoU: the ranking figures from the hand-computed IoUs.
    ious = _ious_by_hand(world, res)
    ranking = evaluation.score_ranking([a["mask_score"] for a in labeled], [ious[a["id"]] for a in labeled])
    assert ev["score_n"] == 14 and {k: ev[k] for k in ranking} == pytest.approx(ranking)
    assert "mask_score vs IoU over 14 masks: Spearman" in capsys.readouterr().out
    # A rerun replaces the review overlays instead of mixing two runs' files; other files stay.
    (tmp_path / "labels.review" / "notes.txt").write_text("checked 1-3")
    label.main(label_argv(world, out, "--review", "2"))
    assert sorted(os.listdir(tmp_path / "labels.review")) == [*pngs[:2], "notes.txt"]


@pytest.mark.slow
def test_ctrl_c_keeps_the_boxes_done_and_the_rerun_is_byte_identical(world, tmp_path):
    """Ctrl-C (SIGINT to the process group) in a set that is one chunk: the boxes whose batch has run
    are kept in OUT.parts/ (all but less than a batch), one line says so and gives the command, exit
    status 130; that command labels the rest and writes the same bytes as an uninterrupted run. Parts
    of another configuration are refused."""
    ref, out = tmp_path / "ref.json", tmp_path / "out.json"
    r = run_py(["label.py", *label_argv(world, ref, "--chunk-images", "100")])
    assert r.returncode == 0, r.stderr
    (tmp_path / "img").mkdir()
    for f in os.listdir(world / "img"):
        if f != "5.png":
            os.symlink(world / "img" / f, tmp_path / "img" / f)
    pipe = Pipe(tmp_path / "img" / "5.png")  # holds the run at image 5 (of 9)
    argv = label_argv(world, out, "--chunk-images", "100")
    argv[argv.index("--images") + 1] = str(tmp_path / "img")
    rc, lines, command = interrupt(["label.py", *argv], pipe.waiting,
                                   then=lambda: pipe.feed((world / "img" / "5.png").read_bytes()))
    assert rc == 130 and lines[-1] == (
        f"label.py: stopped by SIGINT: 8 more boxes labeled, kept in {out}.parts; "
        f"continue with: {shlex.join(['python', 'label.py', *argv])}\n"), "".join(lines)
    assert not any("Traceback" in line for line in lines) and not out.exists()
    assert sorted(os.listdir(f"{out}.parts")) == ["chunk000000.partial.json", "fingerprint.json"]
    kept = json.loads(open(f"{out}.parts/chunk000000.partial.json").read())["results"]
    # images 1-5 hold 10 boxes: 8 in the two batches of 4 that ran, 2 waiting for a batch are redone
    assert len(kept) == 8 and all("mask_score" in r for r in kept.values())
    with pytest.raises(SystemExit, match="another configuration.*thr.*--fresh"):
        label.main([*argv, "--thr", "0.3"])
    os.remove(tmp_path / "img" / "5.png")
    os.symlink(world / "img" / "5.png", tmp_path / "img" / "5.png")
    r = subprocess.run([*command, "--batch-size", "3"], cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # batching is not part of the config
    assert r.returncode == 0 and out.read_bytes() == ref.read_bytes(), r.stderr
    label.main(label_argv(world, out, "--keep-parts", "--fresh"))
    assert out.read_bytes() == ref.read_bytes() and os.path.exists(f"{out}.parts/fingerprint.json")
    # Parts made on another device (cuda bf16 vs cpu float32) are not mixed in either.
    fp = json.loads(open(f"{out}.parts/fingerprint.json").read())
    assert fp["device"] == "cpu"
    # Nor parts whose masks were scored otherwise, or not at all.
    open(f"{out}.parts/fingerprint.json", "w").write(json.dumps({k: v for k, v in fp.items()
                                                                 if k != "mask_score"}))
    with pytest.raises(SystemExit, match="another configuration.*mask_score"):
        label.main(label_argv(world, out))
    open(f"{out}.parts/fingerprint.json", "w").write(json.dumps(dict(fp, device="cuda")))
    with pytest.raises(SystemExit, match="another configuration.*device"):
        label.main(label_argv(world, out))


@pytest.mark.slow
@pytest.mark.parametrize("encoder", [False, True])
def test_two_gloo_ranks_equal_one_process(world, tmp_path, encoder):
    """Also with --encoder beside --ckpt: rank 0 chooses, every rank labels with its choice."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    extra = []
    if encoder:
        torch.manual_seed(0)
        extra = ["--encoder", save(dinov2_authors_layout(mal.vit("vit_small_dinov2", depth=1)),
                                   tmp_path / "enc.pth")]
    r = run_py(["label.py", *label_argv(world, one, *extra)])
    assert r.returncode == 0, r.stderr
    argv = [a for a in label_argv(world, two, *extra) if a != "--quiet"]
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "label.py", *argv])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "label[rank 0]" in r.stderr and "label[rank 1]" in r.stderr  # both ranks did work
    assert r.stderr.count("label.py: labeling with the") == (1 if encoder else 0)
    assert two.read_bytes() == one.read_bytes()


@pytest.mark.slow
def test_missing_inputs_and_bad_checkpoint_are_one_line_errors(world, tmp_path):
    for flag, bad in (("--ckpt", tmp_path / "nope.pt"), ("--json", tmp_path / "nope.json"),
                      ("--images", tmp_path / "nodir")):
        argv = label_argv(world, tmp_path / "x.json")
        argv[argv.index(flag) + 1] = str(bad)
        with pytest.raises(SystemExit, match=f"label.py: {flag} .*{bad.name} not found"):
            label.main(argv)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = label_argv(world, tmp_path / "x.json")
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "junk.pt")
    with pytest.raises(SystemExit, match=r"junk.pt: not a PyTorch checkpoint "
                                         r"\(torch.save writes a zip archive"):
        label.main(argv)
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "nope.pt")  # from the shell: that line, no traceback
    r = run_py(["label.py", *argv])
    assert r.returncode == 1 and r.stderr.strip() == f"label.py: --ckpt {tmp_path / 'nope.pt'} not found"


def test_failed_image_without_size_is_reported_and_the_run_goes_on(world, tmp_path):
    src = json.loads((world / "boxes.json").read_text())
    src["images"] = [im for im in src["images"] if im["id"] in (1, 20)]
    del src["images"][1]["width"], src["images"][1]["height"]  # missing.png, no size in the JSON
    src["annotations"] = [a for a in src["annotations"] if a["image_id"] in (1, 20)]
    (tmp_path / "b.json").write_text(json.dumps(src))
    argv = label_argv(world, tmp_path / "out.json")
    argv[argv.index("--json") + 1] = str(tmp_path / "b.json")
    label.main(argv)
    rep = json.loads((tmp_path / "out.report.json").read_text())
    reasons = {u["id"]: u["reason"] for u in rep["unlabeled"]}
    assert "missing.png" in reasons[100] and "not found" in reasons[100]
    assert rep["summary"]["labeled"] == 2 and set(reasons) == {100, 102}


def test_test_time_settings_come_from_the_checkpoint_unless_given(world, tmp_path, capsys):
    ck = torch.load(world / "tiny.pt", weights_only=True)
    recipe = dict(net="teacher", thr=0.3, expand=0.1, flip=True, crf_refine=True, crf_iters=3, crf_size=16,
                  zeta=0.4, omega=1.5, tau=0.5)
    old_names = dict(crf_zeta="zeta", crf_omega="omega", crf_unary="tau")  # a checkpoint written before
    torch.save(dict(ck, label_defaults={old: recipe[new] for old, new in old_names.items()}
                    | {k: v for k, v in recipe.items() if k not in old_names.values()}), tmp_path / "r.pt")
    argv = lambda out, *x: [*label_argv(world, out, "--keep-parts"), "--ckpt", str(tmp_path / "r.pt"), *x]  # noqa: E731
    label.main(argv(tmp_path / "a.json"))
    cfg = json.loads((tmp_path / "a.json.parts" / "fingerprint.json").read_text())
    assert {k: cfg[k] for k in recipe} == recipe
    assert "from the checkpoint's recipe\n" in capsys.readouterr().err
    label.main(argv(tmp_path / "b.json", "--thr", "0.6", "--no-crf-refine", "--recipe", "net=task",
                    "tau=0.7"))
    cfg = json.loads((tmp_path / "b.json.parts" / "fingerprint.json").read_text())
    assert ((cfg["thr"], cfg["crf_refine"], cfg["crf_iters"], cfg["net"], cfg["flip"], cfg["tau"])
            == (0.6, False, 0, "task", True, 0.7))
    assert "except --thr, --crf-refine, --recipe net=task, --recipe tau=0.7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        label.main(argv(tmp_path / "d.json", "--recipe", "zeta=x"))
    assert "--recipe zeta=x: zeta takes a float" in capsys.readouterr().err
    label.main(label_argv(world, tmp_path / "c.json", "--keep-parts"))  # no recipe in the file: TEST_TIME
    cfg = json.loads((tmp_path / "c.json.parts" / "fingerprint.json").read_text())
    assert {k: cfg[k] for k in ("net", "thr", "expand", "flip", "crf_refine")} == {
        k: getattr(recipes.LabelSettings(), k) for k in ("net", "thr", "expand", "flip", "crf_refine")}


def test_an_encoder_labels_without_a_checkpoint(world, tmp_path, capsys, monkeypatch):
    """label.py --encoder NAME: no training; a public encoder's file (a 1-block DINOv2 ViT-S/14 in its
    authors' layout, random here, where torch.hub's cache keeps dinov2_vits14) labels every labelable box
    through predictor.BoxPrompted with recipes.BOX_PROMPTED_LABEL; the parts are the file's; an unknown
    name is one line."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    path = os.path.join(util.pretrained_cache(), os.path.basename(recipes.PRETRAINED["dinov2_vits14"]))
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    save(dinov2_authors_layout(mal.vit("vit_small_dinov2", depth=1)), path)
    argv = label_argv(world, tmp_path / "a.json", "--keep-parts", "--eval")
    at = argv.index("--ckpt")
    argv[at:at + 2] = ["--encoder", "dinov2_vits14"]
    label.main(argv)
    res = json.loads((tmp_path / "a.json").read_text())
    assert sum("segmentation" in a for a in res["annotations"]) == 14
    assert (tmp_path / "a.eval.json").exists()
    cfg = json.loads((tmp_path / "a.json.parts" / "fingerprint.json").read_text())
    want = recipes.BOX_PROMPTED_LABEL
    assert cfg["ckpt_sha256"] == label.file_sha256(path) and cfg["crf_refine"] and \
        (cfg["crf_size"], cfg["zeta"], cfg["tau"]) == (want.crf_size, want.zeta, want.tau)
    assert f"{want.describe()}; --encoder's settings\n" in capsys.readouterr().err
    p = predictor.Predictor(encoder=path, device="cpu")
    assert isinstance(p.nets[0], predictor.BoxPrompted) and p.size == predictor.BOX_PROMPTED_SIZE
    with pytest.raises(SystemExit):
        label.main([a for a in argv if a not in ("dinov2_vits14", "--encoder")])
    assert "--ckpt (or --encoder) needed" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^label.py: --encoder dinov3_vits16: neither a file nor a known "):
        label.main([a if a != "dinov2_vits14" else "dinov3_vits16" for a in argv])


def test_a_checkpoint_with_an_encoder_labels_with_the_better_of_the_two(world, tmp_path, capsys, monkeypatch):
    """--ckpt with --encoder: the labels are those of the one chosen (byte for byte what it gives alone),
    chosen on the sampled boxes' mean mask_score with the encoder's margin, said in a line and in the
    report; a resumed run keeps the choice it made; the fingerprint covers the encoder."""
    torch.manual_seed(0)
    enc = tmp_path / "dinov2_vits14.pth"
    save(dinov2_authors_layout(mal.vit("vit_small_dinov2", depth=1)), enc)
    alone = {}
    for who, flags in (("network", []), ("encoder", ["--encoder", str(enc)])):
        argv = label_argv(world, tmp_path / f"{who}.json", *flags)
        if who == "encoder":
            at = argv.index("--ckpt")
            del argv[at:at + 2]
        label.main(argv)
        alone[who] = (tmp_path / f"{who}.json").read_bytes()
    assert alone["network"] != alone["encoder"]
    for margin, want in ((-1.0, "encoder"), (1.0, "network")):
        monkeypatch.setattr(label, "ENCODER_MARGIN", margin)
        out = tmp_path / f"both{want}.json"
        label.main(label_argv(world, out, "--encoder", str(enc), "--keep-parts"))
        assert out.read_bytes() == alone[want]
        choice = json.loads((tmp_path / f"both{want}.report.json").read_text())["summary"]["labeler"]
        assert choice["labeler"] == want and choice["boxes"] == 14 and choice["encoder_margin"] == margin
        assert 0 < choice["mean_mask_score"]["network"] < 1 and 0 < choice["mean_mask_score"]["encoder"] < 1
        assert f"label.py: labeling with the {'--encoder' if want == 'encoder' else 'trained network'}: " \
               f"mean mask_score on 14 of the boxes" in capsys.readouterr().err
        cfg = json.loads((tmp_path / f"both{want}.json.parts" / "fingerprint.json").read_text())
        assert cfg["encoder_sha256"] == label.file_sha256(enc) and cfg["ckpt_sha256"] == label.file_sha256(
            world / "tiny.pt") and cfg["encoder_settings"]["crf_size"] == recipes.BOX_PROMPTED_LABEL.crf_size
    # a sample of the boxes, spread over them, and the higher mean wins at margin 0
    monkeypatch.setattr(label, "CHOICE_BOXES", 5)
    monkeypatch.setattr(label, "ENCODER_MARGIN", 0.0)
    label.main(label_argv(world, tmp_path / "sample.json", "--encoder", str(enc)))
    choice = json.loads((tmp_path / "sample.report.json").read_text())["summary"]["labeler"]
    score = choice["mean_mask_score"]
    assert 3 <= choice["boxes"] <= 5  # a sampled box on a missing or corrupt image gets no mask
    assert choice["labeler"] == ("encoder" if score["encoder"] >= score["network"] else "network")
    assert (tmp_path / "sample.json").read_bytes() == alone[choice["labeler"]]
    # the parts keep the choice: resumed with the other margin, the network's run stays the network's
    monkeypatch.setattr(label, "ENCODER_MARGIN", -1.0)
    label.main(label_argv(world, tmp_path / "bothnetwork.json", "--encoder", str(enc)))
    assert (tmp_path / "bothnetwork.json").read_bytes() == alone["network"]


def test_counts_agree_strict_fails_and_unlabeled_masks_are_reported(world, tmp_path, capsys):
    """The progress total is the summary's labelable count; --strict exits 3 when a box is unlabeled; the
    unlabeled count ends the output; --unlabeled-as box says in the report which mask each unlabeled box
    got."""
    out = tmp_path / "s.json"
    argv = [a for a in label_argv(world, out, "--unlabeled-as", "box", "--strict") if a != "--quiet"]
    with pytest.raises(SystemExit) as e:
        label.main(argv)
    assert e.value.code == 3
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if x.startswith("label: ")][-1].startswith("label: images 9/9 boxes 16/16 "
                                                                      "(14 labeled) ")
    # the first reasons by name: an image's by its file name, a box's by its id; then where all of them are
    assert err[-1].startswith(f"label.py: wrote {out}: 18 boxes (16 labelable): 14 labeled (0 empty masks), "
                              f"4 unlabeled (masks: 2 filled box, 1 empty, 1 none: image size unknown; "
                              f"missing.png: file not found; corrupt.png: not a readable image (")
    assert (f"; box 102: zero/negative size 0x10 (degenerate box [5.0, 5.0, 0.0, 10.0]); ...; all reasons in "
            f"{tmp_path / 's.report.json'}); ") in err[-1]
    assert err[-1].endswith("; --strict: exit status 3")
    rep = json.loads((tmp_path / "s.report.json").read_text())
    assert {k: rep["summary"][k] for k in ("boxes", "labelable", "labeled", "unlabeled")} == dict(
        boxes=18, labelable=16, labeled=14, unlabeled=4)
    masks = {u["id"]: u["mask"] for u in rep["unlabeled"]}
    assert masks == {100: "filled box", 101: "filled box", 102: "empty", 103: "none: image size unknown"}
    res = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert (res[102]["area"] == 0 and res[102]["segmentation"]["size"] == [48, 64]
            and "segmentation" not in res[103])
    label.main(argv[:-1])  # the same without --strict: exit status 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"label.py: wrote {out}: 18 boxes (16 labelable)") and "exit status" not in last


def test_unlabeled_reasons_are_named_by_image_file_or_box():
    """The summary line's names: one per failed image (its boxes share it), one per box with a problem."""
    path = os.path.join("data", "imgs", "a.jpg")
    missing = f"{path}: file not found"
    assert label.unlabeled_name(7, missing) == label.unlabeled_name(8, missing) == "a.jpg: file not found"
    assert label.unlabeled_name(7, f"{path}: size 3x4: wrong") == "a.jpg: size 3x4: wrong"
    assert label.unlabeled_name(9, "image_id 4 not in images") == "box 9: image_id 4 not in images"
    assert label.unlabeled_name(9, "zero/negative size 0x1") == "box 9: zero/negative size 0x1"


def test_results_list_with_score_threshold(world, tmp_path):
    dets = [dict(image_id=1, bbox=[10, 10, 20, 20], score=0.9, category_id=1),
            dict(image_id=2, bbox=[5, 5, 20, 20], score=0.2, category_id=2),
            dict(image_id=3, bbox=[30, 15, 25, 25], score=0.6, category_id=1),
            dict(image_id=3, bbox=[0, 0, 10, 10], score=0.05, category_id=1)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "lab.json"
    argv = label_argv(world, out, "--images-json", str(world / "boxes.json"), "--score-thr", "0.5", "--eval")
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
    argv = label_argv(world, tmp_path / "x.json")
    argv[argv.index("--json") + 1] = str(tmp_path / "dets.json")
    with pytest.raises(SystemExit, match="results list.*--images-json"):
        label.main(argv)


def test_inputs_that_are_not_what_they_should_be_are_named(world, tmp_path):
    (tmp_path / "noimages.json").write_text('{"annotations": []}')
    blob = (world / "tiny.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[:len(blob) // 2])
    for flag, bad, msg in (("--json", tmp_path / "noimages.json",
                            r"--json .*noimages.json: no 'images' key \(a COCO "),
                           ("--ckpt", tmp_path / "cut.pt",
                            rf"cut.pt: truncated: {len(blob) // 2:,} bytes, where its index lists ")):
        argv = label_argv(world, tmp_path / "x.json")
        argv[argv.index(flag) + 1] = str(bad)
        with pytest.raises(SystemExit, match="^label.py: .*" + msg):
            label.main(argv)


def test_formats_write_what_their_clients_read(world, tmp_path, capsys):
    """--format coco-polygons, yolo and png beside the RLE labels, each summary on stderr; the YOLO-seg
    folder is a dataset ultralytics loads, image by image, with a mask per labeled box."""
    pytest.importorskip("cv2")
    out = tmp_path / "poly.json"
    label.main(label_argv(world, out, "--format", "coco-polygons"))
    rle = json.loads((tmp_path / "poly.rle.json").read_text())
    poly = COCO(str(out))
    for a in rle["annotations"]:
        if "segmentation" in a and a["area"]:
            assert isinstance(poly.anns[a["id"]]["segmentation"], list)
    assert ("--format coco-polygons in" in capsys.readouterr().err
            and (tmp_path / "poly.rle.report.json").exists())
    label.main(label_argv(world, tmp_path / "png", "--format", "png"))
    assert sorted(os.listdir(tmp_path / "png")) == sorted(
        ["labels.json", "labels.json.index", "labels.report.json", "labels.review.json", "instances.json"] +
        [f"{i}.png" for i in range(1, 8)] + ["missing.png", "corrupt.png"])  # a label image per image entry
    ultralytics = pytest.importorskip("ultralytics")  # noqa: F841
    from ultralytics.data.dataset import YOLODataset

    label.main(label_argv(world, tmp_path / "yolo", "--format", "yolo"))
    names = sorted(os.listdir(tmp_path / "yolo" / "labels"))
    labeled = {a["image_id"]
               for a in json.loads((tmp_path / "yolo" / "labels.json").read_text())["annotations"]
               if "segmentation" in a}
    assert len(names) == 9 and len(labeled) == 7  # a label file per image entry, masks on the readable ones
    ds = YOLODataset(img_path=str(tmp_path / "yolo" / "images"),
                     data={"names": {0: "a", 1: "b"}, "channels": 3},
                     task="segment", augment=False, imgsz=64, cache=False)
    assert len(ds) == 7 and sum(len(lab["segments"]) for lab in ds.labels) == 14  # the missing and corrupt
                                                                                  # images left out
    for i in range(len(ds)):  # as it trains: every instance kept, its mask drawn (overlap masks hold
                              # indices 1..n)
        item = ds[i]
        assert len(item["cls"]) == len(ds.labels[i]["segments"]) == int(item["masks"].max())


def test_the_demo_trains_its_checkpoint_or_finishes_a_stopped_one_first(tmp_path, monkeypatch, capsys):
    """python label.py with no arguments: no demo/run/last.pt, train.py trains it; one that a stopped run
    left short of its epochs, train.py --demo --resume finishes it; a finished one is used as it is.
    train.py's exit status (130 after Ctrl-C) is label.py's."""
    monkeypatch.setattr(synthetic, "make_demo", lambda root: dict(val_json="v.json", val_images="val"))
    monkeypatch.setitem(recipes.DEMO_DATA, "out", str(tmp_path))
    calls, status = [], [0]
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd[2:]) or
                        subprocess.CompletedProcess(cmd, status[0]))
    label.demo_argv()
    for epoch in (3, 10):
        torch.save(dict(model_args={}, task={}, epoch=epoch, args={"epochs": 10}), tmp_path / "last.pt")
        label.demo_argv()
    assert calls == [[], ["--demo", "--resume"]]
    assert "last.pt unfinished; training it with `python train.py --demo --resume`" in capsys.readouterr().err
    torch.save(dict(model_args={}, task={}, epoch=3, args={"epochs": 10}), tmp_path / "last.pt")
    status[0] = 130
    with pytest.raises(SystemExit) as e:
        label.demo_argv()
    assert e.value.code == 130
