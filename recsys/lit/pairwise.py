"""A thin LightningModule for recommenders trained with a pairwise (BPR) loss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from recsys.dsl import DynamicSparsity
from recsys.dsl_export import export_sparse
from recsys.lit.cuda_graph import GraphedStep
from recsys.lit.evaluation import EvaluatedRecommender
from recsys.losses import bpr_loss, l2_penalty
from retrieval.eval.topk_evaluator import TopKEvaluator

log = logging.getLogger(__name__)

SPARSE_EXPORT = "sparse_embeddings.pt"  # written into the run folder by a sparse run


class PairwiseRecommender(EvaluatedRecommender):
    """Trains ``net`` on (user, positive, negatives) triples; evaluates by full sort.

    The recipe: loss = BPR(pos, neg) + ``l2_weight`` · L2(batch ego embeddings);
    validation and test rank every candidate item for each user with the shared
    :class:`~retrieval.eval.topk_evaluator.TopKEvaluator` and log ``val/ndcg@10`` etc.

    Optimisation is manual (zero_grad, backward, step in :meth:`training_step`; the
    scheduler, if any, steps once per epoch): Lightning's automatic-optimisation closure
    and hooks cost more host time per step than a whole LightGCN step on a GPU.

    ``net`` must follow Sparrow's recommender contract: ``forward(users, items) -> (B,)``,
    ``score_all(users) -> (B, num_items)`` and ``ego_embeddings(users, items)``. A net that scores
    by a dot product may also define ``embeddings() -> ((num_users, d), (num_items, d))``: on a GPU
    the evaluator then ranks with the fused scoring + top-K kernel instead of ``score_all`` blocks.

    Args:
        net: the recommender (a plain ``nn.Module``).
        optimizer: partial of a torch optimizer, called with the parameters.
        evaluator: the shared top-K evaluator.
        extra_evaluators: protocol name -> evaluator (:class:`~recsys.lit.evaluation.EvaluatedRecommender`).
        l2_weight: coefficient of the L2 penalty on the batch's embedding rows.
        scheduler: optional partial of a LR scheduler, called with the optimizer.
        compile: ``torch.compile`` the net in place (``nn.Module.compile``: state-dict keys and
            checkpoints stay the same as without it).
        cuda_graph: on a CUDA device, replay each training step (forward, backward, optimizer
            step) as one CUDA graph (:class:`~recsys.lit.cuda_graph.GraphedStep`); ignored on
            the CPU. Needs 32-bit precision and no scheduler (the graph fixes the learning
            rate); Lightning's optimizer-step hooks do not run for graphed steps.
        sparsity: dynamic sparse training of the net's embedding tables
            (:class:`~recsys.dsl.DynamicSparsity`, DSL). Attached here, so its masks are in the
            state dict before a checkpoint loads; its schedule spans
            ``trainer.estimated_stepping_batches`` (the ``max_epochs`` budget, even if early
            stopping ends the run sooner). Logs ``train/density`` etc. once per epoch and
            writes the selected (else the last) weights' tables to ``<run folder>/sparse_embeddings.pt``
            at the end of fit (:func:`~recsys.dsl_export.export_sparse`). With ``cuda_graph`` the
            masking runs inside the graph (hooks); each mask-update step runs eagerly, for its
            dense gradient.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        extra_evaluators: Mapping[str, TopKEvaluator] | None = None,
        l2_weight: float = 0.0,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
        sparsity: DynamicSparsity | None = None,
    ):
        super().__init__(evaluator, extra_evaluators)
        if cuda_graph and scheduler is not None:
            raise ValueError("cuda_graph=true cannot follow a learning-rate scheduler: set one or the other")
        # partials stay out of the checkpoint: it must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            logger=False,
            ignore=["net", "evaluator", "extra_evaluators", "optimizer", "scheduler", "sparsity"],
        )
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.automatic_optimization = False
        self._graphed: GraphedStep | None = None
        self.sparsity = sparsity
        if sparsity is not None:
            sparsity.attach(net)

    batch_kind = "pairwise"

    def setup(self, stage: str) -> None:
        """Hand graph models their training graph (nets that define ``set_graph``); compile."""
        self.check_batches(stage)
        dm = self.trainer.datamodule
        if hasattr(self.net, "set_graph") and dm is not None:
            self.net.set_graph(*dm.train_pairs())
        if self.hparams.compile:
            self.net.compile()
        precision = str(getattr(self.trainer, "precision", "32-true"))
        if self.hparams.cuda_graph and stage == "fit" and precision not in ("32", "32-true"):
            raise ValueError(f"cuda_graph=true needs trainer.precision=32, got {self.trainer.precision}")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = self.global_step
        update = self.sparsity is not None and self.sparsity.update_due(step)
        if update:  # needs the dense gradient: an eager step, graphed run or not
            self.sparsity.keep_dense_gradients()
        if self.hparams.cuda_graph and not update:
            loss = self._graphed_step(batch)
        else:
            loss = self._eager_step(batch)
        if update:
            self.sparsity.update(step)
        self._accumulate_loss(loss, batch["users"].numel(), batch_idx)
        return loss

    def _eager_step(self, batch: dict[str, Tensor]) -> Tensor:
        optimizer = self.optimizers()
        loss = self._loss(batch)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)  # a sparse run's gradient hooks mask the gradients
        optimizer.step()  # ... and its step post-hook the weights
        return loss.detach()

    def _graphed_step(self, batch: dict[str, Tensor]) -> Tensor:
        if self._graphed is None:
            self._graphed = GraphedStep(
                lambda users, pos, neg: self._loss({"users": users, "pos": pos, "neg": neg}),
                self.optimizers().optimizer,
                [p for p in self.parameters() if p.requires_grad],
            )
        loss = self._graphed(batch["users"], batch["pos"], batch["neg"])
        self._count_optimizer_step()
        return loss

    def _count_optimizer_step(self) -> None:
        """Advance ``trainer.global_step`` for a step that bypassed ``LightningOptimizer.step``.

        Checkpointing, logging cadence and ``max_steps`` read that counter; Lightning's manual
        loop advances it through these two hooks of the optimizer wrapper.
        """
        optimizer = self.optimizers()
        optimizer._on_before_step()
        optimizer._on_after_step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save optimizers in their plain form, so that a graphed run resumes on any device."""
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                if "capturable" in group:
                    group["capturable"] = False

    def on_train_start(self) -> None:
        """Start the sparsity schedule (after any checkpoint, masks and optimizer state, is restored)."""
        if self.sparsity is not None:
            self.sparsity.start(self.optimizers().optimizer, self.trainer.estimated_stepping_batches)

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if self.sparsity is not None:
            stats = self.sparsity.stats()
            self.log_dict({f"train/{k}": v for k, v in stats.items()}, on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        if self.sparsity is not None:
            self.sparsity.stop()

    def on_fit_end(self) -> None:
        """A sparse run writes its tables as CSR into the run folder and logs the bytes saved."""
        if self.sparsity is None or self.trainer.sanity_checking:
            return
        path = Path(self.trainer.default_root_dir) / SPARSE_EXPORT
        tables = export_sparse(self._selected_tables(), path)
        log.info(
            "sparse embeddings written to %s: %d bytes (dense float32: %d bytes, %.3f of it)",
            path,
            tables.nbytes(),
            tables.dense_nbytes(),
            tables.nbytes() / tables.dense_nbytes(),
        )

    def _selected_tables(self) -> dict[str, Tensor]:
        """The embedding weights that ``recsys.train`` tests: the selected checkpoint's, else the net's."""
        callback = self.trainer.checkpoint_callback
        ckpt = ""
        if callback is not None:
            ckpt = callback.best_model_path if callback.monitor else callback.last_model_path
        names = list(self.sparsity.tables)
        if not ckpt:
            return {n: self.sparsity.tables[n].weight for n in names}
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        return {n: state[f"net.{n}.weight"] for n in names}

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        """BPR over the batch's (positive, negative) pairs + L2 on its layer-0 rows: () loss."""
        users, pos, neg = batch["users"], batch["pos"], batch["neg"]  # (B,), (B,), (B, n)
        items = torch.cat([pos.unsqueeze(1), neg], 1)  # (B, 1 + n)
        scores = self.net(users, items)  # (B, 1 + n): one forward (one propagation for graph models)
        rank_loss = bpr_loss(scores[:, :1].expand_as(scores[:, 1:]), scores[:, 1:])
        u_emb, i_emb = self.net.ego_embeddings(users, items)
        reg = l2_penalty(u_emb, i_emb)
        return rank_loss + self.hparams.l2_weight * reg

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}
