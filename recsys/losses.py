"""Recommendation losses as small cited functions."""

from __future__ import annotations

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
