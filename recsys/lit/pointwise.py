"""A thin LightningModule for recommenders trained with a pointwise loss over (user, item) pairs."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from recsys.lit.evaluation import EvaluatedRecommender
from recsys.losses import l2_penalty
from retrieval.eval.topk_evaluator import TopKEvaluator


class PointwiseRecommender(EvaluatedRecommender):
    """Trains ``net`` on batches of (user, item, click, propensity); evaluates by full sort.

    The recipe: loss = ``net.loss(users, items, clicks, propensity)`` + ``l2_weight`` · L2(batch
    embedding rows); validation and test as :class:`~recsys.lit.evaluation.EvaluatedRecommender`.
    ``net`` follows the recommender contract (``score_all``, ``ego_embeddings``, optionally
    ``embeddings``) and has a pointwise ``loss`` (e.g. :class:`~recsys.models.relmf.RelMF`).

    Args:
        net: the recommender (a plain ``nn.Module``).
        optimizer: partial of a torch optimizer, called with the parameters.
        evaluator: the shared top-K evaluator.
        extra_evaluators: protocol name -> evaluator, for datamodules with more protocols.
        l2_weight: coefficient of the L2 penalty on the batch's embedding rows.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        extra_evaluators: Mapping[str, TopKEvaluator] | None = None,
        l2_weight: float = 0.0,
    ):
        super().__init__(evaluator, extra_evaluators)
        self.save_hyperparameters(logger=False, ignore=["net", "evaluator", "extra_evaluators", "optimizer"])
        self.net = net
        self.optimizer_factory = optimizer

    batch_kind = "pointwise"

    def setup(self, stage: str) -> None:
        self.check_batches(stage)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        users, items = batch["users"], batch["items"]  # (B,), (B,)
        loss = self.net.loss(users, items, batch["clicks"], batch["propensity"])
        loss = loss + self.hparams.l2_weight * l2_penalty(*self.net.ego_embeddings(users, items))
        self._accumulate_loss(loss.detach(), users.numel(), batch_idx)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.parameters())
