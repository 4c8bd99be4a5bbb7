"""Full-ranking top-K evaluator for recommenders: a callable returning a flat, prefixed dict.

Protocol (Sparrow's recommender convention, see ``STYLE.md``): every user with a non-empty target
set is ranked against all items minus ``exclude`` (training items; plus validation items at test
time), masked with ``-inf``; ties broken by item id (:mod:`retrieval.eval.topk`); metrics are
those of :mod:`retrieval.eval.rec_metrics`, averaged over the users with ``|T_u| > 0``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from retrieval.eval.rec_metrics import METRICS, compute_metrics, mean_over_users, metric_names
from retrieval.eval.topk import ScoreFn, full_sort_topk
from retrieval.types import ItemSets

log = logging.getLogger(__name__)


def hit_matrix(users: torch.Tensor, items: torch.Tensor, targets: ItemSets) -> torch.Tensor:
    """Which recommended items are targets, computed on ``items``' device.

    Args:
        users: (U,) int64 user ids.
        items: (U, K) int64 ranked item ids; ``-1`` (padding) is never a hit.
        targets: the per-user target sets (moved to ``items``' device if they are elsewhere).

    Returns:
        (U, K) bool on ``items``' device, ``[i, p]`` true iff ``items[i, p]`` is in ``targets`` of
        ``users[i]``.
    """
    targets = targets.to(items.device)
    users = users.to(items.device).unsqueeze(1)  # (U, 1)
    return targets.contains(users, items.clamp(min=0)) & (items >= 0)  # (U, K)


@dataclass(frozen=True)
class PerUserResult:
    """Per-user metric values, for significance tests and breakdowns.

    All on the CPU, whatever device the evaluation ran on.

    Attributes:
        users: (U,) int64 ids of the evaluated users (those with ``|T_u| > 0``), ascending.
        metrics: ``{"ndcg@10": (U,) float64, ...}`` aligned with ``users``.
        items: (U, max(ks)) int64 top-K lists (``-1`` pads a short list).
        hits: (U, max(ks)) bool hit matrix.
    """

    users: torch.Tensor
    metrics: dict[str, torch.Tensor]
    items: torch.Tensor
    hits: torch.Tensor


class TopKEvaluator:
    """Full-sort top-K evaluation of a recommender's ``score_fn``.

    Args:
        ks: (Sequence[int]) cutoffs; the lists are ``max(ks)`` long. Default: ``(10, 20)``.
        metrics: (Sequence[str]) from ``("ndcg", "recall", "precision", "mrr", "hit", "map")``.
            Default: all six.
        chunk_size: (int) users scored per ``score_fn`` call. Default: 1024.
        compat: (Sequence[str]) opt-in compatibility modes, reported under their own names:
            ``"ndcg_ideal_from_retrieved"`` -> ``ndcg_ngcf@k`` (NGCF/LLMRec's ideal DCG from the
            retrieved ``max(ks)``-long list), ``"recall_min_k"`` -> ``recall_mink@k``. Default: ``()``.
        progress: (bool) tqdm bar over user chunks. Default: ``False``.

    Example::

        evaluator = TopKEvaluator(ks=(20,))
        results = evaluator(model.score_all, test_sets, exclude=train_sets.union(val_sets), prefix="test/")
        # {"test/ndcg@20": ..., "test/recall@20": ..., ..., "test/num_users": 29858.0}
    """

    def __init__(
        self,
        ks: Sequence[int] = (10, 20),
        metrics: Sequence[str] = METRICS,
        chunk_size: int = 1024,
        compat: Sequence[str] = (),
        progress: bool = False,
    ):
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.metrics = tuple(metrics)
        self.compat = tuple(compat)
        self.names = metric_names(self.metrics, self.compat)  # validates both
        self.chunk_size = int(chunk_size)
        self.progress = progress
        self._warned = False  # the target/exclude overlap warning is logged once per evaluator

    def per_user(
        self,
        score_fn: ScoreFn,
        targets: ItemSets,
        exclude: ItemSets | None,
        device: torch.device | str | None = None,
        users: torch.Tensor | None = None,
        embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PerUserResult:
        """Per-user metrics of every user with ``|T_u| > 0`` (see :class:`PerUserResult`).

        Ranking, hit matrix, metrics and the target/exclude overlap check all run on the device of
        the scores ``score_fn`` returns; ``targets`` and ``exclude`` already on ``device`` are used as
        they are, others are moved once per call. The results come back to the CPU once, at the end,
        and are bit-identical on every device for the same scores.

        Args:
            score_fn, targets, exclude, device, embeddings: as for :meth:`__call__`.
            users: (U,) int64 ids to evaluate, e.g. one batch of a Lightning eval loop; those with
                ``|T_u| = 0`` are dropped, the rest keep their order. Default: every user with
                ``|T_u| > 0``, ascending.
        """
        if exclude is not None and (
            exclude.num_users != targets.num_users or exclude.num_items != targets.num_items
        ):
            raise ValueError(
                f"targets ({targets.num_users} users x {targets.num_items} items) and exclude "
                f"({exclude.num_users} x {exclude.num_items}) must cover the same users and items"
            )
        home = torch.device("cpu" if device is None else device)
        targets = targets.to(home)
        exclude = exclude.to(home) if exclude is not None else None
        users = _users_with_targets(targets, users)  # (U,) on home
        if embeddings is not None and embeddings[0].is_cuda:
            items = fused_ranking(embeddings, users, max(self.ks), exclude)  # (U, K) on the GPU
        else:
            _, items = full_sort_topk(
                score_fn,
                users,
                max(self.ks),
                exclude=exclude,
                chunk_size=self.chunk_size,
                device=home,
                progress=self.progress,
                out_device=None,
            )  # (U, K) on the scores' device
        dev = items.device
        on_dev, targets = users.to(dev), targets.to(dev)
        hits = hit_matrix(on_dev, items, targets)  # (U, K)
        per_user = compute_metrics(hits, targets.sizes()[on_dev], self.ks, self.metrics, self.compat)
        check_overlap = exclude is not None and not self._warned
        overlap = _overlap(on_dev, targets, exclude.to(dev)) if check_overlap else None  # ()
        result = PerUserResult(
            users=users.cpu(), metrics=_metrics_to_cpu(per_user), items=items.cpu(), hits=hits.cpu()
        )
        n_overlap = int(overlap) if overlap is not None else 0  # read after the results: no extra wait
        if n_overlap:
            log.warning("%d target (user, item) pairs are also excluded and can never be hit", n_overlap)
            self._warned = True
        return result

    def __call__(
        self,
        score_fn: ScoreFn,
        targets: ItemSets,
        exclude: ItemSets | None,
        prefix: str = "",
        device: torch.device | str | None = None,
        users: torch.Tensor | None = None,
        embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Evaluate and average over users with ``|T_u| > 0``.

        Args:
            score_fn: ``users (B,) int64 -> (B, n_items)`` scores, e.g. a model's ``score_all``.
            targets: per-user relevant items (validation or test interactions).
            exclude: per-user items removed from the candidates (training items; at test time
                ``train.union(val)``), or ``None``.
            prefix: prepended to every key, e.g. ``"val/"``.
            device: where user ids are sent before ``score_fn``, and where ``targets`` and
                ``exclude`` are moved (once per call; not at all if they are there already).
                Default: the CPU.
            users: evaluate only these users (those with ``|T_u| = 0`` dropped); default: all.
            embeddings: optional ``(user_emb (n_users, d), item_emb (n_items, d))`` whose dot products
                are ``score_fn``'s scores (a model's ``embeddings()``). On CUDA the lists then come
                from the fused kernel (:func:`retrieval.kernels.dense_topk.dense_topk`: scoring,
                masking and top-K without the score blocks), equal to ``score_fn``'s up to float32
                summation order; elsewhere they are ignored and ``score_fn`` is used.

        Returns:
            ``{prefix + "ndcg@10": float, ..., prefix + "num_users": float}``.
        """
        res = self.per_user(score_fn, targets, exclude, device=device, users=users, embeddings=embeddings)
        means = mean_over_users(res.metrics, torch.ones(res.users.numel(), dtype=torch.int64))
        out = {prefix + name: value for name, value in means.items()}
        out[prefix + "num_users"] = float(res.users.numel())
        return out


def fused_ranking(
    embeddings: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor, k: int, exclude: ItemSets | None
) -> torch.Tensor:
    """Top-``k`` item ids of ``users`` by dot product of ``embeddings``, from the fused kernel.

    Same protocol as :func:`~retrieval.eval.topk.full_sort_topk` (``exclude`` masked, ties by item
    id, ``-1`` pads short lists), without any ``(users, items)`` score block.

    Args:
        embeddings: ``(user_emb (n_users, d), item_emb (n_items, d))``, one dtype, on the GPU.
        users: (U,) int64 user ids.
        k: list length.
        exclude: per-user items never returned, or ``None``.

    Returns:
        (U, k) int64 item ids on the embeddings' device.
    """
    from retrieval.kernels.dense_topk import dense_topk  # imports Triton: only on this path

    user_emb, item_emb = embeddings
    dev = user_emb.device
    users = users.to(dev)
    with torch.no_grad():
        excl = exclude.to(dev) if exclude is not None else None
        return dense_topk(user_emb[users], item_emb, k, exclude=excl, users=users)[1]


def _users_with_targets(targets: ItemSets, users: torch.Tensor | None) -> torch.Tensor:
    """(U,) int64 on the targets' device: ``users`` (default: all, ascending) with ``|T_u| > 0``."""
    n_true = targets.sizes()  # (num_users,)
    if users is None:
        return torch.nonzero(n_true > 0).squeeze(1)
    users = torch.as_tensor(users, dtype=torch.int64).reshape(-1).to(n_true.device)
    return users[n_true[users] > 0]


def _overlap(users: torch.Tensor, targets: ItemSets, exclude: ItemSets) -> torch.Tensor:
    """() int64: how many target (user, item) pairs of ``users`` are also excluded (never hit).

    Runs on the sets' device without a host sync; a user listed twice counts once.
    """
    chosen = torch.zeros(targets.num_users, dtype=torch.bool, device=targets.indptr.device)
    chosen[users] = True  # (num_users,)
    row = targets.row_ids()  # (nnz,)
    return (chosen[row] & exclude.contains(row, targets.indices)).sum()


def _metrics_to_cpu(per_user: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"ndcg@10": (U,) float64, ...}`` moved to the CPU in one copy."""
    if not per_user:
        return {}
    values = torch.stack(list(per_user.values())).cpu()  # (M, U)
    return dict(zip(per_user, values.unbind(), strict=True))
