"""What every recommender LightningModule shares: validation and test through the shared harness."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

from retrieval.eval.topk_evaluator import TopKEvaluator
from retrieval.types import ItemSets


class EvaluatedRecommender(L.LightningModule):
    """Validation and test of ``self.net`` by full sort with the shared top-K evaluator.

    A *protocol* is a way of ranking: the default one (``""``) ranks every item minus the
    datamodule's ``exclude(stage)`` and logs ``val/ndcg@10`` etc.; each entry of
    ``extra_evaluators`` names another protocol that the datamodule defines (e.g. Coat's
    ``"mar"``: each user's randomly exposed items only) and logs ``val/<name>/<metric>@k``.
    The datamodule gives ``targets(stage, protocol)`` and ``exclude(stage, protocol)``.

    Args:
        evaluator: the shared top-K evaluator of the default protocol.
        extra_evaluators: protocol name -> evaluator, for datamodules with more protocols.
    """

    batch_kind = ""  # the training batches a subclass consumes: "pairwise" or "pointwise"

    def __init__(self, evaluator: TopKEvaluator, extra_evaluators: Mapping[str, TopKEvaluator] | None = None):
        super().__init__()
        self.evaluators = {"": evaluator, **dict(extra_evaluators or {})}
        self._per_user: dict[str, list[Tensor]] = defaultdict(list)
        self._eval_sets: dict[tuple[str, str], tuple[ItemSets, ItemSets]] = {}  # on device

    def check_batches(self, stage: str) -> None:
        """Refuse, before training, a datamodule whose batches this module cannot read.

        Raises:
            ValueError: naming both kinds of batches.
        """
        dm = self.trainer.datamodule
        kind = getattr(dm, "batch_kind", None)
        if stage == "fit" and dm is not None and kind is not None and kind != self.batch_kind:
            raise ValueError(
                f"{type(self).__name__} trains on {self.batch_kind} batches, but {type(dm).__name__} "
                f"gives {kind} ones (e.g. model=relmf needs data=coat with data.training=pointwise)"
            )

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        embeddings = self.net.embeddings() if hasattr(self.net, "embeddings") else None
        for protocol, evaluator in self.evaluators.items():
            targets, exclude = self._sets_on_device(stage, protocol)
            result = evaluator.per_user(
                self.net.score_all,
                targets,
                exclude,
                device=self.device,
                users=batch["users"],
                embeddings=embeddings,
            )
            prefix = f"{protocol}/" if protocol else ""
            for name, values in result.metrics.items():
                self._per_user[prefix + name].append(values.detach().cpu())

    def _sets_on_device(self, stage: str, protocol: str) -> tuple[ItemSets, ItemSets | None]:
        """The (targets, exclude) of a stage and protocol on ``self.device``, moved once per epoch."""
        if (stage, protocol) not in self._eval_sets:
            dm = self.trainer.datamodule
            exclude = dm.exclude(stage, protocol)  # None: nothing masked (sequential protocols)
            self._eval_sets[stage, protocol] = (
                dm.targets(stage, protocol).to(self.device),
                exclude.to(self.device) if exclude is not None else None,
            )
        return self._eval_sets[stage, protocol]

    def _eval_epoch_end(self, stage: str) -> None:
        for key in [k for k in self._eval_sets if k[0] == stage]:
            del self._eval_sets[key]
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

    def _accumulate_loss(self, loss: Tensor, batch_size: int, batch_idx: int) -> None:
        """Sum the epoch's loss on the device and log its mean once, at the epoch's last batch.

        ``self.log`` on every step costs more host time than a whole LightGCN step on a GPU;
        this keeps the per-step cost to one in-place add.
        """
        if batch_idx == 0:
            self._loss_sum, self._seen = torch.zeros((), device=loss.device), 0
        self._loss_sum += loss * batch_size
        self._seen += batch_size
        if batch_idx == self.trainer.num_training_batches - 1:
            self.log("train/loss", self._loss_sum / self._seen, on_step=False, on_epoch=True, prog_bar=True)
