"""objective.py: what the training objective adds to the paper's, each reducing to the paper at its
paper value; the flood on a C-shaped object whose concavity the paper's CRF keeps filled, and on a
soft-edged nucleus it would shrink."""
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

import mal
import objective
import recipes
from test_mal import two_colour_case


def test_ramps_and_loss_weights():
    assert objective.ramp(0, 1000) == pytest.approx(0.001) and objective.ramp(999, 1000) == 1.0
    assert objective.ramp(5, 0) == 1.0
    cfg = recipes.LossConfig(mil_ramp=10, crf_ramp=20)
    assert objective.loss_weights(0, cfg) == pytest.approx((0.4, 0.025))
    assert objective.loss_weights(19, cfg) == (4.0, 0.5)
    image, prob, box = two_colour_case()
    logits = torch.randn(1, 8, 8)
    _, t0 = objective.loss(logits, logits, image, box, 0, dataclasses.replace(cfg, loss_size=32, crf_iters=1))
    torch.testing.assert_close(t0["loss"], 0.4 * t0["mil"] + 0.025 * t0["crf"])


def test_the_paper_config_is_mal_loss_exactly():
    """Past the ramps, objective.loss under LossConfig.paper() is mal.mal_loss, bit for bit, whatever the
    recipe's τ, CRF size and flood were; with them it is not."""
    image, prob, box = two_colour_case()
    g = torch.Generator().manual_seed(1)
    logits, t_logits = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    demo = dataclasses.replace(recipes.DEMO["loss"], loss_size=32, crf_iters=20, tau=0.3, crf_size=16)
    ours, _ = objective.loss(logits, t_logits, image, box, 10 ** 6, demo)
    paper, _ = objective.loss(logits, t_logits, image, box, 10 ** 6, demo.paper())
    ref, _ = mal.mal_loss(logits, t_logits, image, box, loss_size=32, crf_iters=20)
    assert torch.equal(paper, ref) and not torch.equal(ours, ref)


def _c_shape_case(S=32):
    """A C-shaped object (colour 2) open to the right on a uniform background (0); the network's mask is
    its filled box. Returns image, prob, box, C mask, pocket mask (the background the C encloses)."""
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r = ((yy - 16) ** 2 + (xx - 16) ** 2).float().sqrt()
    c = (r < 11) & (r > 6) & ~((xx > 16) & ((yy - 16).abs() < 5))
    image = torch.zeros(1, 3, S, S)
    image[:, :, c] = 2.0
    ys, xs = torch.nonzero(c, as_tuple=True)
    box = torch.zeros(1, S, S)
    box[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    prob = torch.where(box > 0, 0.95, 0.05)
    opening = (xx > 16) & ((yy - 16).abs() < 5) & (r < 11)
    return image, prob, box, c, ((r <= 6) | opening) & (box[0] > 0)


def test_a_weak_unary_floods_the_box_outside_into_concavities():
    """τ = 1 (the paper's CRF) keeps the confidently filled concavity of a C; a weak unary with ω near
    critical carves it (the outside of the box floods the background it touches) and keeps the C."""
    image, prob, box, c, pocket = _c_shape_case()
    paper = mal.refine(image, prob, box, iters=100, zeta=0.5, omega=2.0)[0] > 0.5
    assert paper[pocket].all() and paper[c].all()
    weak = torch.sigmoid(1e-4 * torch.logit(prob.double())).float()
    torch.testing.assert_close(objective.weak_unary(prob, 1e-4), weak)
    flood = mal.refine(image, weak, box, iters=1000, zeta=0.3, omega=0.25)[0] > 0.5
    assert not flood[pocket].any() and flood[c].all()
    # The labels at crf_size 16 are computed at 16 px and resized back.
    cfg = recipes.LossConfig(crf_iters=1000, zeta=0.3, omega=0.25, tau=1e-4)
    assert torch.equal(objective.crf_labels(prob, image, box, cfg)[0], flood)
    small_img, small_box = mal.crop_to_loss_size(image, box, 16)
    small_p = objective.weak_unary(F.interpolate(prob[:, None], size=16, mode="area")[:, 0], 1e-4)
    q = mal.refine(small_img, small_p, small_box, iters=1000, zeta=0.3, omega=0.25)
    labels = F.interpolate(q[:, None], size=32, mode="bilinear", align_corners=False)[:, 0] > 0.5
    assert torch.equal(objective.crf_labels(prob, image, box, dataclasses.replace(cfg, crf_size=16)), labels)


def test_opening_keeps_only_what_is_thick_enough():
    m = torch.zeros(1, 20, 20, dtype=torch.bool)
    m[0, 2:4, :] = True  # a band 2 px wide
    m[0, 8:15, 5:12] = True  # a 7 × 7 block
    m[0, 16:20, 0:4] = True  # a 4 × 4 block at the border
    kept = objective.opening(m, 2)
    # A 5 × 5 square fits in the 7 × 7 block, and in the 4 × 4 one only because the crop's edge
    # does not erode.
    assert kept[0, 8:15, 5:12].all() and kept[0, 16:20, 0:4].all() and kept.sum() == 49 + 16
    one = objective.opening(m, 1)
    assert not one[0, 2:4].any() and one[0, 8:15, 5:12].all() and one[0, 16:20, 0:4].all()


def test_the_flood_takes_the_thick_pieces_of_what_it_floods():
    """With a flood, the labels are the paper's minus the parts of the flood's removals that survive an
    opening: the C's pocket goes (the box's outside reaches it), the C stays."""
    image, prob, box, c, pocket = _c_shape_case()
    cfg = recipes.LossConfig(flood=recipes.Flood(size=32, open_radius=2))
    paper = mal.refine(image, prob, box, iters=100, zeta=0.5, omega=2.0) > 0.5
    flooded = mal.refine(image, objective.weak_unary(prob, 1e-4), box, iters=1000, zeta=0.3, omega=0.25) > 0.5
    labels = paper & ~objective.opening(paper & ~flooded, 2)
    assert not labels[0][pocket & (objective.opening(pocket[None], 2)[0])].any() and labels[0][c].all()
    assert torch.equal(objective.crf_labels(prob, image, box, cfg), labels)
    with_flood = mal.crf_loss(prob, prob, image, box, lambda *a: objective.crf_labels(*a, cfg))
    assert with_flood > 0.1 > mal.crf_loss(prob, prob, image, box)


def _soft_nucleus_case(S=48):
    """A nucleus fading into a dark background (brightness a Gaussian of σ 10 px), drawn as the disc of
    radius 17 px, which is also the network's mask. Returns image, prob, box, the disc."""
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r2 = ((yy - 23.5) ** 2 + (xx - 23.5) ** 2).float()
    disc = r2 < 17 ** 2
    image = (2.5 * torch.exp(-r2 / 200))[None, None].expand(1, 3, S, S).clone()
    ys, xs = torch.nonzero(disc, as_tuple=True)
    box = torch.zeros(1, S, S)
    box[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    return image, torch.where(disc, 0.9, 0.1)[None], box, disc


def _emptied_bags(before, after, box):
    """How many rows and columns crossing the box `before` fills and `after` leaves empty."""
    rows, cols = box[0].bool().any(1), box[0].bool().any(0)
    return int((rows & before.any(1) & ~after.any(1)).sum() + (cols & before.any(0) & ~after.any(0)).sum())


def test_the_flood_keeps_the_mil_bags():
    """Around a soft-edged nucleus the flood eats a thick ring and leaves the rows and columns at the
    box's sides empty; with keep_bags (the default) such a crop keeps the paper's labels, while the
    C's pocket, which empties no bag, is still taken."""
    image, prob, box, disc = _soft_nucleus_case()
    cfg = recipes.LossConfig(loss_size=48, flood=recipes.Flood())
    paper = objective.crf_labels(prob, image, box, cfg.paper())
    without = dataclasses.replace(cfg, flood=recipes.Flood(keep_bags=False))
    eaten = objective.crf_labels(prob, image, box, without)
    assert torch.equal(paper[0], disc) and eaten.sum() < 0.5 * disc.sum()
    assert _emptied_bags(paper[0], eaten[0], box) > 10
    assert torch.equal(objective.crf_labels(prob, image, box, cfg), paper)
    image, prob, box, c, pocket = _c_shape_case()
    small = dataclasses.replace(cfg, loss_size=32, flood=recipes.Flood(size=32))
    kept = objective.crf_labels(prob, image, box, small)
    assert kept[0][c].all() and not kept[0][pocket & objective.opening(pocket[None], 2)[0]].any()


def test_empties_a_bag():
    """A bag is a row or column crossing the box; it counts only where `before` fills it."""
    box = torch.zeros(2, 8, 8)
    box[:, 2:6, 1:7] = 1
    before = box > 0
    before[1, 5] = False  # crop 1: row 5 is empty already
    after = before.clone()
    after[:, 5, :] = False  # empties row 5
    after[:, 0, 0] = True  # a pixel outside the box fills no bag
    assert objective.empties_a_bag(before, after, box).tolist() == [True, False]
    after[:, 2:6, 6] = False  # and column 6, in both
    assert objective.empties_a_bag(before, after, box).tolist() == [True, True]


def test_a_bag_within_the_margin_does_not_count():
    """The last two rows of a box emptied (a clipped tip): within a margin of 2, not emptied; with 1,
    the last row is still out of reach; a column 3 pixels from what is kept counts with a margin of 2."""
    box = torch.zeros(1, 12, 12)
    box[:, 2:10, 2:10] = 1
    before = box > 0
    after = before.clone()
    after[:, 8:10] = False
    assert objective.empties_a_bag(before, after, box).tolist() == [True]
    assert objective.empties_a_bag(before, after, box, margin=2).tolist() == [False]
    assert objective.empties_a_bag(before, after, box, margin=1).tolist() == [True]
    after[:, :, 7:10] = False
    assert objective.empties_a_bag(before, after, box, margin=2).tolist() == [True]


def test_dilation_and_opening():
    """dilation reaches r pixels in x and y; opening keeps what a (2r+1)² square fits in, and the crop's
    edge does not erode it."""
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 4, 4] = True
    square = torch.zeros(9, 9, dtype=torch.bool)
    square[2:7, 2:7] = True
    assert torch.equal(objective.dilation(m, 2)[0], square)
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, :5, :5] = True  # a 5 × 5 square at the corner
    m[0, 7, :] = True  # a 1-px line
    expect = m.clone()
    expect[0, 7] = False
    assert torch.equal(objective.opening(m, 2), expect)
    m[0, 2, 2] = False  # a hole at its centre: no 5 × 5 square fits
    assert not objective.opening(m, 2).any()


def test_the_flood_composition(monkeypatch):
    """labels = paper & ~opening(paper & ~flooded): a thin band the flood eats along the rim stays
    labeled, a thick piece it takes goes, and nothing the paper's labels lack comes in."""
    paper = torch.zeros(1, 24, 24, dtype=torch.bool)
    paper[0, 2:22, 2:22] = True
    flooded = paper.clone()
    flooded[0, 2:22, 2:4] = False  # a 2-px band along the rim
    flooded[0, 8:16, 12:22] = False  # an 8 × 10 pocket
    flooded[0, 0, 0] = True  # outside the paper's labels
    calls = iter([paper, flooded])
    monkeypatch.setattr(objective, "mean_field_labels", lambda *a, **k: next(calls))
    expect = paper.clone()
    expect[0, 8:16, 12:22] = False
    got = objective.crf_labels(torch.rand(1, 24, 24), torch.zeros(1, 3, 24, 24), torch.ones(1, 24, 24),
                               recipes.LossConfig(flood=recipes.Flood(open_radius=2)))
    assert torch.equal(got, expect)


def test_recipe_items_set_the_loss_and_the_run():
    loss, run = recipes.read_recipe(["tau=0.3", "crf_size=24", "flood.iters=50", "theta=1.0",
                                     "keep_epochs=1"], recipes.LossConfig(), recipes.RUN_SETTINGS)
    assert (loss.tau, loss.crf_size, loss.flood) == (0.3, 24, recipes.Flood(iters=50))
    off = recipes.read_recipe(["flood.keep_bags=off"], loss, {})[0].flood
    assert off == recipes.Flood(iters=50, keep_bags=False)
    no_margin = recipes.read_recipe(["flood.bag_margin=0"], loss, {})[0].flood
    assert no_margin == recipes.Flood(iters=50, bag_margin=0)
    assert run["theta"] == 1.0 and run["keep_epochs"] is True and run["weight_decay"] == 0.05
    assert recipes.read_recipe(["flood=off", "crf_size=none"], recipes.DEMO["loss"], {})[0].flood is None
    for bad, why in (("tua=0.3", "tua=0.3: unknown setting (known: theta"), ("tau", "tau: not KEY=VALUE"),
                     ("tau=x", "tau=x: could not convert"), ("theta=x", "theta=x: theta takes a float"),
                     ("flood=yes", "flood=yes: on or off"),
                     ("flood.keep_bags=1", "flood.keep_bags=1: on or off")):
        with pytest.raises(ValueError, match="^" + re.escape(why)):
            recipes.read_recipe([bad], recipes.LossConfig(), recipes.RUN_SETTINGS)
    # recipe_items says a config as the items that give it
    items = recipes.recipe_items(dict(val_max_images=60, loss=recipes.DEMO["loss"]))
    assert recipes.read_recipe(items, recipes.LossConfig(), recipes.RUN_SETTINGS)[0] == recipes.DEMO["loss"]
