"""LLMRec's training recipe: BPR over observed and LLM-augmented pairs, pruned by loss, plus feature MAE."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.lit.pairwise import PairwiseRecommender
from recsys.losses import PRUNE_RULES, prune_by_loss
from recsys.models.llmrec import LLMRec
from retrieval.eval.topk_evaluator import TopKEvaluator


def pair_table(pairs: Tensor, num_users: int) -> Tensor:
    """Each user's augmented (liked, disliked) items: (U, 2) int64, ``-1`` for users without a pair.

    Args:
        pairs: (P, 3) rows (user, liked, disliked); a user listed twice keeps its last row.
    """
    table = torch.full((num_users, 2), -1, dtype=torch.int64)
    table[pairs[:, 0]] = pairs[:, 1:]
    return table


class LLMRecRecommender(PairwiseRecommender):
    r"""Trains :class:`~recsys.models.llmrec.LLMRec` as in LLMRec (Wei et al., WSDM 2024, sec. 3).

    Per step, with ``B`` observed triples :math:`(u, i^+, j^-)` from the datamodule:

    1. *implicit-feedback augmentation*: ``augment_rate · B`` of the batch's users are drawn, and
       those with an LLM-chosen pair :math:`(u, i^+_A, j^-_A)` (the datamodule's
       :class:`~recsys.llm.augment.Augmentation`) add it to the batch (the released code's sampling);
    2. per-sample BPR losses; the *augmented* pairs are pruned by loss
       (:func:`~recsys.losses.prune_by_loss`: ``prune_rule`` ``drop_high_loss`` is the paper's
       eq. 8, ``keep_high_loss`` the released code's), and the mean is taken over the observed and
       the kept augmented samples alike. The released code prunes every sample of the batch, the
       observed ones too; on ML-100K that stalls training (val NDCG@10 0.13 against LightGCN's 0.18
       after 30 epochs, with ``drop_high_loss`` at 0.1), so Sparrow prunes what the paper calls
       noisy: the LLM's pairs;
    3. plus ``l2_weight`` · L2 on the batch's layer-0 ID rows and ``mae_weight`` · the masked
       feature reconstruction loss (:meth:`~recsys.models.llmrec.LLMRec.training_embeddings`).

    Evaluation is :class:`~recsys.lit.pairwise.PairwiseRecommender`'s (full sort, shared harness);
    augmented items are not observed interactions, so they stay rankable.

    Args:
        net: an :class:`~recsys.models.llmrec.LLMRec`.
        optimizer, evaluator, extra_evaluators, l2_weight, scheduler, compile, cuda_graph: as
            :class:`~recsys.lit.pairwise.PairwiseRecommender` (the step has fixed shapes and no
            host sync, so ``cuda_graph=true`` replays it as one CUDA graph).
        augment_rate: fraction of the batch's users drawn for augmented pairs (0: none).
        prune_rate: :math:`\omega`, the fraction of the augmented pairs pruned per step (0: none).
        prune_rule: ``drop_high_loss`` (paper) or ``keep_high_loss`` (released code).
        mae_weight: weight of the feature reconstruction loss (0: none).
    """

    def __init__(
        self,
        net: LLMRec,
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        extra_evaluators: Mapping[str, TopKEvaluator] | None = None,
        l2_weight: float = 0.0,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        compile: bool = False,
        augment_rate: float = 0.01,
        prune_rate: float = 0.1,
        prune_rule: str = "drop_high_loss",
        mae_weight: float = 0.1,
        cuda_graph: bool = False,
    ):
        if not isinstance(net, LLMRec):
            raise TypeError(f"LLMRecRecommender trains an LLMRec net, got {type(net).__name__}")
        if prune_rule not in PRUNE_RULES:
            raise ValueError(f"unknown prune_rule {prune_rule!r}; choose from {PRUNE_RULES}")
        if not 0 <= prune_rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
        if not 0 <= augment_rate <= 1:
            raise ValueError(f"augment_rate must be in [0, 1], got {augment_rate}")
        super().__init__(
            net, optimizer, evaluator, extra_evaluators, l2_weight, scheduler, compile, cuda_graph
        )
        self.register_buffer("pairs_of_user", torch.full((net.num_users, 2), -1), persistent=False)

    def setup(self, stage: str) -> None:
        """Graph (as LightGCN), then the datamodule's augmentation: side features and pairs."""
        super().setup(stage)
        dm = self.trainer.datamodule
        augmentation = getattr(dm, "augmentation", None)
        if augmentation is None:
            raise ValueError(
                "LLMRec needs LLM-derived side information: set data.augmentation_path to the file "
                "written by `python -m recsys.augment ckpt_path=<base run>`"
            )
        device = self.net.embedding.weight.device
        self.net.set_features(augmentation.user_emb.to(device), augmentation.item_emb.to(device))
        self.pairs_of_user = pair_table(augmentation.pairs, self.net.num_users).to(device)

    def augmented_pairs(self, users: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The LLM pairs of a random ``augment_rate`` of the batch's users, in fixed shapes.

        Returns:
            (users, liked, disliked, valid), (A,) each with ``A = int(augment_rate · B)``: users
            without a pair have ``valid`` false (and item 0 as a placeholder). No host sync.
        """
        n = int(self.hparams.augment_rate * users.numel())
        drawn = users[torch.rand(users.numel(), device=users.device).argsort()[:n]]  # (A,)
        liked, disliked = self.pairs_of_user[drawn].unbind(1)  # (A,), (A,)
        valid = liked >= 0
        return drawn, liked.clamp(min=0), disliked.clamp(min=0), valid

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        """One step's loss, with fixed shapes and no host sync (``cuda_graph=true`` can replay it)."""
        users, pos, neg = batch["users"], batch["pos"], batch["neg"]  # (B,), (B,), (B, n)
        aug_users, liked, disliked, valid = self.augmented_pairs(users)  # (A,) each
        user_emb, item_emb, reconstruction = self.net.training_embeddings()  # (U, d), (I, d), ()
        items = torch.cat([pos.unsqueeze(1), neg], 1)  # (B, 1 + n)
        scores = (user_emb[users].unsqueeze(1) * item_emb[items]).sum(-1)  # (B, 1 + n)
        observed = F.softplus(scores[:, 1:] - scores[:, :1])  # (B, n) per-sample BPR
        ua = user_emb[aug_users]  # (A, d)
        augmented = F.softplus((ua * item_emb[disliked]).sum(-1) - (ua * item_emb[liked]).sum(-1))  # (A,)
        kept = prune_by_loss(augmented, self.hparams.prune_rate, self.hparams.prune_rule, valid)  # (A,)
        kept = kept.to(augmented.dtype)
        rank_loss = (observed.sum() + (augmented * kept).sum()) / (observed.numel() + kept.sum())
        reg = self._l2(users, items, aug_users, liked, disliked, valid.to(augmented.dtype))
        return rank_loss + self.hparams.l2_weight * reg + self.hparams.mae_weight * reconstruction

    def _l2(
        self, users: Tensor, items: Tensor, aug_users: Tensor, liked: Tensor, disliked: Tensor, valid: Tensor
    ):
        """:func:`~recsys.losses.l2_penalty` over the observed triples and the valid augmented ones: ()."""
        ego_u, ego_i = self.net.ego_embeddings(users, items)  # (B, d), (B, 1 + n, d)
        aug_u, aug_i = self.net.ego_embeddings(
            aug_users, torch.stack([liked, disliked], 1)
        )  # (A, d), (A, 2, d)
        squares = ego_u.pow(2).sum() + ego_i.pow(2).sum()
        squares = squares + (valid * (aug_u.pow(2).sum(-1) + aug_i.pow(2).sum((1, 2)))).sum()
        return squares / (2 * (users.numel() + valid.sum()))
