"""Matrix factorisation trained with Bayesian Personalized Ranking (BPR-MF)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrieval.eval.topk import topk_with_id_ties


class BPRMF(nn.Module):
    r"""Matrix factorisation for implicit feedback, trained with the BPR criterion.

    Rendle, Freudenthaler, Gantner, Schmidt-Thieme. "BPR: Bayesian Personalized Ranking
    from Implicit Feedback". UAI 2009. https://arxiv.org/abs/1205.2618

    The preference of user :math:`u` for item :math:`i` is the inner product of their
    latent vectors:

    .. math::
        \hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i

    and training minimises the BPR loss over sampled triples :math:`(u, i, j)` with
    :math:`i` observed and :math:`j` not (see :func:`recsys.losses.bpr_loss`).

    Args:
        num_users (int): number of users :math:`|U|`.
        num_items (int): number of items :math:`|I|`.
        embedding_dim (int, default 64): size :math:`d` of the latent vectors.
        init_std (float, default 0.01): standard deviation of the normal initialisation.
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64, init_std: float = 0.01):
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        nn.init.normal_(self.user_embedding.weight, std=init_std)
        nn.init.normal_(self.item_embedding.weight, std=init_std)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of user-item pairs.

        Args:
            users: (B,) int64 user ids.
            items: (B,) or (B, n) int64 item ids.

        Returns:
            (B,) or (B, n) float scores.
        """
        u = self.user_embedding(users)  # (B, d)
        i = self.item_embedding(items)  # (B, d) or (B, n, d)
        return (u.unsqueeze(-2) * i).sum(-1) if items.dim() == 2 else (u * i).sum(-1)

    def score_all(self, users: Tensor) -> Tensor:
        """Scores of a batch of users against every item.

        Args:
            users: (B,) int64 user ids.

        Returns:
            (B, num_items) float scores.
        """
        return self.user_embedding(users) @ self.item_embedding.weight.T

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """The user and item tables whose dot products are :meth:`score_all`'s scores.

        Returns:
            ((num_users, d), (num_items, d)) user and item embeddings.
        """
        return self.user_embedding.weight, self.item_embedding.weight

    @torch.no_grad()
    def recommend(self, users: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """The top-``k`` items for each user, best first, ties broken by lower item id.

        Args:
            users: (B,) int64 user ids.
            k: number of items to return.
            exclude: optional (B, num_items) bool mask of items never to recommend
                (e.g. the user's training items).

        Returns:
            (B, k) int64 item ids; ``-1`` pads a row with fewer than ``k`` candidates.
        """
        scores = self.score_all(users)  # (B, I)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return topk_with_id_ties(scores, k)[1]

    def ego_embeddings(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """The raw embedding rows used by an L2 penalty on the batch.

        Args:
            users: (B,) user ids.
            items: (B, n) or (B,) item ids.

        Returns:
            ((B, d), (..., d)) user and item embedding rows.
        """
        return self.user_embedding(users), self.item_embedding(items)
