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
    """Which recommended items are targets.

    Args:
        users: (U,) int64 user ids.
        items: (U, K) int64 ranked item ids; ``-1`` (padding) is never a hit.
        targets: the per-user target sets.

    Returns:
        (U, K) bool, ``[i, p]`` true iff ``items[i, p]`` is in ``targets`` of ``users[i]``.
    """
    N = targets.num_items
    row, item = targets.rows(users.cpu())  # (n,), (n,) sorted by row, then item
    keys = row * N + item  # (n,) ascending
    items = items.cpu()
    query = torch.arange(users.numel()).unsqueeze(1) * N + items.clamp(min=0)  # (U, K)
    if keys.numel() == 0:
        return torch.zeros(items.shape, dtype=torch.bool)
    pos = torch.searchsorted(keys, query.reshape(-1)).clamp(max=keys.numel() - 1)  # (U*K,)
    return (keys[pos] == query.reshape(-1)).view(items.shape) & (items >= 0)


@dataclass(frozen=True)
class PerUserResult:
    """Per-user metric values, for significance tests and breakdowns.

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
    ) -> PerUserResult:
        """Per-user metrics of every user with ``|T_u| > 0`` (see :class:`PerUserResult`).

        Args:
            score_fn, targets, exclude, device: as for :meth:`__call__`.
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
        targets = targets.to("cpu")
        n_true_all = targets.sizes()  # (num_users,)
        if users is None:
            users = torch.nonzero(n_true_all > 0).squeeze(1)  # (U,)
        else:
            users = torch.as_tensor(users, dtype=torch.int64).reshape(-1).cpu()
            users = users[n_true_all[users] > 0]  # (U,)
        if exclude is not None:
            exclude = exclude.to("cpu")
            n = _overlap(users, targets, exclude)
            if n and not self._warned:
                log.warning("%d target (user, item) pairs are also excluded and can never be hit", n)
                self._warned = True
        K = max(self.ks)
        _, items = full_sort_topk(
            score_fn,
            users,
            K,
            exclude=exclude,
            chunk_size=self.chunk_size,
            device=device,
            progress=self.progress,
        )  # (U, K)
        hits = hit_matrix(users, items, targets)  # (U, K)
        per_user = compute_metrics(hits, n_true_all[users], self.ks, self.metrics, self.compat)
        return PerUserResult(users=users, metrics=per_user, items=items, hits=hits)

    def __call__(
        self,
        score_fn: ScoreFn,
        targets: ItemSets,
        exclude: ItemSets | None,
        prefix: str = "",
        device: torch.device | str | None = None,
        users: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Evaluate and average over users with ``|T_u| > 0``.

        Args:
            score_fn: ``users (B,) int64 -> (B, n_items)`` scores, e.g. a model's ``score_all``.
            targets: per-user relevant items (validation or test interactions).
            exclude: per-user items removed from the candidates (training items; at test time
                ``train.union(val)``), or ``None``.
            prefix: prepended to every key, e.g. ``"val/"``.
            device: where user ids are sent before ``score_fn``; default: leave them on CPU.
            users: evaluate only these users (those with ``|T_u| = 0`` dropped); default: all.

        Returns:
            ``{prefix + "ndcg@10": float, ..., prefix + "num_users": float}``.
        """
        res = self.per_user(score_fn, targets, exclude, device=device, users=users)
        means = mean_over_users(res.metrics, torch.ones(res.users.numel(), dtype=torch.int64))
        out = {prefix + name: value for name, value in means.items()}
        out[prefix + "num_users"] = float(res.users.numel())
        return out


def _overlap(users: torch.Tensor, targets: ItemSets, exclude: ItemSets) -> int:
    """How many of ``users``' target items are also excluded (they can never be hit)."""
    N = targets.num_items
    t_row, t_item = targets.rows(users)
    e_row, e_item = exclude.rows(users)
    return int(torch.isin(t_row * N + t_item, e_row * N + e_item).sum())
