r"""Recommender top-K metrics as pure functions of a hit matrix.

Input everywhere: ``hits (U, K) bool`` with ``hits[u, p]`` true iff the item at rank ``p + 1`` of
user ``u``'s list is in the user's target set :math:`T_u`, and ``n_true (U,)`` with
:math:`|T_u|`. Every function returns a ``(U, K)`` float64 tensor whose column ``k - 1`` is the
metric at cutoff ``k``, for every ``k <= K`` at once. Relevance is binary (:math:`rel_p \in \{0,1\}`).

Sparrow's convention (``STYLE.md``; RecBole's, and ``torch_geometric.metrics``' unweighted
``LinkPred*`` metrics compute exactly the same values):

.. math::

    \mathrm{DCG@}K &= \sum_{p=1}^{K} \frac{rel_p}{\log_2(p + 1)}, \qquad
    \mathrm{IDCG@}K = \sum_{p=1}^{\min(K, |T_u|)} \frac{1}{\log_2(p + 1)}, \qquad
    \mathrm{NDCG@}K = \mathrm{DCG@}K / \mathrm{IDCG@}K \\
    \mathrm{Recall@}K &= \frac{\sum_{p \le K} rel_p}{|T_u|}, \qquad
    \mathrm{Precision@}K = \frac{\sum_{p \le K} rel_p}{K}, \qquad
    \mathrm{Hit@}K = [\sum_{p \le K} rel_p > 0] \\
    \mathrm{MRR@}K &= 1 / \text{rank of the first hit within } K \text{ (0 if none)} \\
    \mathrm{MAP@}K &= \frac{\sum_{p \le K} \mathrm{P@}p \cdot rel_p}{\min(K, |T_u|)}
    \quad \text{(RecBole's normalisation)}

``"dcg"`` (DCG@K itself, unnormalised) is available on request, not in the default set.

Every function gives the same bits on the CPU and on a GPU: running sums are added left to right
(the CPU's order) and the ``log2`` discounts are computed on the CPU.

Precision divides by ``K`` even when a list is padded (fewer than ``K`` candidates). A user with
:math:`|T_u| = 0` gets 0 from every function here and must be left out of averages:
:func:`mean_over_users` does that.

Opt-in compatibility variants, each reported under its own name:

* ``ndcg_ideal_from_retrieved`` -> ``"ndcg_ngcf@k"``. NGCF's released code
  (xiangwang1223/neural_graph_collaborative_filtering, ``NGCF/utility/batch_test.py`` and
  ``metrics.py``; HKUDS/LLMRec's ``utility/`` has the same two functions) builds ``r``, the 0/1
  hit list of the top ``max(Ks)`` non-training items (``heapq.nlargest``), and
  computes ``ndcg_at_k(r, K) = dcg_at_k(r, K) / dcg_at_k(sorted(r, reverse=True), K)`` (0 when the
  ideal is 0). The ideal list is the *retrieved list's own hits* moved to the front, so
  :math:`\mathrm{IDCG} = \sum_{p=1}^{\min(K, h)} 1/\log_2(p+1)` with :math:`h` = the number of hits
  in the top ``max(Ks)`` -- the whole retrieved list, not the top ``K``; NDCG@K therefore depends on
  the largest cutoff evaluated. Here :math:`h` is counted over all ``K`` columns of ``hits``, so pass
  a hit matrix as wide as that paper's ``max(Ks)``. Since :math:`h \le |T_u|`, this value is never
  below the standard NDCG, and equals it whenever all of :math:`T_u` (or at least ``K`` items of
  it) is retrieved. (Their other functions match ours: ``recall_at_k`` = hits@K / |T_u|,
  ``precision_at_k`` = mean of ``r[:K]`` (the same for a full list), ``hit_at_k``; their
  candidates are all items minus the *training* items only -- LLMRec does not mask validation
  items at test time.)
* ``recall_min_k`` -> ``"recall_mink@k"``: hits over :math:`\min(K, |T_u|)` instead of
  :math:`|T_u|`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

Tensor = torch.Tensor

METRICS = ("ndcg", "recall", "precision", "mrr", "hit", "map")  # the default set
EXTRA_METRICS = ("dcg",)  # on request: unnormalised DCG@K (the Rel-MF paper's Coat protocol)
COMPAT = {"ndcg_ideal_from_retrieved": "ndcg_ngcf", "recall_min_k": "recall_mink"}  # mode -> report name


def _check(hits: Tensor, n_true: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    if hits.dim() != 2:
        raise ValueError(f"hits must be (U, K), got shape {tuple(hits.shape)}")
    hits = hits.to(torch.bool)
    if n_true is not None:
        n_true = torch.as_tensor(n_true, device=hits.device).to(torch.int64).reshape(-1)
        if n_true.numel() != hits.shape[0]:
            raise ValueError(f"n_true has {n_true.numel()} users, hits has {hits.shape[0]}")
        if (n_true < hits.sum(1)).any():
            raise ValueError("a user has more hits than targets (n_true < hits.sum(1))")
    return hits, n_true


def _ranks(hits: Tensor) -> Tensor:
    """(K,) float64: 1, 2, ..., K."""
    return torch.arange(1, hits.shape[1] + 1, dtype=torch.float64, device=hits.device)


def _num_hits(hits: Tensor) -> Tensor:
    """(U, K) float64: hits within the top k, per k."""
    return torch.cumsum(hits, dim=1, dtype=torch.float64)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _running_sum(x: Tensor) -> Tensor:
    """(U, K) float64: ``torch.cumsum(x, dim=1)`` with the CPU's bits on every device.

    The CPU's ``cumsum`` adds left to right; CUDA's is a parallel scan, whose rounding can differ,
    so off the CPU the columns are added one by one (:func:`_cumsum_left_to_right`).
    """
    return torch.cumsum(x, dim=1) if x.device.type == "cpu" else _cumsum_left_to_right(x)


def _cumsum_left_to_right(x: Tensor) -> Tensor:
    """(U, K): running sum along dim 1 in column order, ``K - 1`` elementwise adds."""
    out = x.clone()
    for p in range(1, x.shape[1]):
        out[:, p] += out[:, p - 1]
    return out


def _log2_ranks(K: int) -> Tensor:
    """(K,) float64 on the CPU: log2(p + 1) for p = 1..K (a GPU's log2 may round differently)."""
    return torch.log2(torch.arange(2, K + 2, dtype=torch.float64))


def _idcg(n_ideal: Tensor, K: int) -> Tensor:
    """(U, K) float64: ideal DCG at every cutoff given ``n_ideal`` (U, K) ideal hit counts."""
    disc = 1.0 / _log2_ranks(K)  # (K,)
    table = torch.cat([disc.new_zeros(1), torch.cumsum(disc, 0)])  # (K + 1,) table[n] = sum_{p<=n}
    return table.to(n_ideal.device)[n_ideal]


def _dcg(hits: Tensor) -> Tensor:
    """(U, K) float64: DCG at every cutoff."""
    return _running_sum(hits / _log2_ranks(hits.shape[1]).to(hits.device))


def _min_k(n: Tensor, K: int) -> Tensor:
    """(U, K) int64: min(k, n_u) for k = 1..K."""
    ks = torch.arange(1, K + 1, device=n.device)
    return torch.minimum(ks.unsqueeze(0), n.unsqueeze(1))


def ndcg(hits: Tensor, n_true: Tensor) -> Tensor:
    """NDCG@k for k = 1..K: DCG over the list, IDCG over min(k, |T_u|) ideal hits.

    Args:
        hits: (U, K) bool.
        n_true: (U,) int |T_u|.

    Returns:
        (U, K) float64; 0 for users with |T_u| = 0.
    """
    hits, n_true = _check(hits, n_true)
    return _safe_div(_dcg(hits), _idcg(_min_k(n_true, hits.shape[1]), hits.shape[1]))


def dcg(hits: Tensor, n_true: Tensor | None = None) -> Tensor:
    """DCG@k for k = 1..K, not normalised (Saito et al., WSDM 2020, report it on Coat and Yahoo! R3).

    Returns:
        (U, K) float64.
    """
    hits, _ = _check(hits, n_true)
    return _dcg(hits)


def ndcg_ideal_from_retrieved(hits: Tensor, n_true: Tensor | None = None) -> Tensor:
    """NGCF/LLMRec's NDCG@k: the ideal DCG comes from the retrieved list's own hits.

    IDCG@k sums ``1 / log2(p + 1)`` for ``p <= min(k, h_u)`` where ``h_u = hits[u].sum()`` is the
    number of hits in the *whole* ``K``-long list (NGCF's ``max(Ks)``); 0 when ``h_u = 0``.

    Args:
        hits: (U, K) bool, as wide as the largest cutoff of the reproduced paper.
        n_true: (U,) unused; accepted for a uniform signature.

    Returns:
        (U, K) float64.
    """
    hits, _ = _check(hits, n_true)
    n_ret = hits.sum(1)  # (U,) hits over the whole retrieved list
    return _safe_div(_dcg(hits), _idcg(_min_k(n_ret, hits.shape[1]), hits.shape[1]))


def recall(hits: Tensor, n_true: Tensor) -> Tensor:
    """Recall@k = hits@k / |T_u|.  Returns (U, K) float64, 0 for |T_u| = 0."""
    hits, n_true = _check(hits, n_true)
    return _safe_div(_num_hits(hits), n_true.to(torch.float64).unsqueeze(1))


def recall_min_k(hits: Tensor, n_true: Tensor) -> Tensor:
    """Recall@k over min(k, |T_u|) (compatibility mode).  Returns (U, K) float64."""
    hits, n_true = _check(hits, n_true)
    return _safe_div(_num_hits(hits), _min_k(n_true, hits.shape[1]).to(torch.float64))


def precision(hits: Tensor, n_true: Tensor | None = None) -> Tensor:
    """Precision@k = hits@k / k.  Returns (U, K) float64."""
    hits, _ = _check(hits, n_true)
    return _num_hits(hits) / _ranks(hits)


def mrr(hits: Tensor, n_true: Tensor | None = None) -> Tensor:
    """MRR@k = 1 / rank of the first hit within the top k, 0 if none.  Returns (U, K) float64."""
    hits, _ = _check(hits, n_true)
    if hits.shape[1] == 0:
        return torch.zeros(hits.shape, dtype=torch.float64, device=hits.device)
    return torch.cummax(hits / _ranks(hits), dim=1).values  # first hit has the largest 1/p


def hit(hits: Tensor, n_true: Tensor | None = None) -> Tensor:
    """Hit@k = 1 if any of the top k is a hit, else 0.  Returns (U, K) float64."""
    hits, _ = _check(hits, n_true)
    return (_num_hits(hits) > 0).to(torch.float64)


def map_(hits: Tensor, n_true: Tensor) -> Tensor:
    """MAP@k = sum_{p<=k} P@p * rel_p / min(k, |T_u|) (RecBole's).  Returns (U, K) float64."""
    hits, n_true = _check(hits, n_true)
    ap_num = _running_sum(_num_hits(hits) / _ranks(hits) * hits)  # (U, K)
    return _safe_div(ap_num, _min_k(n_true, hits.shape[1]).to(torch.float64))


METRIC_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ndcg": ndcg,
    "recall": recall,
    "precision": precision,
    "mrr": mrr,
    "hit": hit,
    "map": map_,
    "dcg": dcg,
    "ndcg_ngcf": ndcg_ideal_from_retrieved,
    "recall_mink": recall_min_k,
}


def metric_names(metrics: Iterable[str] = METRICS, compat: Iterable[str] = ()) -> list[str]:
    """Report names (without ``@k``) for ``metrics`` plus the compatibility modes ``compat``."""
    metrics, compat = list(metrics), list(compat)
    for m in metrics:
        if m not in METRICS + EXTRA_METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {METRICS + EXTRA_METRICS}")
    for c in compat:
        if c not in COMPAT:
            raise ValueError(f"unknown compatibility mode {c!r}; choose from {tuple(COMPAT)}")
    return metrics + [COMPAT[c] for c in compat]


def compute_metrics(
    hits: Tensor,
    n_true: Tensor,
    ks: Iterable[int],
    metrics: Iterable[str] = METRICS,
    compat: Iterable[str] = (),
) -> dict[str, Tensor]:
    """Per-user metrics at the cutoffs ``ks``.

    Args:
        hits: (U, K) bool with ``K >= max(ks)``; ``ndcg_ngcf`` uses all ``K`` columns as the
            retrieved list.
        n_true: (U,) int |T_u|.
        ks: cutoffs, each in ``1..K``.
        metrics: names from :data:`METRICS`.
        compat: compatibility modes from :data:`COMPAT` (``"ndcg_ideal_from_retrieved"``,
            ``"recall_min_k"``).

    Returns:
        ``{"ndcg@10": (U,) float64, ...}``, keys ``name@k`` in the order metrics x ks.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 or k > hits.shape[1] for k in ks):
        raise ValueError(f"cutoffs {ks} must lie in 1..{hits.shape[1]} (the width of hits)")
    out: dict[str, Tensor] = {}
    for name in metric_names(metrics, compat):
        table = METRIC_FNS[name](hits, n_true)  # (U, K)
        for k in ks:
            out[f"{name}@{k}"] = table[:, k - 1]
    return out


def mean_over_users(per_user: Mapping[str, Tensor], n_true: Tensor) -> dict[str, float]:
    """Average each ``(U,)`` metric over the users with ``|T_u| > 0``; NaN if there are none."""
    valid = torch.as_tensor(n_true).reshape(-1) > 0  # (U,)
    n = int(valid.sum())
    return {
        name: float(v[valid.to(v.device)].sum() / n) if n else float("nan") for name, v in per_user.items()
    }
