"""Recommendation losses as small cited functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Bayesian Personalized Ranking loss (Rendle et al., UAI 2009, eq. 4).

    .. math::
        \mathcal{L} = -\frac{1}{B} \sum_{(u,i,j)} \ln \sigma(\hat{y}_{ui} - \hat{y}_{uj})

    Args:
        pos_scores: (B,) scores of observed items.
        neg_scores: (B,) scores of sampled unobserved items.

    Returns:
        () mean loss. ``softplus(-x)`` is the numerically stable ``-log sigmoid(x)``.
    """
    return F.softplus(neg_scores - pos_scores).mean()


def l2_penalty(*embeddings: Tensor) -> Tensor:
    r"""L2 regulariser on the embedding rows of a batch, averaged over the batch.

    .. math::
        \Omega = \frac{1}{2B} \sum_{e \in \text{batch}} \lVert e \rVert_2^2

    This is the per-batch form used by BPR-MF and LightGCN (He et al., SIGIR 2020, eq. 15),
    which only regularises the rows that the batch touches.

    Args:
        embeddings: tensors of shape (B, d) or (B, n, d); B is taken from the first.

    Returns:
        () penalty; multiply by the weight decay coefficient.
    """
    batch = embeddings[0].shape[0]
    return sum(e.pow(2).sum() for e in embeddings) / (2 * batch)


PRUNE_RULES = ("drop_high_loss", "keep_high_loss")


def prune_by_loss(
    losses: Tensor, prune_rate: float, rule: str = "drop_high_loss", valid: Tensor | None = None
) -> Tensor:
    r"""Which samples are kept after pruning a fraction :math:`\omega` of them by loss (LLMRec, eq. 8).

    Wei et al., "LLMRec: Large Language Models with Graph Augmentation for Recommendation",
    WSDM 2024, sec. 3.3.1 (noisy implicit feedback pruning): the :math:`N` samples are sorted by
    loss and :math:`\max(1, \lfloor N (1 - \omega) \rfloor)` of them are kept,

    .. math::
        \mathcal{K} = \mathrm{SortAscend}(\ell)[0 : N(1 - \omega)]

    * ``drop_high_loss`` -- the paper's rule: keep the lowest losses (the highest-loss samples
      are treated as noise);
    * ``keep_high_loss`` -- what the released code computes: it sorts :math:`\ln\sigma(\cdot)`, the
      negated loss, ascending, and so keeps the *highest* losses (with :math:`\omega = 0.71`).

    Fixed shapes and no host synchronisation (a CUDA graph can replay it): the result is a mask,
    and ``valid`` marks the samples that exist (:math:`N` = their count; none kept when 0).

    Args:
        losses: (N,) per-sample losses.
        prune_rate: :math:`\omega \in [0, 1)`; 0 keeps every valid sample.
        rule: ``drop_high_loss`` or ``keep_high_loss``.
        valid: (N,) bool, the samples that take part; ``None``: all.

    Returns:
        (N,) bool: the kept samples.
    """
    if rule not in PRUNE_RULES:
        raise ValueError(f"unknown prune rule {rule!r}; choose from {PRUNE_RULES}")
    if not 0 <= prune_rate < 1:
        raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
    valid = torch.ones_like(losses, dtype=torch.bool) if valid is None else valid
    if prune_rate == 0:
        return valid
    n_valid = valid.sum()  # () on the device
    keep = torch.clamp(torch.floor(n_valid.double() * (1 - prune_rate)), min=1)  # () as Python's int()
    highest = rule == "keep_high_loss"
    key = losses.detach().masked_fill(~valid, -torch.inf if highest else torch.inf)  # invalid sort last
    order = torch.argsort(key, descending=highest, stable=True)  # (N,)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return valid & (rank < keep)
