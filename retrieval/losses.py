r"""Training losses and regularisers of learned sparse retrievers, as small cited pure functions.

Ranking: :func:`info_nce` (in-batch and hard negatives), :func:`margin_mse` and
:func:`kl_distillation` (distillation from a teacher's scores, e.g. the normalised ensemble of
:func:`ensemble_teacher_scores`). Sparsity: :func:`flops`, its inference-free variant
:func:`idf_weighted_flops`, and the :class:`QuadraticWarmup` schedule of their weight.

Masks do not share one convention; each argument says which way it reads:
:func:`info_nce` and :func:`kl_distillation` take ``True`` = *ignore this column*, while
:func:`ensemble_teacher_scores` takes ``True`` = *valid candidate*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "QuadraticWarmup",
    "ensemble_teacher_scores",
    "flops",
    "idf_weighted_flops",
    "info_nce",
    "kl_distillation",
    "margin_mse",
]


def _check_matrix(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a (B, C) matrix, got shape {tuple(x.shape)}")


def _check_mask(mask: Tensor | None, shape: torch.Size, where: str) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"{where}: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{where}: mask has shape {tuple(mask.shape)}, scores have {tuple(shape)}")


def _check_temperature(temperature: float, where: str) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature}")


def _check_threshold(active_threshold: int | None, where: str) -> None:
    if active_threshold is not None and (isinstance(active_threshold, bool) or active_threshold < 0):
        raise ValueError(f"{where}: active_threshold must be an int >= 0 or None, got {active_threshold!r}")


def info_nce(scores: Tensor, targets: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    r"""InfoNCE: cross-entropy of each query's positive against the other candidate columns.

    van den Oord, Li, Vinyals. *Representation Learning with Contrastive Predictive Coding*.
    2018. https://arxiv.org/abs/1807.03748 -- used with in-batch and hard negatives by Karpukhin
    et al. *Dense Passage Retrieval for Open-Domain Question Answering*. 2020.
    https://arxiv.org/abs/2004.04906

    .. math::
        \mathcal{L} = -\frac{1}{B} \sum_{b=1}^{B}
            \log \frac{\exp(s_{b, t_b} / \tau)}{\sum_{c \notin M_b} \exp(s_{bc} / \tau)}

    where :math:`t_b` is the target column of row :math:`b` and :math:`M_b` its masked columns.
    The caller lays out the columns (in-batch documents, hard negatives, or both).

    Args:
        scores: (B, C) query-candidate scores.
        targets: (B,) int64, the column of each row's positive.
        temperature: :math:`\tau > 0` (float, default 1.0).
        mask: (B, C) bool or None; ``True`` marks a column to IGNORE for that row (its score
            is set to :math:`-\infty`), e.g. a query's other positives among the in-batch
            documents. A row's target column must not be masked.

    Returns:
        () the loss, averaged over rows.
    """
    _check_matrix("info_nce: scores", scores)
    if targets.shape != scores.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(
            f"info_nce: targets must be int64 of shape ({scores.shape[0]},), "
            f"got {targets.dtype} of shape {tuple(targets.shape)}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"info_nce: targets must lie in [0, {scores.shape[1]}), got {targets.tolist()}")
    _check_temperature(temperature, "info_nce")
    _check_mask(mask, scores.shape, "info_nce")
    logits = scores / temperature  # (B, C)
    if mask is not None:
        target_masked = mask.gather(1, targets[:, None]).squeeze(1)  # (B,)
        if target_masked.any():
            rows = target_masked.nonzero().flatten().tolist()
            raise ValueError(f"info_nce: the target column is masked in rows {rows}")
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, targets)


def margin_mse(student_pos: Tensor, student_neg: Tensor, teacher_pos: Tensor, teacher_neg: Tensor) -> Tensor:
    r"""Margin-MSE: the student's positive-negative margin regressed on the teacher's.

    Hofstätter, Althammer, Schröder, Sertkan, Hanbury. *Improving Efficient Neural Ranking
    Models with Cross-Architecture Knowledge Distillation*. 2020.
    https://arxiv.org/abs/2010.02666

    .. math::
        \mathcal{L} = \frac{1}{BN} \sum_{b=1}^{B} \sum_{n=1}^{N}
            \bigl((s^+_b - s^-_{bn}) - (t^+_b - t^-_{bn})\bigr)^2

    Args:
        student_pos: (B,) student scores of the positives.
        student_neg: (B, N) student scores of :math:`N` negatives per query.
        teacher_pos: (B,) teacher scores of the positives.
        teacher_neg: (B, N) teacher scores of the negatives.

    Returns:
        () the loss, averaged over the :math:`B \times N` pairs.
    """
    if student_pos.dim() != 1 or student_neg.dim() != 2 or student_neg.shape[0] != student_pos.shape[0]:
        raise ValueError(
            "margin_mse: expected student_pos (B,) and student_neg (B, N), got "
            f"{tuple(student_pos.shape)} and {tuple(student_neg.shape)}"
        )
    if teacher_pos.shape != student_pos.shape or teacher_neg.shape != student_neg.shape:
        raise ValueError(
            "margin_mse: teacher shapes must equal the student's, got teacher_pos "
            f"{tuple(teacher_pos.shape)}, teacher_neg {tuple(teacher_neg.shape)} for student "
            f"{tuple(student_pos.shape)}, {tuple(student_neg.shape)}"
        )
    student_margin = student_pos[:, None] - student_neg  # (B, N)
    teacher_margin = teacher_pos[:, None] - teacher_neg  # (B, N)
    return ((student_margin - teacher_margin) ** 2).mean()


def kl_distillation(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    r"""KL divergence from the teacher's candidate distribution to the student's.

    Hinton, Vinyals, Dean. *Distilling the Knowledge in a Neural Network*. 2015.
    https://arxiv.org/abs/1503.02531 -- used to distil an ensemble of retrievers into an
    inference-free sparse one by Geng, Ru, Yang. *Towards Competitive Search Relevance For
    Inference-Free Learned Sparse Retrievers*. 2024. https://arxiv.org/abs/2411.04403

    .. math::
        p_{bc} = \operatorname{softmax}_{c \notin M_b}(t_{bc} / \tau), \quad
        q_{bc} = \operatorname{softmax}_{c \notin M_b}(s_{bc} / \tau), \quad
        \mathcal{L} = \frac{1}{B} \sum_{b=1}^{B} \sum_{c \notin M_b} p_{bc} \log \frac{p_{bc}}{q_{bc}}

    Masked columns are left out of both softmaxes; their values, even ``inf`` or ``nan``, do
    not change the loss or its gradient. No :math:`\tau^2` factor is applied (scale the loss
    if gradients should not shrink with :math:`\tau`). The teacher is a target: no gradient
    flows to it.

    Args:
        student: (B, C) student scores.
        teacher: (B, C) teacher scores.
        temperature: :math:`\tau > 0` (float, default 1.0), shared by both softmaxes.
        mask: (B, C) bool or None; ``True`` marks a column to IGNORE for that row. Every row
            must keep at least one column.

    Returns:
        () the divergence, averaged over rows ("batchmean").
    """
    _check_matrix("kl_distillation: student", student)
    if teacher.shape != student.shape:
        raise ValueError(
            f"kl_distillation: teacher has shape {tuple(teacher.shape)}, student {tuple(student.shape)}"
        )
    _check_temperature(temperature, "kl_distillation")
    _check_mask(mask, student.shape, "kl_distillation")
    teacher = teacher.detach()
    if mask is None:
        log_q = F.log_softmax(student / temperature, dim=1)  # (B, C)
        p = F.softmax(teacher / temperature, dim=1)  # (B, C)
        return F.kl_div(log_q, p, reduction="batchmean")
    if mask.all(dim=1).any():
        rows = mask.all(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"kl_distillation: every column is masked in rows {rows}")
    log_q = F.log_softmax(student.masked_fill(mask, float("-inf")) / temperature, dim=1)  # (B, C)
    p = F.softmax(teacher.masked_fill(mask, float("-inf")) / temperature, dim=1)  # (B, C)
    # masked columns: p = 0 and log q = -inf; zero both so that no 0 * inf appears (masked_fill
    # also sends a zero gradient back to the -inf entries)
    log_q = log_q.masked_fill(mask, 0.0)
    p = p.masked_fill(mask, 0.0)
    return F.kl_div(log_q, p, reduction="batchmean")


def _mean_abs_over_active_rows(weights: Tensor, active_threshold: int | None) -> Tensor:
    """(V,) mean over rows of ``|weights|``, over the rows with more than ``active_threshold``
    non-zeros only (all rows if None); zeros when no row is left."""
    magnitude = weights.abs()  # (N, V)
    if active_threshold is None:
        return magnitude.mean(dim=0)
    active = (weights != 0).sum(dim=1) > active_threshold  # (N,)
    kept = active.sum().clamp(min=1)
    return (magnitude * active[:, None]).sum(dim=0) / kept  # (V,)


def flops(weights: Tensor, active_threshold: int | None = None) -> Tensor:
    r"""FLOPS regulariser: the squared mean activation of each vocabulary term, summed.

    Paria, Yeh, Yen, Xu, Ravikumar, Póczos. *Minimizing FLOPs to Learn Efficient Sparse
    Representations*. 2020. https://arxiv.org/abs/2004.05665 -- the sparsity term of SPLADE.

    .. math::
        \ell_{\mathrm{FLOPS}} = \sum_{j=1}^{V} \Bigl(\frac{1}{|R|} \sum_{i \in R} |w_{ij}|\Bigr)^2

    With ``active_threshold = None``, :math:`R` is every row. Otherwise :math:`R` holds only
    the rows with more than ``active_threshold`` non-zero weights (the :math:`\ell_0` mask of
    Shen, Geng, Yang. *Exploring* :math:`\ell_0` *Sparsification for Inference-free Sparse
    Retrievers*. 2025. https://arxiv.org/abs/2504.14839): vectors already that sparse are not
    pushed further. The loss is 0 when :math:`R` is empty.

    Args:
        weights: (N, V) sparse representations of a batch (documents or queries).
        active_threshold: int >= 0 or None (default): rows with at most this many non-zeros
            are left out of the mean.

    Returns:
        () the penalty.
    """
    _check_matrix("flops: weights", weights)
    _check_threshold(active_threshold, "flops")
    return (_mean_abs_over_active_rows(weights, active_threshold) ** 2).sum()


def idf_weighted_flops(
    contributions: Tensor, idf: Tensor, active_threshold: int | None = None, eps: float = 1e-6
) -> Tensor:
    r"""IDF-aware FLOPS, written as an explicit penalty on the IDF-weighted contributions.

    Geng, Ru, Yang. *Towards Competitive Search Relevance For Inference-Free Learned Sparse
    Retrievers*. 2024. https://arxiv.org/abs/2411.04403

    An inference-free retriever scores :math:`s(q, d) = \sum_{j \in q} \mathrm{idf}_j\, w_{dj}`:
    the term's contribution is :math:`c_{dj} = \mathrm{idf}_j\, w_{dj}`. This function is

    .. math::
        \ell = \sum_{j=1}^{V} \frac{1}{\max(\mathrm{idf}_j, \epsilon)^2}
            \Bigl(\frac{1}{|R|} \sum_{i \in R} |c_{ij}|\Bigr)^2

    (:math:`R` as in :func:`flops`; :math:`c` and :math:`w` have the same non-zeros). Since
    :math:`|c_{ij}| = \mathrm{idf}_j |w_{ij}|`, for every term with :math:`\mathrm{idf}_j \ge
    \epsilon` this equals plain FLOPS on :math:`w`. So ranking on :math:`s = \sum_{j \in q}
    c_j` with this penalty is the same function of :math:`w` -- hence of the model's
    parameters, with the same gradients -- as ranking on :math:`s = \sum_{j \in q}
    \mathrm{idf}_j w_j` with :func:`flops` on :math:`w` (the "IDF in the score" form). Either
    way :math:`\partial s / \partial w_{dj} = \mathrm{idf}_j` for the query's terms: the ranking
    gradient that keeps a document term alive scales with its IDF, while the penalty's
    gradient does not, so low-IDF expansions lose the balance and are pruned. Seen from
    :math:`c`, the penalty's weight :math:`1/\mathrm{idf}_j^2` is largest for common terms.

    Args:
        contributions: (N, V) IDF-weighted document weights :math:`c = \mathrm{idf} \cdot w`.
        idf: (V,) non-negative IDF of each vocabulary term.
        active_threshold: int >= 0 or None (default), the :math:`\ell_0` mask of :func:`flops`.
        eps: floor of the IDF in the weight (float > 0, default 1e-6); terms with a smaller
            IDF are weighted :math:`1/\epsilon^2`, so the equivalence above holds for
            :math:`\mathrm{idf}_j \ge \epsilon` only.

    Returns:
        () the penalty.
    """
    _check_matrix("idf_weighted_flops: contributions", contributions)
    _check_threshold(active_threshold, "idf_weighted_flops")
    if idf.shape != contributions.shape[1:]:
        raise ValueError(
            f"idf_weighted_flops: idf must have shape ({contributions.shape[1]},), got {tuple(idf.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"idf_weighted_flops: eps must be > 0, got {eps}")
    if (idf < 0).any() or not torch.isfinite(idf).all():
        raise ValueError("idf_weighted_flops: idf must be finite and non-negative")
    penalty_weight = idf.clamp(min=eps).pow(-2)  # (V,)
    mean_contribution = _mean_abs_over_active_rows(contributions, active_threshold)  # (V,)
    return (penalty_weight * mean_contribution**2).sum()


class QuadraticWarmup:
    r"""Regulariser weight that grows quadratically to its final value, then stays there.

    Formal, Lassance, Piwowarski, Clinchant. *SPLADE v2: Sparse Lexical and Expansion Model
    for Information Retrieval*. 2021. https://arxiv.org/abs/2109.10086

    .. math::
        \lambda(t) = \lambda \cdot \min\bigl(1, (t / T)^2\bigr)

    Args:
        weight: final weight :math:`\lambda \ge 0` (float).
        warmup_steps: :math:`T > 0` (int), steps until the final weight is reached.
    """

    def __init__(self, weight: float, warmup_steps: int) -> None:
        if warmup_steps <= 0:
            raise ValueError(f"QuadraticWarmup: warmup steps T must be > 0, got {warmup_steps}")
        if weight < 0:
            raise ValueError(f"QuadraticWarmup: weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        """The weight at optimisation step ``step`` (int >= 0)."""
        if step < 0:
            raise ValueError(f"QuadraticWarmup: step must be >= 0, got {step}")
        return self.weight * min(1.0, (step / self.warmup_steps) ** 2)

    def __repr__(self) -> str:
        return f"QuadraticWarmup(weight={self.weight}, warmup_steps={self.warmup_steps})"


def ensemble_teacher_scores(scores: list[Tensor], mask: Tensor | None = None, scale: float = 30.0) -> Tensor:
    r"""Heterogeneous ensemble teacher: per-row min-max normalised scores, averaged, rescaled.

    Geng, Ru, Yang. *Towards Competitive Search Relevance For Inference-Free Learned Sparse
    Retrievers*. 2024. https://arxiv.org/abs/2411.04403 -- dense and sparse teachers score on
    different scales, so each is brought to :math:`[0, 1]` before they are combined:

    .. math::
        \hat t^{(k)}_{bc} = \frac{t^{(k)}_{bc} - \min_{c' \in V_b} t^{(k)}_{bc'}}
            {\max_{c' \in V_b} t^{(k)}_{bc'} - \min_{c' \in V_b} t^{(k)}_{bc'}}, \qquad
        t_{bc} = \frac{S}{K} \sum_{k=1}^{K} \hat t^{(k)}_{bc}

    over the valid candidates :math:`V_b` of row :math:`b`. A teacher whose valid scores in a
    row are all equal contributes 0 there.

    Args:
        scores: K >= 1 tensors, each (B, C), one per teacher, over the same candidates.
        mask: (B, C) bool or None; ``True`` marks a VALID candidate (None: all are valid).
            Invalid columns may hold anything (``-inf``, ``nan``) and come back as 0; the
            caller masks them in the loss.
        scale: :math:`S` (float, default 30.0), the range of the combined scores.

    Returns:
        (B, C) ensemble scores in :math:`[0, S]`.
    """
    if not scores:
        raise ValueError("ensemble_teacher_scores: expected at least one teacher's scores, got none")
    shape = scores[0].shape
    _check_matrix("ensemble_teacher_scores: scores[0]", scores[0])
    for k, teacher in enumerate(scores):
        if teacher.shape != shape:
            raise ValueError(
                f"ensemble_teacher_scores: scores[{k}] has shape {tuple(teacher.shape)}, "
                f"scores[0] has {tuple(shape)}"
            )
    _check_mask(mask, shape, "ensemble_teacher_scores")
    valid = torch.ones(shape, dtype=torch.bool, device=scores[0].device) if mask is None else mask
    total = torch.zeros(shape, dtype=scores[0].dtype, device=scores[0].device)  # (B, C)
    for teacher in scores:
        low = teacher.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)  # (B, 1)
        high = teacher.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
        spread = high - low  # (B, 1); -inf for a row without valid candidates
        usable = valid & (spread > 0)  # (B, C)
        safe_spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        normalised = (teacher - low) / safe_spread  # (B, C)
        total = total + torch.where(usable, normalised, torch.zeros_like(normalised))
    return total * (scale / len(scores))
