"""Ranking, distillation and sparsity losses against hand computations and naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.losses import (
    QuadraticWarmup,
    ensemble_teacher_scores,
    flops,
    idf_weighted_flops,
    info_nce,
    kl_distillation,
    margin_mse,
)


def naive_info_nce(scores: torch.Tensor, targets: torch.Tensor, temperature: float, ignore) -> float:
    total = 0.0
    for b in range(scores.shape[0]):
        kept = [c for c in range(scores.shape[1]) if not ignore[b][c]]
        denominator = sum(math.exp(scores[b, c].item() / temperature) for c in kept)
        total -= math.log(math.exp(scores[b, targets[b]].item() / temperature) / denominator)
    return total / scores.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 0.05])
@pytest.mark.parametrize("shape", [(1, 2), (4, 7)])
def test_info_nce_is_cross_entropy(shape: tuple[int, int], temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(shape, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, shape[1], (shape[0],), generator=gen)
    loss = info_nce(scores, targets, temperature)
    assert torch.allclose(loss, F.cross_entropy(scores / temperature, targets))
    no_mask = [[False] * shape[1]] * shape[0]
    assert loss.item() == pytest.approx(naive_info_nce(scores, targets, temperature, no_mask), rel=1e-9)


def test_info_nce_mask_drops_columns() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 2, 4])
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = True
    loss = info_nce(scores, targets, 0.5, mask)
    assert loss.item() == pytest.approx(naive_info_nce(scores, targets, 0.5, mask.tolist()), rel=1e-9)
    assert loss < info_nce(scores, targets, 0.5)  # fewer negatives, smaller loss
    changed = scores.clone()
    changed[mask] = 1e3
    assert torch.equal(info_nce(changed, targets, 0.5, mask), loss)


@pytest.mark.parametrize(
    ("targets", "mask", "message"),
    [
        (torch.tensor([0, 1]), torch.tensor([[True, False], [False, False]]), "target column is masked"),
        (torch.tensor([0, 2]), None, r"targets must lie in \[0, 2\)"),
        (torch.tensor([0, 1], dtype=torch.int32), None, "int64"),
        (torch.tensor([0]), None, "int64 of shape"),
        (torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.bool), "mask has shape"),
    ],
)
def test_info_nce_rejects_bad_input(targets: torch.Tensor, mask, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        info_nce(torch.zeros(2, 2), targets, mask=mask)


def test_info_nce_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.zeros(2, 2), torch.tensor([0, 1]), temperature=0.0)


def test_margin_mse_hand_value() -> None:
    student_pos = torch.tensor([3.0, 1.0])
    student_neg = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    teacher_pos = torch.tensor([10.0, 5.0])
    teacher_neg = torch.tensor([[9.0, 6.0], [5.0, 5.0]])
    # margins: student [[2, 1], [1, -3]], teacher [[1, 4], [0, 0]] -> squared errors 1, 9, 1, 9
    loss = margin_mse(student_pos, student_neg, teacher_pos, teacher_neg)
    assert loss.item() == pytest.approx(5.0)
    assert margin_mse(teacher_pos + 2.0, teacher_neg + 2.0, teacher_pos, teacher_neg).item() == 0.0


def test_margin_mse_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="teacher shapes"):
        margin_mse(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"student_neg \(B, N\)"):
        margin_mse(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))


def manual_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, ignore) -> float:
    total = 0.0
    for b in range(student.shape[0]):
        kept = [c for c in range(student.shape[1]) if not ignore[b][c]]
        p = torch.softmax(teacher[b, kept] / temperature, dim=0)
        q = torch.softmax(student[b, kept] / temperature, dim=0)
        total += (p * (p.log() - q.log())).sum().item()
    return total / student.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_distillation_equals_manual_kl(masked: bool, temperature: float) -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=gen) < 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = False
    ignore = mask.tolist() if masked else [[False] * 6] * 3
    loss = kl_distillation(student, teacher, temperature, mask)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(manual_kl(student, teacher, temperature, ignore), rel=1e-9)
    assert kl_distillation(teacher, teacher, temperature, mask).abs().item() < 1e-12


def test_kl_distillation_ignores_masked_values_and_stays_finite() -> None:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, generator=gen)
    mask = torch.tensor([[False, False, True, False, True], [True, False, False, False, False]])
    loss = kl_distillation(student, teacher, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert (student.grad[mask] == 0).all()
    wild_student = student.detach().masked_fill(mask, float("inf"))
    wild_teacher = teacher.masked_fill(mask, float("nan"))
    assert torch.allclose(kl_distillation(wild_student, wild_teacher, mask=mask), loss)
    # the masked columns left out by hand give the same loss
    kept = ~mask[1]
    row = kl_distillation(student[1:, kept], teacher[1:, kept])
    assert row.item() == pytest.approx(kl_distillation(student[1:], teacher[1:], mask=mask[1:]).item())


def test_kl_distillation_rejects_fully_masked_row() -> None:
    mask = torch.tensor([[False, True], [True, True]])
    with pytest.raises(ValueError, match=r"every column is masked in rows \[1\]"):
        kl_distillation(torch.zeros(2, 2), torch.zeros(2, 2), mask=mask)


def naive_flops(weights: torch.Tensor, active_threshold: int | None) -> float:
    rows = weights.tolist()
    if active_threshold is not None:
        rows = [row for row in rows if sum(v != 0 for v in row) > active_threshold]
    if not rows:
        return 0.0
    return sum((sum(abs(row[j]) for row in rows) / len(rows)) ** 2 for j in range(weights.shape[1]))


def test_flops_hand_value() -> None:
    weights = torch.tensor([[1.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    # column means of |w|: 2, 0, 1.5
    assert flops(weights).item() == pytest.approx(4.0 + 2.25)
    assert flops(-weights).item() == pytest.approx(4.0 + 2.25)
    # threshold 1 drops the second row (one non-zero): means 1, 0, 3
    assert flops(weights, active_threshold=1).item() == pytest.approx(1.0 + 9.0)
    assert flops(weights, active_threshold=2).item() == 0.0


@pytest.mark.parametrize("active_threshold", [None, 0, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_flops_matches_naive(seed: int, active_threshold: int | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.relu(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    assert flops(weights, active_threshold).item() == pytest.approx(naive_flops(weights, active_threshold))


def test_flops_threshold_excludes_rows_from_gradient() -> None:
    weights = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 0.0]], requires_grad=True)
    flops(weights, active_threshold=1).backward()
    assert (weights.grad[1] == 0).all()
    assert torch.allclose(weights.grad[0], 2 * torch.tensor([1.0, 2.0, 3.0]))


def test_flops_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="active_threshold"):
        flops(torch.zeros(2, 3), active_threshold=-1)
    with pytest.raises(ValueError, match=r"\(B, C\) matrix"):
        flops(torch.zeros(3))


def test_idf_weighted_flops_hand_value() -> None:
    idf = torch.tensor([2.0, 0.5, 1e-9])
    contributions = torch.tensor([[2.0, 1.0, 1.0], [6.0, 0.0, 0.0]])
    # column means 4, 0.5, 0.5 weighted by 1/4, 4, 1/eps^2
    expected = 16 / 4 + 0.25 * 4 + 0.25 / 1e-12
    assert idf_weighted_flops(contributions, idf).item() == pytest.approx(expected)
    assert idf_weighted_flops(contributions, idf, eps=1.0).item() == pytest.approx(4 + 0.25 + 0.25)
    with pytest.raises(ValueError, match=r"idf must have shape \(3,\)"):
        idf_weighted_flops(contributions, idf[:2])
    with pytest.raises(ValueError, match="non-negative"):
        idf_weighted_flops(contributions, -idf)


def _tiny_retrieval_batch():
    gen = torch.Generator().manual_seed(4)
    features, vocab, n_queries, docs_per_query = 5, 8, 3, 3
    weights = torch.randn(features, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    docs = torch.randn(n_queries * docs_per_query, features, generator=gen, dtype=torch.float64)
    queries = (torch.rand(n_queries, vocab, generator=gen) < 0.5).double()  # binary bag of terms
    idf = torch.rand(vocab, generator=gen, dtype=torch.float64) * 5 + 0.1
    idf[[1, 5]] = torch.tensor([1e-4, 3e-3], dtype=torch.float64)  # tiny IDFs, still above eps
    targets = torch.arange(n_queries) * docs_per_query
    return weights, docs, queries, idf, targets


@pytest.mark.parametrize("active_threshold", [None, 3])
def test_idf_weighted_flops_has_the_gradient_of_idf_in_the_score(active_threshold: int | None) -> None:
    weights, docs, queries, idf, targets = _tiny_retrieval_batch()
    lam = 0.7

    def idf_in_score(params: torch.Tensor) -> torch.Tensor:  # form A: plain FLOPS on w
        w = torch.relu(docs @ params)  # (N, V) document term weights
        return info_nce((queries * idf) @ w.T, targets) + lam * flops(w, active_threshold)

    def idf_in_penalty(params: torch.Tensor) -> torch.Tensor:  # form B: score c = idf * w
        c = idf * torch.relu(docs @ params)  # (N, V) contributions
        return info_nce(queries @ c.T, targets) + lam * idf_weighted_flops(c, idf, active_threshold)

    def plain_flops_on_contributions(params: torch.Tensor) -> torch.Tensor:
        c = idf * torch.relu(docs @ params)  # (N, V)
        return info_nce(queries @ c.T, targets) + lam * flops(c, active_threshold)

    w = torch.relu(docs @ weights)
    assert (w == 0).any() and (w > 0).any()
    if active_threshold is not None:  # the l0 mask drops some documents and keeps others
        nonzeros = (w != 0).sum(dim=1)
        assert (nonzeros <= active_threshold).any() and (nonzeros > active_threshold).any()
    losses = [form(weights) for form in (idf_in_score, idf_in_penalty, plain_flops_on_contributions)]
    grad_a, grad_b, grad_naive = (torch.autograd.grad(loss, weights)[0] for loss in losses)
    assert torch.allclose(losses[0], losses[1], rtol=1e-12, atol=0)
    assert torch.allclose(grad_a, grad_b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grad_a, grad_naive, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (50, 0.25), (100, 1.0), (200, 1.0), (10, 0.01)])
def test_quadratic_warmup_values(step: int, expected: float) -> None:
    schedule = QuadraticWarmup(weight=3e-4, warmup_steps=100)
    assert schedule(step) == pytest.approx(3e-4 * expected)


@pytest.mark.parametrize(
    ("weight", "warmup_steps", "message"),
    [(1.0, 0, "T must be > 0, got 0"), (1.0, -5, "T must be > 0, got -5"), (-1.0, 10, "weight must be >= 0")],
)
def test_quadratic_warmup_rejects_bad_arguments(weight: float, warmup_steps: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuadraticWarmup(weight, warmup_steps)


def test_ensemble_teacher_scores_min_max_and_scale() -> None:
    dense = torch.tensor([[10.0, 20.0, 15.0], [1.0, 1.0, 1.0]])
    sparse = torch.tensor([[0.0, 4.0, 4.0], [3.0, 1.0, 2.0]])
    out = ensemble_teacher_scores([dense, sparse], scale=10.0)
    # row 0: dense -> 0, 1, 0.5; sparse -> 0, 1, 1. row 1: dense is constant -> 0; sparse -> 1, 0, 0.5
    expected = torch.tensor([[0.0, 1.0, 0.75], [0.5, 0.0, 0.25]]) * 10.0
    assert torch.allclose(out, expected)
    assert torch.allclose(ensemble_teacher_scores([sparse]), 30.0 * torch.tensor([[0, 1, 1], [1, 0, 0.5]]))


def test_ensemble_teacher_scores_uses_valid_columns_only() -> None:
    teacher = torch.tensor([[100.0, 2.0, 4.0, 3.0], [float("-inf"), 5.0, 5.0, float("nan")]])
    valid = torch.tensor([[False, True, True, True], [False, True, True, False]])
    out = ensemble_teacher_scores([teacher], mask=valid, scale=1.0)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.isfinite(ensemble_teacher_scores([teacher], mask=torch.zeros(2, 4, dtype=torch.bool))).all()


def test_ensemble_teacher_scores_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ensemble_teacher_scores([])
    with pytest.raises(ValueError, match=r"scores\[1\] has shape \(2, 2\)"):
        ensemble_teacher_scores([torch.zeros(2, 3), torch.zeros(2, 2)])
