r"""``SparseEncoderModule``: the Lightning recipe that trains SPLADE-style sparse encoders.

Siamese (Formal et al. 2021, https://arxiv.org/abs/2107.05720): one network encodes queries
and documents, :math:`s(q, d) = \langle w^q, w^d \rangle`. Inference-free (Geng et al. 2024,
https://arxiv.org/abs/2411.04403): documents by the network, queries by the IDF lookup
(:class:`~retrieval.models.idf_query.IdfQueryEncoder`, frozen or trained with its own learning
rate), :math:`s(q, d) = \sum_{j \in q} \mathrm{idf}_j\, w^d_j`. With IDF in the score, the plain
FLOPS penalty on documents is Geng et al.'s *IDF-aware FLOPS*: the ranking gradient on a
document term scales with its IDF while the penalty does not (the explicit-penalty form is
:func:`~retrieval.losses.idf_weighted_flops`; a unit IDF table gives the plain-FLOPS baseline).

Per step, with B queries, each with 1 positive and n hard negatives (documents query-major):

.. math::
    \mathcal{L} = \alpha\, \mathrm{InfoNCE}(q, D) + \beta\, \mathrm{KL}(t \,\|\, s)
        + \gamma\, \mathrm{MarginMSE}(s, t) + \lambda_d(t)\, \mathrm{FLOPS}(D)
        + \lambda_q(t)\, \mathrm{FLOPS}(Q)

* InfoNCE over every document of the (gathered, global) batch: in-batch and hard negatives; a
  document judged relevant to the query (another of its positives, possibly sampled for another
  query) is left out of its denominator rather than pushed down as a false negative;
* KL and MarginMSE over each query's own 1 + n candidates against the teachers' ensemble;
* FLOPS over the gathered global batch, with the quadratic warm-up
  :math:`\lambda(t) = \lambda \min(1, (t/T)^2)`; the query term only for siamese models.

Under DDP, documents (and queries) are gathered with gradients
(:func:`~retrieval.training.distributed.gather_with_grad`), so in-batch negatives span every
rank and the regulariser's strength does not depend on the number of GPUs.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn

from retrieval.eval.retrieval_evaluator import RetrievalEvaluator
from retrieval.index.manifest import replace_directory
from retrieval.losses import (
    QuadraticWarmup,
    flops,
    idf_weighted_flops,
    info_nce,
    kl_distillation,
    margin_mse,
)
from retrieval.training.distributed import gather, gather_with_grad, world
from retrieval.types import Run

log = logging.getLogger(__name__)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning rate x min(t / warmup, (total - t) / (total - warmup)), floored at 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def in_batch_false_negatives(doc_rows: torch.Tensor, positive_rows: torch.Tensor) -> torch.Tensor:
    """Which documents of the global batch are judged relevant to each local query.

    Args:
        doc_rows: (B, c) corpus rows of this rank's documents, query-major, positive first.
        positive_rows: (B, P) corpus rows of each local query's judged positives, -1 padding.

    Returns:
        (B, W * B * c) bool, True where the column's document is one of the row's positives but
        not the row's own target column: the InfoNCE mask (those columns are ignored).
    """
    b, c = doc_rows.shape
    rows = gather(doc_rows.reshape(-1))  # (W * B * c,)
    relevant = (rows[None, :, None] == positive_rows[:, None, :]).any(-1)  # (B, W * B * c)
    rank, _ = world()
    local = torch.arange(b, device=rows.device)  # (B,)
    relevant[local, rank * b * c + local * c] = False  # each query's own target stays
    return relevant


def nnz(weights: torch.Tensor) -> torch.Tensor:
    """Average non-zeros per row of (N, V) weights."""
    return (weights > 0).sum(1).float().mean()


class SparseEncoderModule(L.LightningModule):
    """Train a sparse encoder (see the module docstring for the objective).

    Args:
        net: (nn.Module) the document encoder (:class:`~retrieval.models.splade_mlm.SpladeMLM`
            or :class:`~retrieval.models.splade_echo.SpladeEcho`); also the query encoder when
            ``query_encoder`` is None (siamese).
        query_encoder: (IdfQueryEncoder | None) the inference-free query side.
        optimizer: (callable) ``params -> torch.optim.Optimizer`` (a Hydra partial).
        lr_warmup_steps: (int, default 0) linear learning-rate warm-up, then linear decay to 0.
        idf_lr: (float | None) learning rate of a trainable IDF table.
        nce_weight: (float, default 1) alpha.
        kl_weight: (float, default 0) beta (0: no distillation).
        margin_mse_weight: (float, default 0) gamma.
        temperature: (float, default 1) InfoNCE temperature.
        kl_temperature: (float, default 1) distillation temperature.
        doc_flops: (float) lambda_d.
        query_flops: (float) lambda_q (siamese only).
        flops_warmup_steps: (int) T of the quadratic warm-up, > 0.
        l0_threshold: (int | None) documents with at most this many active terms are left out
            of the FLOPS mean.
        flops_form: (str, default "score") inference-free only: ``score`` puts the IDF in the
            score and applies plain FLOPS to documents; ``penalty`` scores binary queries against
            IDF-weighted contributions with the explicit 1/idf^2 FLOPS (identical gradients).
        query_max_length: (int, default 64) word-pieces per query.
        doc_max_length: (int, default 256) word-pieces per document.
        val_depth: (int, default 100) documents retrieved per validation query.
    """

    def __init__(
        self,
        net: nn.Module,
        query_encoder: nn.Module | None = None,
        optimizer: Callable | None = None,
        lr_warmup_steps: int = 0,
        idf_lr: float | None = None,
        nce_weight: float = 1.0,
        kl_weight: float = 0.0,
        margin_mse_weight: float = 0.0,
        temperature: float = 1.0,
        kl_temperature: float = 1.0,
        doc_flops: float = 1e-3,
        query_flops: float = 1e-3,
        flops_warmup_steps: int = 1000,
        l0_threshold: int | None = None,
        flops_form: str = "score",
        query_max_length: int = 64,
        doc_max_length: int = 256,
        val_depth: int = 100,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "query_encoder"])
        self.net = net
        self.query_encoder = query_encoder
        if flops_form not in ("score", "penalty"):
            raise ValueError(f"flops_form must be 'score' or 'penalty', got {flops_form!r}")
        self.doc_lambda = QuadraticWarmup(doc_flops, flops_warmup_steps)
        self.query_lambda = QuadraticWarmup(query_flops, flops_warmup_steps)
        self._val_docs: list[torch.Tensor] = []

    @property
    def inference_free(self) -> bool:
        return self.query_encoder is not None

    # --- encoding ------------------------------------------------------------------------------

    def encode_docs(self, texts: list[str]) -> torch.Tensor:
        """(N, V) document weights."""
        batch = self.net.tokenize(texts, self.hparams.doc_max_length)
        return self.net(**{k: v.to(self.device) for k, v in batch.items()})

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """(B, V) query weights: the IDF lookup (inference-free) or the network (siamese)."""
        if not self.inference_free:
            batch = self.net.tokenize(texts, self.hparams.query_max_length)
            return self.net(**{k: v.to(self.device) for k, v in batch.items()})
        tokens = self.query_encoder.tokenize(texts, self.hparams.query_max_length)  # as the index side
        return self.query_encoder(**{k: v.to(self.device) for k, v in tokens.items()})

    # --- training -------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.train()  # Hugging Face models load in eval mode; training uses their dropout

    def scoring_form(self, q: torch.Tensor, d: torch.Tensor):
        """(query side, document side, document regulariser) of the configured FLOPS form.

        ``score`` (and every siamese model): the vectors as encoded, plain FLOPS on documents.
        ``penalty`` (inference-free only): binary queries, documents as their contributions
        :math:`c_j = \\mathrm{idf}_j d_j`, FLOPS on :math:`c` weighted by :math:`1/\\mathrm{idf}_j^2`
        (:func:`~retrieval.losses.idf_weighted_flops`): the same objective and gradients.
        """
        l0 = self.hparams.l0_threshold
        if self.inference_free and self.hparams.flops_form == "penalty":
            idf = self.query_encoder.idf.clamp(min=0)  # (V,)
            return (q > 0).to(q.dtype), d * idf, lambda docs: idf_weighted_flops(docs, idf, l0)
        return q, d, lambda docs: flops(docs, l0)

    def step_losses(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        target: torch.Tensor,
        step: int,
        false_negatives: torch.Tensor | None = None,
    ):
        """Every loss term of one step and its weight.

        Args:
            q: (B, V) query vectors of this rank.
            d: (B * c, V) documents of this rank, query-major (positive first).
            target: (B, c) the teachers' ensemble scores.
            step: the optimizer step (FLOPS warm-up).
            false_negatives: (B, W * B * c) bool or None, columns left out of each query's
                InfoNCE (:func:`in_batch_false_negatives`).

        Returns:
            (losses, weights): dicts keyed ``nce``, ``kl``, ``margin_mse``, ``flops_d``, ``flops_q``.
        """
        hp = self.hparams
        b, c = target.shape
        q, d, doc_regulariser = self.scoring_form(q, d)
        docs = gather_with_grad(d)  # (W * B * c, V)
        rank, _ = world()
        scores = q @ docs.T  # (B, W * B * c)
        targets = rank * b * c + torch.arange(b, device=q.device) * c  # each query's positive
        own = torch.einsum("bv,bcv->bc", q, d.view(b, c, -1))  # (B, c)
        losses, weights = {"flops_d": doc_regulariser(docs)}, {"flops_d": self.doc_lambda(step)}
        if hp.nce_weight:
            losses["nce"] = info_nce(scores, targets, hp.temperature, false_negatives)
            weights["nce"] = hp.nce_weight
        if hp.kl_weight:
            losses["kl"], weights["kl"] = kl_distillation(own, target, hp.kl_temperature), hp.kl_weight
        if hp.margin_mse_weight:
            losses["margin_mse"] = margin_mse(own[:, 0], own[:, 1:], target[:, 0], target[:, 1:])
            weights["margin_mse"] = hp.margin_mse_weight
        if not self.inference_free:
            losses["flops_q"], weights["flops_q"] = flops(gather_with_grad(q)), self.query_lambda(step)
        return losses, weights

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = batch["target"].float()  # (B, 1 + n)
        q = self.encode_queries(batch["queries"]).float()  # (B, V)
        d = self.encode_docs(batch["docs"]).float()  # (B * (1 + n), V)
        false_negatives = None
        if self.hparams.nce_weight:
            false_negatives = in_batch_false_negatives(batch["doc_rows"], batch["positive_rows"])
        losses, weights = self.step_losses(q, d, target, self.global_step, false_negatives)
        total = sum(weights[k] * v for k, v in losses.items())
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs |= {"train/loss": total.detach(), "train/doc_nnz": nnz(d), "train/query_nnz": nnz(q)}
        logs["train/lambda_d"] = torch.tensor(weights["flops_d"])
        self.log_dict(logs, batch_size=len(q), on_step=True, on_epoch=True, sync_dist=world()[1] > 1)
        return total

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad]}]
        if self.inference_free and any(p.requires_grad for p in self.query_encoder.parameters()):
            if not self.hparams.idf_lr:
                raise ValueError("a trainable IDF table needs idf_lr > 0")
            groups.append({"params": list(self.query_encoder.parameters()), "lr": self.hparams.idf_lr})
        optimizer = self.hparams.optimizer(params=groups)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = linear_warmup_decay(optimizer, self.hparams.lr_warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- validation: NDCG@10 over the whole corpus ----------------------------------------------

    def validation_step(self, batch: list[str], batch_idx: int) -> None:
        self._val_docs.append(self.encode_docs(batch).float().to_sparse_csr())  # (b, V)

    def on_validation_epoch_end(self) -> None:
        if not self._val_docs:
            return
        datamodule = self.trainer.datamodule
        chunks, self._val_docs = self._val_docs, []  # CSR (b, V) each, in corpus order
        val = datamodule.val
        qids, texts = val.queries["query_id"].to_list(), val.queries["text"].to_list()
        doc_ids = datamodule.training.corpus["doc_id"].to_list()
        k = min(self.hparams.val_depth, len(doc_ids))
        run: dict[str, dict[str, float]] = {}
        q_nnz = []
        for lo in range(0, len(qids), 64):
            q = self.encode_queries(texts[lo : lo + 64]).float()  # (b, V)
            q_nnz.append((q > 0).sum(1).float())
            scores = torch.cat([chunk @ q.T for chunk in chunks]).T  # (b, N)
            top, idx = scores.topk(k, dim=1)  # (b, k)
            for qid, s_row, i_row in zip(qids[lo : lo + 64], top.tolist(), idx.tolist(), strict=True):
                run[qid] = {doc_ids[i]: s for i, s in zip(i_row, s_row, strict=True)}
        metrics = RetrievalEvaluator(measures=["ndcg_cut.10"], drop_self_hits=True)(Run(run), val.qrels)
        active = torch.zeros(chunks[0].shape[1], device=self.device)  # (V,) documents using each term
        for chunk in chunks:
            active.index_add_(0, chunk.col_indices(), torch.ones_like(chunk.values()))
        n_docs = sum(chunk.shape[0] for chunk in chunks)
        if not active.any():
            log.warning(
                "every document encodes to an empty vector (collapsed); lower the learning rate, "
                "the FLOPS weight, or add distillation (module.kl_weight)"
            )
        self.log_dict(
            {
                "val/ndcg@10": metrics["ndcg@10"],
                "val/doc_nnz": float(active.sum()) / n_docs,
                "val/query_nnz": float(torch.cat(q_nnz).mean()),
                "val/doc_flops": float(((active / n_docs) ** 2).sum()),
            },
            prog_bar=True,
        )

    # --- export --------------------------------------------------------------------------------

    def save_model(self, directory: str | Path) -> Path:
        """Write a Hugging Face-loadable directory (+ ``idf.json`` when inference-free)."""
        directory = Path(directory)
        work = directory.with_name(directory.name + ".partial")  # all files, then one rename
        shutil.rmtree(work, ignore_errors=True)
        self.net.save_pretrained(work)
        if self.inference_free:
            self.query_encoder.save(work)
        replace_directory(work, directory)
        log.info("model saved to %s", directory)
        return directory


def check_schedule(weight: float, warmup_steps: int) -> None:
    """Fail early on a FLOPS schedule that cannot work (T <= 0, negative or non-finite lambda)."""
    QuadraticWarmup(weight, warmup_steps)
    if not math.isfinite(weight):
        raise ValueError(f"FLOPS weight must be finite, got {weight}")
