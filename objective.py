"""The objective train.py minimises: the paper's Eq. 1-5 (mal.py) and what this implementation adds
to it, each a no-op at its paper value (recipes.LossConfig says which), each measured (QUALITY.md):

  ramp, loss_weights .... the MIL and CRF weights grow from 0 over their first steps, as the authors'
                          public code does (the paper's text is silent); the demo ramps over 50 and 100
  weak_unary ............ the CRF's unary weighted by τ (E = τ·μ + ψ, Eq. 3): below 1 colour edges
                          overrule the mask more. Label-time refinement with τ 0.3 measured +0.007 to
                          +0.013 mIoU over τ 1 on the demo sets; the flood runs at τ 1e-4
  mean_field_labels ..... the mean field at its own resolution (crf_size), cheaper than the loss's
  dilation, opening, .... the flood (recipes.Flood): the paper's labels fill the concavities of crescents
  crf_labels,             and L's; they lose what a flood of the box's outside reaches, in thick pieces,
  empties_a_bag           unless that would leave a MIL bag empty (a soft-edged object shrunk towards
                          its core): such a crop keeps the paper's labels. QUALITY.md has what each
                          part measured on every set, against the paper's CRF loss

objective.loss(..., cfg.paper()) is mal.mal_loss with the ramps: the paper's recipe is one flag away
(train.py --paper-loss).
"""
import functools

import torch
import torch.nn.functional as F

import mal


def ramp(step, length):
    """Linear loss-weight ramp to 1 over the first `length` steps (step counts from 0) (the public
    recipe ramps MIL over 1k, CRF over 4k)."""
    return 1.0 if length <= 0 else min(1.0, (step + 1) / length)


def loss_weights(step, cfg):
    """Eq. 1's weights at `step` under cfg, each ramped in: (w_mil, w_crf)."""
    return cfg.alpha_mil * ramp(step, cfg.mil_ramp), cfg.alpha_crf * ramp(step, cfg.crf_ramp)


def weak_unary(prob, tau):
    """The mask the mean field starts from and is pulled towards under a unary weighted by τ:
    sigmoid(τ·logit(prob)), which the pairwise term overrules more easily the smaller τ is."""
    if tau == 1.0:
        return prob
    with torch.no_grad():
        p = prob.clamp(1e-6, 1 - 1e-6)
        return torch.sigmoid(tau * (torch.log(p) - torch.log1p(-p)))


def dilation(mask, r):
    """Morphological dilation of a bool mask [B,H,W] by a (2r+1)² square: what lies within r pixels
    (in x and in y) of the mask."""
    return F.max_pool2d(mask.float()[:, None], 2 * r + 1, 1, r)[:, 0] > 0.5


def opening(mask, r):
    """Morphological opening of a bool mask [B,H,W] by a (2r+1)² square: the parts at least that thick
    (beyond the crop's edge counts as inside, so the edge does not erode)."""
    return dilation(~dilation(~mask, r), r)


def mean_field_labels(avg, image, box_mask, size, *, tau=1.0, **mf):
    """Hard labels (bool, at avg's resolution) of the mean field (mal.refine with options mf, unary
    weight τ) run at `size`: the image area-down, the box max-pooled, avg area-down, and Q resized
    back bilinearly."""
    S = avg.shape[-1]
    if size and size != S:
        image, box_mask = mal.crop_to_loss_size(image, box_mask, size)
        avg = F.interpolate(avg[:, None], size=(size, size), mode="area")[:, 0]
    q = mal.refine(image, weak_unary(avg, tau), box_mask, **mf)
    if q.shape[-1] != S:
        q = F.interpolate(q[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    return q > 0.5


def crf_labels(avg, image, box_mask, cfg):
    """Eq. 5's labels under cfg (a recipes.LossConfig): the mean field with τ at crf_size; then, with a
    flood, minus what a flood of the box's outside takes from them in pieces at least 2r + 1 pixels
    across: the concavities and gaps that the box's background reaches, not the thin bands it eats
    along soft edges; with keep_bags, a crop where that would empty a MIL bag, by more than bag_margin
    pixels, keeps the paper's labels.
    With τ = 1 (the paper) the mean field is a local majority vote that moves the mask's edges to
    nearby colour edges but keeps a region the network fills with confidence, such as the concavity of
    a crescent; the flood is what empties it."""
    labels = mean_field_labels(avg, image, box_mask, cfg.crf_size, tau=cfg.tau, iters=cfg.crf_iters,
                               zeta=cfg.zeta, omega=cfg.omega)
    f = cfg.flood
    if f is not None:
        flooded = mean_field_labels(avg, image, box_mask, f.size, tau=f.tau, iters=f.iters, zeta=f.zeta,
                                    omega=f.omega)
        kept = labels & ~opening(labels & ~flooded, f.open_radius)
        if f.keep_bags:
            emptied = empties_a_bag(labels, kept, box_mask, f.bag_margin)
            kept = torch.where(emptied[:, None, None], labels, kept)
        labels = kept
    return labels


def empties_a_bag(before, after, box_mask, margin=0):
    """Per crop: does `after` leave empty a MIL bag (a row or column crossing the box, Eq. 2) that
    `before` fills, and no pixel of `after` lies within `margin` rows or columns of it? (bool [B];
    masks [B,H,W])"""
    box = box_mask > 0.5
    after = dilation(after, margin) if margin else after
    rows, cols = box.any(2), box.any(1)
    return (rows & before.any(2) & ~after.any(2)).any(1) | (cols & before.any(1) & ~after.any(1)).any(1)


def loss(logits, teacher_logits, image, box_mask, step, cfg):
    """Eq. 1 at `step` under cfg (a recipes.LossConfig): mal.mal_loss with each weight ramped in and
    crf_labels' labels. Returns (loss, dict of detached terms)."""
    w_mil, w_crf = loss_weights(step, cfg)
    return mal.mal_loss(logits, teacher_logits, image, box_mask, alpha_mil=w_mil, alpha_crf=w_crf,
                        loss_size=cfg.loss_size, labels=functools.partial(crf_labels, cfg=cfg))
