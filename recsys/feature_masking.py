r"""Feature masks that make two views of an item for self-supervised two-tower training.

Yao, Yi, Hong, Cheng, Chen, Chen, Wei, Wang, Kang, Chi, Hong. "Self-supervised Learning for
Large-scale Item Recommendations". CIKM 2021, sec. 3.2. https://arxiv.org/abs/2007.12865

Each function returns two (F,) bool *keep* masks over the F feature fields, one per view, to pass
as ``keep`` to :meth:`recsys.models.two_tower.Tower.forward` (a dropped field contributes the
zero vector). :func:`random_feature_masking` (RFM) and :func:`correlated_feature_masking` (CFM)
are complementary: every field is kept in exactly one view. :func:`feature_dropout` is not.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _entropy(counts: Tensor) -> Tensor:
    """() float64 entropy in nats of the empirical distribution with these counts."""
    p = counts.double() / counts.sum()
    return -(p * p.log()).sum()


def field_mutual_information(codes: Tensor) -> Tensor:
    r"""Pairwise mutual information between feature fields, the plug-in estimate from joint counts.

    .. math::
        I(X_f; X_g) = \sum_{x, y} \hat{p}(x, y) \log \frac{\hat{p}(x, y)}{\hat{p}(x)\,\hat{p}(y)}
                    = H(X_f) + H(X_g) - H(X_f, X_g)

    with :math:`\hat{p}` the empirical frequencies over the N rows, in nats. The diagonal is each
    field's entropy :math:`I(X_f; X_f) = H(X_f)`. This is the MI that Yao et al. (CIKM 2021,
    sec. 3.2) group features by for correlated feature masking.

    Args:
        codes: (N, F) integer codes, one value per row and field; the caller reduces a
            multi-valued field to one code (e.g. its first value, or 0 when empty).

    Returns:
        (F, F) float64 symmetric, non-negative matrix.
    """
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(
            f"codes must be a non-empty (N, F) integer tensor, got shape {tuple(codes.shape)} {codes.dtype}"
        )
    num_fields = codes.shape[1]
    entropy = torch.stack(
        [_entropy(torch.unique(codes[:, f], return_counts=True)[1]) for f in range(num_fields)]
    )  # (F,)
    mi = torch.diag(entropy)  # (F, F)
    for f in range(num_fields):
        for g in range(f + 1, num_fields):
            joint = _entropy(torch.unique(codes[:, [f, g]], dim=0, return_counts=True)[1])
            mi[f, g] = mi[g, f] = (entropy[f] + entropy[g] - joint).clamp(min=0.0)  # rounding can go < 0
    return mi


def _complementary(num_fields: int, masked: Tensor) -> tuple[Tensor, Tensor]:
    """Keep-masks of the two views: the first drops the ``masked`` fields, the second keeps only them.

    Args:
        num_fields: F.
        masked: (..., M) int64 indices of the fields the first view drops, per row.

    Returns:
        Two complementary (..., F) bool keep-masks.
    """
    keep_a = torch.ones(*masked.shape[:-1], num_fields, dtype=torch.bool)  # (..., F)
    keep_a.scatter_(-1, masked, False)
    return keep_a, ~keep_a


def _check_num_fields(num_fields: int) -> None:
    if num_fields < 2:
        raise ValueError(f"masking needs at least 2 feature fields, got {num_fields}")


def _rows(num_examples: int | None) -> tuple[int, ...]:
    """The leading shape of the masks: () for one mask shared by the batch, (B,) for one per example."""
    if num_examples is None:
        return ()
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    return (num_examples,)


def random_feature_masking(
    num_fields: int, generator: torch.Generator | None = None, num_examples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Random feature masking (RFM, Yao et al., CIKM 2021, sec. 3.2): a random half of the fields per view.

    ``num_fields // 2`` fields chosen uniformly are dropped from the first view and kept, alone,
    in the second; every field is kept in exactly one view.

    Args:
        num_fields: F >= 2.
        generator: source of randomness (CPU).
        num_examples: B, to draw one pair of masks per example; ``None``: one pair for the batch.

    Returns:
        Two complementary bool keep-masks, (F,) or (B, F).
    """
    _check_num_fields(num_fields)
    rows = _rows(num_examples)
    order = torch.rand(*rows, num_fields, generator=generator).argsort(-1)  # (..., F) a random permutation
    return _complementary(num_fields, order[..., : num_fields // 2])


def correlated_group(mi: Tensor, seed: int) -> Tensor:
    """The fields that CFM masks together for a seed field: the seed and its most correlated fields.

    ``num_fields // 2`` fields in all: the seed, then the others by decreasing mutual information
    with it (ties to the lower index).

    Args:
        mi: (F, F) mutual information matrix (:func:`field_mutual_information`).
        seed: index of the seed field.

    Returns:
        (F // 2,) int64 field indices, the seed first.
    """
    num_fields = _check_mi(mi)
    if not 0 <= seed < num_fields:
        raise ValueError(f"seed must be a field index in [0, {num_fields}), got {seed}")
    others = torch.tensor([g for g in range(num_fields) if g != seed])  # (F-1,)
    order = torch.sort(-mi[seed, others], stable=True).indices  # (F-1,) decreasing MI
    return torch.cat([torch.tensor([seed]), others[order[: num_fields // 2 - 1]]])


def _check_mi(mi: Tensor) -> int:
    if mi.dim() != 2 or mi.shape[0] != mi.shape[1]:
        raise ValueError(f"mi must be a square (F, F) matrix, got shape {tuple(mi.shape)}")
    _check_num_fields(mi.shape[0])
    return mi.shape[0]


def correlated_feature_masking(
    mi: Tensor, generator: torch.Generator | None = None, num_examples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Correlated feature masking (CFM, Yao et al., CIKM 2021, sec. 3.2).

    A seed field is drawn uniformly; it is masked in the first view together with the fields most
    correlated with it (:func:`correlated_group`, half of the fields in all), and the second view
    keeps exactly those and masks the complement. Masking correlated fields together stops the
    model from recovering a masked field from a correlated kept one. With F < 4 the group is the
    seed alone, so CFM reduces to RFM.

    Args:
        mi: (F, F) mutual information between fields, computed from the data
            (:func:`field_mutual_information`).
        generator: source of randomness (CPU).
        num_examples: B, to draw one seed (and pair of masks) per example; ``None``: one for the batch.

    Returns:
        Two complementary bool keep-masks, (F,) or (B, F).
    """
    num_fields = _check_mi(mi)
    groups = torch.stack([correlated_group(mi, seed) for seed in range(num_fields)])  # (F, F // 2)
    seeds = torch.randint(num_fields, _rows(num_examples), generator=generator)  # () or (B,)
    return _complementary(num_fields, groups[seeds])


def feature_dropout(
    num_fields: int, rate: float, generator: torch.Generator | None = None, num_examples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Feature dropout (FD): each view drops each field independently with probability ``rate``.

    The baseline Yao et al. (CIKM 2021) compare complementary masking against. The views are
    **not** complementary: a field may be kept in both views or dropped in both (and a view may
    drop every field).

    Args:
        num_fields: F >= 1.
        rate: drop probability in [0, 1).
        generator: source of randomness (CPU).
        num_examples: B, for one pair of masks per example; ``None``: one pair for the batch.

    Returns:
        Two independent bool keep-masks, (F,) or (B, F).
    """
    if num_fields < 1:
        raise ValueError(f"num_fields must be >= 1, got {num_fields}")
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    keep = torch.rand(2, *_rows(num_examples), num_fields, generator=generator) >= rate  # (2, ..., F)
    return keep[0], keep[1]
