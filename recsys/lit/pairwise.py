"""A thin LightningModule for recommenders trained with a pairwise (BPR) loss."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from recsys.losses import bpr_loss, l2_penalty
from retrieval.eval.topk_evaluator import TopKEvaluator


class PairwiseRecommender(L.LightningModule):
    """Trains ``net`` on (user, positive, negatives) triples; evaluates by full sort.

    The recipe: loss = BPR(pos, neg) + ``l2_weight`` · L2(batch ego embeddings);
    validation and test rank every candidate item for each user with the shared
    :class:`~retrieval.eval.topk_evaluator.TopKEvaluator` and log ``val/ndcg@10`` etc.

    ``net`` must follow Sparrow's recommender contract: ``forward(users, items) -> (B,)``,
    ``score_all(users) -> (B, num_items)`` and ``ego_embeddings(users, items)``.

    Args:
        net: the recommender (a plain ``nn.Module``).
        optimizer: partial of a torch optimizer, called with the parameters.
        evaluator: the shared top-K evaluator.
        l2_weight: coefficient of the L2 penalty on the batch's embedding rows.
        scheduler: optional partial of a LR scheduler, called with the optimizer.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        l2_weight: float = 0.0,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        super().__init__()
        # partials stay out of the checkpoint: it must load with torch.load(weights_only=True)
        self.save_hyperparameters(logger=False, ignore=["net", "evaluator", "optimizer", "scheduler"])
        self.net = net
        self.evaluator = evaluator
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self._per_user: dict[str, list[Tensor]] = defaultdict(list)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        users, pos, neg = batch["users"], batch["pos"], batch["neg"]  # (B,), (B,), (B, n)
        pos_scores = self.net(users, pos)  # (B,)
        neg_scores = self.net(users.unsqueeze(1).expand_as(neg), neg)  # (B, n)
        rank_loss = bpr_loss(pos_scores.unsqueeze(1).expand_as(neg_scores), neg_scores)
        u_emb, i_emb = self.net.ego_embeddings(users, torch.cat([pos.unsqueeze(1), neg], 1))
        reg = l2_penalty(u_emb, i_emb)
        loss = rank_loss + self.hparams.l2_weight * reg
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=users.numel())
        self.log("train/bpr", rank_loss, on_step=False, on_epoch=True, batch_size=users.numel())
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        dm = self.trainer.datamodule
        result = self.evaluator.per_user(
            self.net.score_all, dm.targets(stage), dm.exclude(stage), device=self.device, users=batch["users"]
        )
        for name, values in result.metrics.items():
            self._per_user[name].append(values.detach().cpu())

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = {f"{stage}/{k}": torch.cat(v).double().mean().item() for k, v in self._per_user.items()}
        self._per_user.clear()
        headline = {k: v for k, v in metrics.items() if k.endswith("/ndcg@10")}
        self.log_dict(headline, prog_bar=True)
        self.log_dict({k: v for k, v in metrics.items() if k not in headline})

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}
