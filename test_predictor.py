"""predictor.py: the inference engine with oracle networks, and mask_score."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

import coco
import label
import mal
import predictor
import recipes
import util
from conftest import TINY, Oracle, bbox, disc, label_argv


@pytest.mark.parametrize("flip,crf", [(False, 0), (True, 0), (False, 5)])
def test_oracle_masks_land_where_the_objects_are(tmp_path, flip, crf):
    H, W = 80, 96
    objs = [disc(H, W, 30, 40, 15), disc(H, W, 88, 12, 14)]  # the second runs off the image
    pix = np.full((H, W, 3), 128, np.uint8)
    for m in objs:
        pix[m] = (255, 0, 0)
    Image.fromarray(pix).save(tmp_path / "a.png")
    images = [dict(id=7, file_name="a.png", width=W, height=H)]
    todo = {7: [dict(id=k + 1, bbox=bbox(m)) for k, m in enumerate(objs)]}
    settings = recipes.LabelSettings(flip=flip, crf_refine=crf > 0, crf_iters=crf, crf_size=32)
    res = predictor.label_dataset(Oracle(), images, todo, str(tmp_path), "cpu", settings, batch_size=1)
    for k, m in enumerate(objs):
        got = mask_utils.decode(coco.to_bytes(res[k + 1]["segmentation"])).astype(bool)
        assert got.shape == (H, W) and res[k + 1]["area"] == got.sum()
        iou = (got & m).sum() / (got | m).sum()
        assert iou > 0.93, iou
        assert np.abs(np.argwhere(got).mean(0) - np.argwhere(m).mean(0)).max() < 0.5


class ColourEncoder(torch.nn.Module):
    """Stands in for a pretrained encoder: each 8 px patch's features are its mean colour."""

    patch_size = 8

    def forward(self, x):
        return F.avg_pool2d(x, 8)


@pytest.mark.parametrize("flip", [False, True])
def test_box_prompted_masks_what_looks_like_the_box_s_centre(tmp_path, flip):
    """BoxPrompted, no training: a cross, which its inscribed ellipse fits badly, and a disc, each the
    colour of nothing outside its box, are masked as themselves (at the coarse patches' resolution)."""
    H, W = 96, 112
    yy, xx = np.mgrid[:H, :W]
    cross = ((abs(xx - 40) < 8) & (abs(yy - 48) < 32)) | ((abs(yy - 48) < 8) & (abs(xx - 40) < 32))
    round_ = disc(H, W, 92, 24, 14)
    pix = np.full((H, W, 3), 128, np.uint8)
    pix[cross], pix[round_] = (230, 40, 40), (40, 60, 220)
    Image.fromarray(pix).save(tmp_path / "a.png")
    images = [dict(id=1, file_name="a.png", width=W, height=H)]
    objs = [cross, round_]
    todo = {1: [dict(id=k + 1, bbox=bbox(m)) for k, m in enumerate(objs)]}
    settings = recipes.LabelSettings(flip=flip)
    nets = [predictor.BoxPrompted(ColourEncoder())]
    res = predictor.label_dataset(nets, images, todo, str(tmp_path), "cpu", settings, batch_size=2, size=128)
    for k, m in enumerate(objs):
        got = mask_utils.decode(coco.to_bytes(res[k + 1]["segmentation"])).astype(bool)
        x, y, w, h = bbox(m)
        ell = ((xx + 0.5 - x - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y - h / 2) / (h / 2)) ** 2 <= 1
        iou, ell_iou = ((a & m).sum() / (a | m).sum() for a in (got, ell))
        assert iou > 0.8 and iou > min(ell_iou + 0.25, 0.9), (k, iou, ell_iou)


def test_mask_score_of_hand_made_masks():
    """1 for a sure mask that fills every row and column of its box and nothing outside it; less for one
    that spills over the box, misses half the object, or hesitates."""
    box = torch.zeros(1, 20, 20)
    box[:, 4:16, 4:16] = 1
    spill = torch.zeros(1, 20, 20)
    spill[:, 2:18, 2:18] = 1
    half = box.clone()
    half[..., 10:] = 0
    s = predictor.mask_score(torch.cat([box, spill, half, 0.8 * box]), box.expand(4, -1, -1)).tolist()
    # Rows and columns are 20 bags each: spill gets 4 of each wrong, half 6 columns, and the unsure
    # mask's 12 crossing rows and columns score 0.8 each, with a confidence |2·0.8 − 1| = 0.6 in the box.
    assert s == pytest.approx([1, 1 - 4 / 20, 1 - 6 / 20 / 2, (1 - 0.2 * 12 / 20) * 0.6])
    assert s[0] > s[2] > s[1] > s[3]


@pytest.mark.parametrize("crf", [0, 5])
def test_masks_on_other_grids_score_alike_on_one_grid(crf):
    """predict's score_size: the same soft disc from a 16 × 16 network and, resampled, from a 48 × 48 one
    scores alike on the 48 grid (as label.py's --ckpt with --encoder compares them), not on their own."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    coarse = 3 * (4.5 - ((yy - 7.5) ** 2 + (xx - 7.5) ** 2).sqrt())  # logits of a disc, 4.5 px radius
    fine = torch.logit(F.interpolate(coarse.sigmoid()[None, None], size=(48, 48), mode="bilinear",
                                     align_corners=False)[0, 0], eps=1e-6)
    crops = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)
    box = torch.zeros(1, 48, 48, dtype=torch.bool)
    box[:, 12:36, 12:36] = True
    kw = dict(crf_iters=crf, crf_size=48, zeta=0.3, tau=0.3)
    scores = {(name, size): predictor.predict([lambda x, m=m: m.expand(x.shape[0], -1, -1)], crops, box,
                                              torch.device("cpu"), score_size=size, **kw)[1].item()
              for name, m in (("coarse", coarse), ("fine", fine)) for size in (None, 48)}
    assert scores["coarse", 48] == pytest.approx(scores["fine", 48], abs=1e-5)
    assert scores["fine", None] == pytest.approx(scores["fine", 48], abs=1e-6)
    assert abs(scores["coarse", None] - scores["coarse", 48]) > 0.01


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


def test_mask_score_is_lower_for_a_neighbour_and_for_a_hesitant_refinement():
    """A mask on the neighbour that the box cuts scores below the object's own; the CRF-refined
    probabilities' confidence multiplies the score, and without a refinement the score is the
    network's alone."""
    box = torch.zeros(1, 20, 20)
    box[:, 4:16, 4:16] = 1
    right = box.clone()
    right[..., 4:16, 4:6] = 0.02  # the object is a little narrower than its box: consistency still 1 − 2/20/2
    neighbour = torch.zeros(1, 20, 20)
    neighbour[..., 6:18, 11:20] = 1  # the next object over, cut by the box's right edge
    s = predictor.mask_score(torch.cat([right, neighbour]), box.expand(2, -1, -1)).tolist()
    assert s[0] > s[1] + 0.2
    sure, unsure = box.clone(), box.clone()
    unsure[..., 4:16, 10:16] = 0.6  # the refinement hesitates over half the box: confidence 1 − 0.8 / 2
    plain = predictor.mask_score(box, box)
    refined = predictor.mask_score(box.expand(2, -1, -1), box.expand(2, -1, -1), torch.cat([sure, unsure]),
                                   box.expand(2, -1, -1))
    assert plain.tolist() == [1] and refined.tolist() == pytest.approx([1, 1 - 0.8 / 2])


def test_mask_score_is_deterministic(world):
    """The same scores on a rerun and with other batch sizes (batches differ across ranks and resumes)."""
    net = predictor.build_nets(predictor.load_checkpoint(str(world / "tiny.pt")), "task", "cpu")
    src = json.loads((world / "boxes.json").read_text())
    images = [im for im in src["images"] if im["id"] <= 7]
    todo = {im["id"]: [a for a in src["annotations"] if a["image_id"] == im["id"] and a["id"] < 100]
            for im in images}
    settings = recipes.LabelSettings(crf_refine=True, crf_iters=3, crf_size=16)
    runs = [predictor.label_dataset(net, images, todo, str(world / "img"), "cpu", settings, batch_size=b)
            for b in (4, 4, 1, 32)]
    scores = [{a: r["mask_score"] for a, r in res.items()} for res in runs]
    assert len(scores[0]) == 14 and all(s == scores[0] for s in scores)
    assert len(set(scores[0].values())) > 1  # the scores tell the masks apart: no constant to agree on


@pytest.mark.parametrize("crf", [0, 5])
def test_mask_score_ranks_oracle_masks_by_iou(tmp_path, crf):
    H, W = 80, 96
    obj = disc(H, W, 40, 40, 20)
    pix = np.full((H, W, 3), 128, np.uint8)
    pix[obj] = (255, 0, 0)
    Image.fromarray(pix).save(tmp_path / "a.png")
    images = [dict(id=7, file_name="a.png", width=W, height=H)]
    todo = {7: [dict(id=1, bbox=bbox(obj))]}
    got = {}
    for net in (Oracle(), Spill(), Half()):
        settings = recipes.LabelSettings(crf_refine=crf > 0, crf_iters=crf, crf_size=32)
        r = predictor.label_dataset(net, images, todo, str(tmp_path), "cpu", settings)[1]
        m = mask_utils.decode(coco.to_bytes(r["segmentation"])).astype(bool)
        got[type(net).__name__] = (r["mask_score"], (m & obj).sum() / (m | obj).sum())
    (s_perfect, iou_perfect), (s_spill, iou_spill), (s_half, iou_half) = (got["Oracle"], got["Spill"],
                                                                          got["Half"])
    assert iou_perfect > 0.95 and 0.7 < iou_spill < 0.85 and 0.4 < iou_half < 0.6  # the cases are what
                                                                                   # they say
    assert s_perfect > 0.9 and s_perfect > s_spill > s_half  # a sure mask that fits its box scores near 1


def test_predictor_gives_label_py_s_masks(world, tmp_path):
    """predict(image, boxes) and label.py give the same RLE for the same boxes (one image a chunk, so
    that label.py's batches hold the same crops), also with the flip and the CRF refinement."""
    src = json.loads((world / "boxes.json").read_text())
    src["images"] = [im for im in src["images"] if im["id"] in (2, 3)]
    src["annotations"] = [a for a in src["annotations"] if a["image_id"] in (2, 3)]
    (tmp_path / "two.json").write_text(json.dumps(src))
    torch.manual_seed(1)
    net = mal.MAL(**TINY)
    with torch.no_grad():  # louder logits than the random initialisation's: masks with structure
        for q in net.decoder.parameters():
            q.mul_(6)
    ckpt = tmp_path / "loud.pt"
    torch.save(dict(model_args=TINY, task=net.state_dict(), teacher=net.state_dict(), args={}), ckpt)
    for flags, kw in (([], {}), (["--flip", "--crf-refine", "--thr", "0.45", "--recipe", "crf_iters=4",
                                  "crf_size=16"],
                                 dict(flip=True, crf_refine=True, crf_iters=4, crf_size=16, thr=0.45))):
        out = tmp_path / f"labels{len(flags)}.json"
        argv = label_argv(world, out, "--chunk-images", "1", "--batch-size", "32", *flags)
        argv[argv.index("--json") + 1], argv[argv.index("--ckpt") + 1] = str(tmp_path / "two.json"), str(ckpt)
        label.main(argv)
        labeled = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
        p = predictor.Predictor(str(ckpt), device="cpu", **kw)
        for im in src["images"]:
            anns = [a for a in src["annotations"] if a["image_id"] == im["id"]]
            image = np.asarray(Image.open(world / "img" / im["file_name"]).convert("RGB"))
            masks, scores = p.predict(image, [coco.xywh_to_xyxy(a["bbox"]) for a in anns])
            assert masks.shape == (len(anns), im["height"], im["width"]) and masks.dtype == bool
            assert 0 < masks.sum() < sum(a["bbox"][2] * a["bbox"][3] for a in anns)  # neither empty nor
                                                                                     # the boxes
            for a, m, s in zip(anns, masks, scores):
                assert (coco.encode(m) == labeled[a["id"]]["segmentation"]
                        and round(float(s), 4) == labeled[a["id"]]["mask_score"])
    with pytest.raises(util.InputError, match=r"boxes\[1\] = \[5.0, 5.0, 5.0, 9.0\]: "):
        p.predict(image, [[1, 1, 9, 9], [5, 5, 5, 9]])
    with pytest.raises(util.InputError, match="an H×W×3 uint8 array"):
        p.predict(image.astype(np.float32), [[1, 1, 9, 9]])
    with pytest.raises(TypeError, match="unknown label settings"):
        predictor.Predictor(str(world / "tiny.pt"), threshold=0.5)
