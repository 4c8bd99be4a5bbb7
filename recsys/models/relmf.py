r"""Rel-MF: matrix factorisation trained with the unbiased estimator of the ideal pointwise loss.

Saito, Yaginuma, Nishino, Sakata, Nakata. "Unbiased Recommender Learning from Missing-Not-At-Random
Implicit Feedback". WSDM 2020. https://arxiv.org/abs/1909.03601 (code: usaito/unbiased-implicit-rec-real)

Clicks :math:`Y_{ui} = O_{ui} R_{ui}` (exposure times relevance); the ideal loss is over relevance,

.. math::
    \mathcal{L}_{ideal} = \frac{1}{|D|} \sum_{u,i} \left[ \gamma_{ui} \delta^{(1)}(\hat{y}_{ui})
        + (1 - \gamma_{ui}) \delta^{(0)}(\hat{y}_{ui}) \right], \qquad \gamma_{ui} = P(R_{ui} = 1),

and its unbiased estimator from clicks (eq. 5), with propensities :math:`\theta_{ui} = P(O_{ui} = 1)`,

.. math::
    \hat{\mathcal{L}}_{unbiased} = \frac{1}{|D|} \sum_{u,i} \left[
        \frac{Y_{ui}}{\theta_{ui}} \delta^{(1)}(\hat{y}_{ui})
        + \left(1 - \frac{Y_{ui}}{\theta_{ui}}\right) \delta^{(0)}(\hat{y}_{ui}) \right]

(:math:`E_O[Y/\theta] = \gamma`). The clipped estimator (eq. 7) uses :math:`\max(\theta, M)`
(:mod:`recsys.propensity`); :math:`\theta = 1` gives the naive loss, i.e. plain pointwise MF.
Two forms of :math:`\delta`, named in the config:

* ``log`` (the paper's equations): :math:`\delta^{(1)} = -\log \sigma(\hat{y})`,
  :math:`\delta^{(0)} = -\log(1 - \sigma(\hat{y}))`. With :math:`Y/\theta > 1` the weight of
  :math:`\delta^{(0)}` is negative and unbounded below: clip, or use ``squared``;
* ``squared`` (the released code): :math:`\delta^{(1)} = (1 - \sigma(\hat{y}))^2`,
  :math:`\delta^{(0)} = \sigma(\hat{y})^2`.

The scorer is plain MF, :math:`\hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("log", "squared")


def relmf_loss(logits: Tensor, clicks: Tensor, propensity: Tensor, loss: str = "log") -> Tensor:
    r"""The inverse-propensity estimator of the ideal pointwise loss (mean over the pairs).

    Args:
        logits: (B,) scores :math:`\hat{y}`.
        clicks: (B,) 0/1 clicks :math:`Y`.
        propensity: (B,) :math:`\theta`, used where :math:`Y = 1` only (a 0/0 is never formed).
        loss: ``"log"`` or ``"squared"`` (see the module docstring).

    Returns:
        () loss.
    """
    weight = torch.where(clicks > 0, clicks / propensity, torch.zeros_like(clicks))  # (B,) Y / theta
    if loss == "log":
        pos, neg = F.softplus(-logits), F.softplus(logits)  # -log sigma(y), -log(1 - sigma(y))
    elif loss == "squared":
        p = torch.sigmoid(logits)
        pos, neg = (1 - p) ** 2, p**2
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return (weight * pos + (1 - weight) * neg).mean()


class RelMF(nn.Module):
    """Matrix factorisation whose :meth:`loss` is :func:`relmf_loss`.

    Args:
        num_users (int): number of users.
        num_items (int): number of items.
        embedding_dim (int, default 64): size of the latent vectors.
        init_std (float, default 0.01): standard deviation of the normal initialisation.
        loss (str, default "log"): ``"log"`` (the paper) or ``"squared"`` (its released code).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        init_std: float = 0.01,
        loss: str = "log",
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.num_users, self.num_items, self.loss_form = num_users, num_items, loss
        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        nn.init.normal_(self.user_embedding.weight, std=init_std)
        nn.init.normal_(self.item_embedding.weight, std=init_std)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """(B,) logits of the pairs ``(users[b], items[b])``; ``items`` (B, n) gives (B, n)."""
        u = self.user_embedding(users)  # (B, d)
        i = self.item_embedding(items)  # (B, d) or (B, n, d)
        return (u.unsqueeze(-2) * i).sum(-1) if items.dim() == 2 else (u * i).sum(-1)

    def score_all(self, users: Tensor) -> Tensor:
        """(B, num_items) logits of ``users`` against every item."""
        return self.user_embedding(users) @ self.item_embedding.weight.T

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """((num_users, d), (num_items, d)) tables whose dot products are :meth:`score_all`."""
        return self.user_embedding.weight, self.item_embedding.weight

    def ego_embeddings(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """The rows a batch touches, for the L2 penalty: (B, d) and (B, d) or (B, n, d)."""
        return self.user_embedding(users), self.item_embedding(items)

    def loss(self, users: Tensor, items: Tensor, clicks: Tensor, propensity: Tensor) -> Tensor:
        """() :func:`relmf_loss` of a batch of (user, item, click, propensity), (B,) each."""
        return relmf_loss(self(users, items), clicks, propensity, self.loss_form)
