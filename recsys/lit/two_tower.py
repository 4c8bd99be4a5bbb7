"""Two-tower training: in-batch softmax with logQ correction, plus feature-masking self-supervision."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from recsys.feature_masking import (
    correlated_feature_masking,
    feature_dropout,
    field_mutual_information,
    random_feature_masking,
)
from recsys.lit.evaluation import EvaluatedRecommender
from recsys.models.two_tower import StreamingFrequency, TwoTower, in_batch_softmax_loss, info_nce
from retrieval.eval.topk_evaluator import TopKEvaluator

MASKINGS = ("cfm", "rfm", "dropout")
SSL_ITEMS = ("batch", "uniform")


class TwoTowerRecommender(EvaluatedRecommender):
    r"""Trains a :class:`~recsys.models.two_tower.TwoTower` on positive (user, item) pairs.

    Yao et al., "Self-supervised Learning for Large-scale Item Recommendations", CIKM 2021,
    https://arxiv.org/abs/2007.12865 (eq. 5): the main in-batch softmax with the logQ correction
    (:func:`~recsys.models.two_tower.in_batch_softmax_loss`, item probabilities estimated by
    :class:`~recsys.models.two_tower.StreamingFrequency`) plus ``ssl_weight`` :math:`\alpha` times
    the InfoNCE between two masked views of items' features:

    .. math::
        \mathcal{L} = \mathcal{L}_{main} + \alpha \, \mathcal{L}_{self}

    The views are drawn per example from ``masking``: ``cfm`` (correlated feature masking, groups
    from the mutual information of the item fields in the training data), ``rfm`` (random) or
    ``dropout`` (feature dropout, ``dropout_rate``). The SSL items are the batch's
    (``ssl_items="batch"``, the main task's popularity-skewed distribution) or drawn uniformly
    over the catalogue without replacement (``"uniform"``, the paper's choice). The negatives in
    the datamodule's batches are not used: the batch's other items are the negatives.

    ``net`` is a partial of :class:`~recsys.models.two_tower.TwoTower` called at setup with the
    datamodule's field vocabularies (``user_table`` / ``item_table``); the feature ids of every
    user and item go to the net for full-sort evaluation.

    Args:
        net: partial of ``TwoTower`` (everything but the vocabulary sizes).
        optimizer: partial of a torch optimizer, called with the parameters.
        evaluator: the shared top-K evaluator.
        extra_evaluators: protocol name -> evaluator.
        temperature: the main softmax's temperature.
        ssl_weight: :math:`\alpha` (0: no self-supervision).
        masking: ``cfm``, ``rfm`` or ``dropout``.
        ssl_items: ``batch`` or ``uniform``.
        ssl_temperature: the InfoNCE temperature.
        dropout_rate: per-view field dropout rate for ``masking="dropout"``.
        frequency_alpha: learning rate of the streaming item-frequency estimate.
    """

    batch_kind = "pairwise"

    def __init__(
        self,
        net: Callable[..., TwoTower],
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        extra_evaluators: Mapping[str, TopKEvaluator] | None = None,
        temperature: float = 0.05,
        ssl_weight: float = 0.0,
        masking: str = "cfm",
        ssl_items: str = "uniform",
        ssl_temperature: float = 0.1,
        dropout_rate: float = 0.1,
        frequency_alpha: float = 0.01,
    ):
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; choose from {MASKINGS}")
        if ssl_items not in SSL_ITEMS:
            raise ValueError(f"unknown ssl_items {ssl_items!r}; choose from {SSL_ITEMS}")
        if ssl_weight < 0 or temperature <= 0 or ssl_temperature <= 0:
            raise ValueError("ssl_weight must be >= 0 and the temperatures > 0")
        super().__init__(evaluator, extra_evaluators)
        self.save_hyperparameters(logger=False, ignore=["net", "evaluator", "extra_evaluators", "optimizer"])
        self.net_factory, self.optimizer_factory = net, optimizer
        self.net: TwoTower | None = None
        self.frequency = StreamingFrequency(alpha=frequency_alpha)
        self.generator = torch.Generator()

    def setup(self, stage: str) -> None:
        """Build the net from the datamodule's field vocabularies; hand it every row's features."""
        self.check_batches(stage)
        dm = self.trainer.datamodule
        users, items = getattr(dm, "user_table", None), getattr(dm, "item_table", None)
        if users is None or items is None:
            raise ValueError(
                "the two-tower model needs user and item features: set data.user_features and "
                "data.item_features (e.g. data=ml1m_features)"
            )
        if self.net is None:
            self.net = self.net_factory(users.vocab_sizes, items.vocab_sizes)
        self.net.set_features(users.fields, items.fields)
        codes = torch.stack([f[:, 0] for f in items.fields], 1)  # (I, F): each field's first value
        self.register_buffer("item_mi", field_mutual_information(codes), persistent=False)
        self.generator.manual_seed(int(torch.initial_seed()) % (1 << 62))

    def views(self, num_fields: int, num_examples: int) -> tuple[Tensor, Tensor]:
        """Two (B, F) keep-masks of the item fields, drawn per example by ``masking``."""
        if self.hparams.masking == "cfm":
            return correlated_feature_masking(self.item_mi.cpu(), self.generator, num_examples)
        if self.hparams.masking == "rfm":
            return random_feature_masking(num_fields, self.generator, num_examples)
        return feature_dropout(num_fields, self.hparams.dropout_rate, self.generator, num_examples)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        users, items = batch["users"], batch["pos"]  # (B,), (B,)
        self.frequency.update(items, self.global_step + 1)
        query = self.net.encode_queries(self.net.features("user", users))  # (B, d)
        item = self.net.encode_items(self.net.features("item", items))  # (B, d)
        loss = in_batch_softmax_loss(
            query, item, self.frequency.log_probability(items), self.hparams.temperature, items
        )
        if self.hparams.ssl_weight > 0:
            loss = loss + self.hparams.ssl_weight * self.ssl_loss(items)
        self._accumulate_loss(loss.detach(), users.numel(), batch_idx)
        return loss

    def ssl_loss(self, items: Tensor) -> Tensor:
        """InfoNCE between two masked views of the SSL items (the batch's, or uniform ones): ()."""
        if self.hparams.ssl_items == "uniform":
            items = self.uniform_items(items.numel(), items.device)
        fields = self.net.features("item", items)
        keep_a, keep_b = (m.to(items.device) for m in self.views(len(fields), items.numel()))
        view_a = self.net.encode_items(fields, keep_a)  # (B, d)
        view_b = self.net.encode_items(fields, keep_b)  # (B, d)
        return info_nce(view_a, view_b, self.hparams.ssl_temperature)

    def uniform_items(self, count: int, device: torch.device) -> Tensor:
        """(min(count, I),) distinct item ids drawn uniformly over the catalogue.

        Distinct, because a repeated item would be its own negative in the InfoNCE.
        """
        num_items = self.net.features("item")[0].shape[0]
        return torch.randperm(num_items, generator=self.generator)[:count].to(device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.parameters())
