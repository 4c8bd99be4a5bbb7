"""Next-item training of sequence recommenders (SASRec, M2TRec), evaluated by the shared harness."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from recsys.lit.evaluation import EvaluatedRecommender
from retrieval.eval.topk_evaluator import TopKEvaluator


class SequentialRecommender(EvaluatedRecommender):
    r"""Trains a sequence model to predict each next item; ranks every item for each history.

    The training batches are left-padded rows of item ids (``{"items": (B, L + 1)}``, see
    :class:`~recsys.data.sequences.SequenceDataModule`); the net's loss gives the next-item
    loss (full softmax, or sampled softmax with ``sampled_negatives`` uniform negatives) and, for a
    metadata-aware net (``uses_metadata``), the next item's category loss. Items the datamodule
    holds out as cold start are not in the training catalogue: never a negative, so the model
    learns nothing about them (as for items that arrive after training). The objective is

    .. math::
        \mathcal{L} = \mathcal{L}_{item} + w_{cat} \, \mathcal{L}_{cat}

    Evaluation: each row of a stage (a history and its next item) is ranked against **every**
    item with the shared top-K evaluator; the history is not masked (the usual sequential
    convention: a user may consume an item again). Protocols besides the default one (e.g.
    ``"cold"``: targets among items held out of training) log ``<stage>/<protocol>/<metric>``.

    ``net`` is a partial of the model class, called at setup with ``num_items`` and ``max_len``
    from the datamodule and, for a metadata-aware net, the item metadata
    (:class:`~recsys.data.sequences.ItemMetadata`).

    Args:
        net: partial of :class:`~recsys.models.sasrec.SASRec` or :class:`~recsys.models.m2trec.M2TRec`.
        optimizer: partial of a torch optimizer, called with the parameters.
        evaluator: the shared top-K evaluator.
        extra_evaluators: protocol name -> evaluator.
        sampled_negatives: (int) 0: full softmax over the catalogue; > 0: sampled softmax with that
            many uniform negatives. Default: 0.
        category_weight: (float) :math:`w_{cat}` (metadata-aware nets only; 0 turns the task off).
            Default: 0.
    """

    batch_kind = "sequence"

    def __init__(
        self,
        net: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        extra_evaluators: Mapping[str, TopKEvaluator] | None = None,
        sampled_negatives: int = 0,
        category_weight: float = 0.0,
    ):
        if sampled_negatives < 0 or category_weight < 0:
            raise ValueError(
                f"sampled_negatives and category_weight must be >= 0, got {sampled_negatives} and "
                f"{category_weight}"
            )
        super().__init__(evaluator, extra_evaluators)
        self.save_hyperparameters(logger=False, ignore=["net", "evaluator", "extra_evaluators", "optimizer"])
        self.net_factory, self.optimizer_factory = net, optimizer
        self.net: nn.Module | None = None
        self._histories: dict[str, Tensor] = {}  # stage -> (N, L) on the device, per epoch

    @property
    def uses_metadata(self) -> bool:
        factory = getattr(self.net_factory, "func", self.net_factory)
        return bool(getattr(factory, "uses_metadata", False))

    def setup(self, stage: str) -> None:
        """Build the net from the datamodule's catalogue (and item metadata)."""
        self.check_batches(stage)
        dm = self.trainer.datamodule
        if self.net is not None:
            return
        known = torch.ones(dm.num_items, dtype=torch.bool)
        known[dm.cold_items] = False  # held-out items are not in the training catalogue
        self.register_buffer("known", known, persistent=False)  # (I,)
        kwargs = {"num_items": dm.num_items, "max_len": dm.max_len}
        if self.uses_metadata:
            meta = dm.metadata
            kwargs |= {
                "fields": meta.fields,
                "vocab_sizes": meta.vocab_sizes,
                "bags": meta.bags,
                "bag_vocab": meta.bag_vocab,
                "text": meta.text,
                "num_categories": meta.categories.shape[1],
            }
            self.register_buffer("categories", meta.categories, persistent=False)  # (I, C)
        elif self.hparams.category_weight > 0:
            raise ValueError(f"category_weight > 0 needs a metadata-aware net, not {self.net_factory}")
        self.net = self.net_factory(**kwargs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        items = batch["items"]  # (B, L + 1)
        if self.uses_metadata:
            negatives = self.hparams.sampled_negatives
            losses = self.net.losses(items, self.categories, num_negatives=negatives, known=self.known)
            loss = losses["item"] + self.hparams.category_weight * losses["category"]
            self._accumulate_parts(losses, items.shape[0], batch_idx)
        else:
            loss = self.net.loss(items, num_negatives=self.hparams.sampled_negatives, known=self.known)
        self._accumulate_loss(loss.detach(), items.shape[0], batch_idx)
        return loss

    def _accumulate_parts(self, losses: dict[str, Tensor], batch_size: int, batch_idx: int) -> None:
        """Each task's epoch-mean loss, logged once at the epoch's last batch (``train/<task>_loss``)."""
        if batch_idx == 0:
            self._part_sums = {k: torch.zeros((), device=v.device) for k, v in losses.items()}
            self._part_seen = 0
        for key, value in losses.items():
            self._part_sums[key] += value.detach() * batch_size
        self._part_seen += batch_size
        if batch_idx == self.trainer.num_training_batches - 1:
            for key, total in self._part_sums.items():
                self.log(f"train/{key}_loss", total / self._part_seen, on_step=False, on_epoch=True)

    def _stage_histories(self, stage: str) -> Tensor:
        if stage not in self._histories:
            self._histories[stage] = self.trainer.datamodule.histories(stage).to(self.device)
        return self._histories[stage]

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        histories = self._stage_histories(stage)  # (N, L)

        def score(rows: Tensor) -> Tensor:
            return self.net.score_histories(histories[rows.to(histories.device)])  # (b, I)

        rows = batch["users"]  # (b,) row ids of this stage
        for protocol, evaluator in self.evaluators.items():
            targets, exclude = self._sets_on_device(stage, protocol)
            if not bool((targets.sizes()[rows.to(targets.indptr.device)] > 0).any()):
                continue  # e.g. the cold protocol has no validation rows
            result = evaluator.per_user(score, targets, exclude, device=self.device, users=rows)
            prefix = f"{protocol}/" if protocol else ""
            for name, values in result.metrics.items():
                self._per_user[prefix + name].append(values.detach().cpu())

    def _eval_epoch_end(self, stage: str) -> None:
        self._histories.pop(stage, None)
        super()._eval_epoch_end(stage)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.parameters())
