"""LLMRec: LightGCN with LLM-derived side features and masked feature reconstruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.models.lightgcn import LightGCN


def scaled_cosine_error(x: Tensor, y: Tensor, gamma: float = 2.0, weights: Tensor | None = None) -> Tensor:
    r"""GraphMAE's scaled cosine error (Hou et al., KDD 2022, eq. 3), the (weighted) mean over rows.

    .. math::
        \mathcal{L}_{SCE} = \frac{\sum_{i} w_i \bigl(1 - \cos(x_i, y_i)\bigr)^{\gamma}}{\sum_i w_i}

    Args:
        x: (n, F) reconstructions.
        y: (n, F) targets.
        gamma: the sharpening exponent :math:`\gamma \ge 1`.
        weights: (n,) row weights, e.g. 0/1 for rows that are no target; ``None``: all 1.

    Returns:
        () loss; 0 when there are no rows or the weights sum to 0.
    """
    errors = (1 - F.cosine_similarity(x, y, dim=-1)).pow(gamma)  # (n,)
    if weights is None:
        weights = torch.ones_like(errors)
    return (errors * weights).sum() / weights.sum().clamp(min=1e-12)


class LLMRec(LightGCN):
    r"""LLMRec's recommender (Wei et al., WSDM 2024) on the LightGCN backbone.

    Wei, Ren, Tang, Wang, Su, Cheng, Wang, Yin, Huang. "LLMRec: Large Language Models with Graph
    Augmentation for Recommendation". WSDM 2024. https://arxiv.org/abs/2311.00423

    Side features -- embedded LLM-written user profiles :math:`f_u` and item attributes
    :math:`f_i` (:class:`~recsys.llm.augment.Augmentation`, set with :meth:`set_features`) -- are
    projected to the embedding size, propagated over the same graph as the ID embeddings and
    added, normalised, to them (the paper's eq. 6 with one weight :math:`\omega_1` for both):

    .. math::
        \mathbf{S}^{(0)} = \begin{pmatrix} f_U W_u + b_u \\ f_I W_i + b_i \end{pmatrix}, \qquad
        \mathbf{S} = \frac{1}{K+1} \sum_{k=0}^{K} \hat{A}^k \mathbf{S}^{(0)}, \qquad
        \mathbf{h}_v = \mathbf{e}_v + \omega_1 \frac{\mathbf{s}_v}{\lVert \mathbf{s}_v \rVert_2}

    with :math:`\mathbf{e}_v` LightGCN's layer-mean ID embedding, and :math:`\hat{y}_{ui} =
    \mathbf{h}_u^\top \mathbf{h}_i`. Users or items whose text fell back have zero features (their
    projection is the bias).

    *Feature enhancement* (the paper's sec. 3.3.2, as a masked autoencoder): in training, a fresh
    ``mask_ratio`` of the items' feature rows is replaced by a learned mask token before the
    projection; the propagated side embeddings of those items are decoded back to feature space
    and compared with the true features by :func:`scaled_cosine_error` (items without text are
    not scored) (:meth:`training_embeddings`).
    The masked features also feed the training scores, as in the paper's released code; evaluation
    uses every item's true features.

    ``feature_weight = 0`` is plain LightGCN (the side branch is skipped; the no-feature ablation).

    Args:
        num_users (int): number of users U.
        num_items (int): number of items I.
        feature_dim (int, default 384): size F of the side features (all-MiniLM-L6-v2: 384).
        embedding_dim (int, default 64): size d of the embeddings.
        num_layers (int, default 3): propagation depth K.
        init_std (float, default 0.1): std of the ID embeddings' normal initialisation.
        feature_weight (float, default 0.5): :math:`\omega_1`, the weight of the normalised side embedding.
        mask_ratio (float, default 0.1): fraction of item feature rows masked per training step (0: none).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dim: int = 384,
        embedding_dim: int = 64,
        num_layers: int = 3,
        init_std: float = 0.1,
        feature_weight: float = 0.5,
        mask_ratio: float = 0.1,
    ):
        super().__init__(num_users, num_items, embedding_dim, num_layers, init_std)
        if feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.feature_weight, self.mask_ratio = feature_weight, mask_ratio
        self.user_proj = nn.Linear(feature_dim, embedding_dim)
        self.item_proj = nn.Linear(feature_dim, embedding_dim)
        self.mask_token = nn.Parameter(torch.zeros(feature_dim))
        self.decoder = nn.Linear(embedding_dim, feature_dim)
        for layer in (self.user_proj, self.item_proj, self.decoder):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        # data, not parameters: set from the augmentation file at setup (not in checkpoints)
        self.register_buffer("user_features", torch.zeros(num_users, feature_dim), persistent=False)
        self.register_buffer("item_features", torch.zeros(num_items, feature_dim), persistent=False)

    @property
    def uses_features(self) -> bool:
        return self.feature_weight > 0

    def set_features(self, user_features: Tensor, item_features: Tensor) -> None:
        """Set the side features (and drop any cached propagation).

        Args:
            user_features: (U, F) profile embeddings.
            item_features: (I, F) attribute embeddings.

        Raises:
            ValueError: on shapes other than (U, F) and (I, F).
        """
        for name, given, buffer in (
            ("user", user_features, self.user_features),
            ("item", item_features, self.item_features),
        ):
            if given.shape != buffer.shape:
                raise ValueError(
                    f"{name} features have shape {tuple(given.shape)}; expected {tuple(buffer.shape)}"
                )
            if not torch.isfinite(given).all():
                raise ValueError(f"{name} features hold NaN or infinite values")
            buffer.copy_(given)
        self._cache = None

    def _cache_key(self) -> tuple[int, ...]:
        return (*super()._cache_key(), self.user_features._version, self.item_features._version)

    def _node_table(self) -> Tensor:
        if not self.uses_features:
            return super()._node_table()
        return self._fused(self.item_features)[0]

    def _fused(self, item_features: Tensor) -> tuple[Tensor, Tensor]:
        """ID and side embeddings propagated together: ((N, d) fused table, (N, d) side table)."""
        d = self.embedding.weight.shape[1]
        side = torch.cat([self.user_proj(self.user_features), self.item_proj(item_features)])  # (N, d)
        both = self.layer_mean(torch.cat([self.embedding.weight, side], 1))  # (N, 2d): one propagation
        ids, side = both[:, :d], both[:, d:]
        return ids + self.feature_weight * F.normalize(side, dim=1), side

    def training_embeddings(self) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings for one training step, with a fresh feature mask, and the reconstruction loss.

        Returns:
            ((U, d) users, (I, d) items, () scaled cosine error on the masked items; 0 without
            features or masking).
        """
        if not self.uses_features:
            users, items = self.propagate()
            return users, items, users.new_zeros(())
        n_mask = int(self.mask_ratio * self.num_items)
        draw = torch.rand(self.num_items, device=self.item_features.device)  # (I,)
        masked = torch.topk(draw, n_mask, sorted=False).indices  # (M,) a uniform random subset
        features = self.item_features.index_put((masked,), self.mask_token.expand(n_mask, -1))  # (I, F)
        table, side = self._fused(features)
        targets = self.item_features[masked]  # (M, F)
        has_text = (targets.abs().sum(1) > 0).to(targets.dtype)  # (M,) items whose text fell back: 0
        rebuilt = self.decoder(side[self.num_users + masked])  # (M, F)
        loss = scaled_cosine_error(rebuilt, targets, weights=has_text)
        return table[: self.num_users], table[self.num_users :], loss
