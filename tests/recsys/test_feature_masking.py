import math

import pytest
import torch
from torch import Tensor

from recsys.feature_masking import (
    correlated_feature_masking,
    correlated_group,
    feature_dropout,
    field_mutual_information,
    random_feature_masking,
)


def _noisy_copy(x: Tensor, noise: float, g: torch.Generator, vocab: int) -> Tensor:
    replace = torch.rand(x.shape, generator=g) < noise
    return torch.where(replace, torch.randint(vocab, x.shape, generator=g), x)


def _codes(pairs: list[tuple[int, int]], n: int = 3000, vocab: int = 6, seed: int = 0) -> Tensor:
    """(n, 4) codes: in each of ``pairs`` the second field is a noisy copy of the first, the rest random."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(vocab, (n, 4), generator=g)
    for source, copy in pairs:
        codes[:, copy] = _noisy_copy(codes[:, source], 0.1, g, vocab)
    return codes


def test_mutual_information_of_known_distributions() -> None:
    # all 4 x 3 combinations once: uniform marginals, exactly independent
    a, b = torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij")
    codes = torch.stack([a.flatten(), b.flatten(), a.flatten() + 10], dim=1)  # field 2 = relabelled field 0
    mi = field_mutual_information(codes)
    torch.testing.assert_close(torch.diag(mi), torch.tensor([math.log(4), math.log(3), math.log(4)]).double())
    assert mi[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert mi[0, 2].item() == pytest.approx(math.log(4))  # a bijection keeps all the information


@pytest.mark.parametrize("seed", [0, 1])
def test_mutual_information_is_symmetric_non_negative_with_entropy_diagonal(seed: int) -> None:
    codes = _codes([(0, 1)], n=500, seed=seed)
    mi = field_mutual_information(codes)
    assert mi.shape == (4, 4)
    torch.testing.assert_close(mi, mi.T)
    assert (mi >= 0).all()
    for f in range(4):
        counts = torch.bincount(codes[:, f]).double()
        p = counts[counts > 0] / counts.sum()
        assert mi[f, f].item() == pytest.approx(-(p * p.log()).sum().item())
        assert (mi[f] <= mi[f, f] + 1e-12).all()  # I(X; Y) <= H(X)
    assert mi[0, 1] > 10 * mi[0, 2]


def test_cfm_groups_are_computed_from_the_data() -> None:
    # fields 0 and 1 correlated, 2 and 3 independent
    mi_01 = field_mutual_information(_codes([(0, 1)]))
    assert correlated_group(mi_01, 0).tolist() == [0, 1]
    assert correlated_group(mi_01, 1).tolist() == [1, 0]
    # the same fields, but now 0 correlates with 3 instead: the group changes
    mi_03 = field_mutual_information(_codes([(0, 3)]))
    assert correlated_group(mi_03, 0).tolist() == [0, 3]
    assert correlated_group(mi_03, 3).tolist() == [3, 0]


@pytest.mark.parametrize("pairs", [[(0, 1), (2, 3)], [(0, 3), (2, 1)], [(0, 2), (1, 3)]])
def test_cfm_keeps_correlated_fields_in_the_same_view(pairs: list[tuple[int, int]]) -> None:
    mi = field_mutual_information(_codes(pairs))
    g = torch.Generator().manual_seed(0)
    seeds_masked = torch.zeros(4, dtype=torch.bool)
    for _ in range(30):
        keep_a, keep_b = correlated_feature_masking(mi, g)
        for f, h in pairs:  # every seed's group is its pair, so each pair lands in one view
            assert keep_a[f] == keep_a[h] and keep_b[f] == keep_b[h] and keep_a[f] != keep_b[f]
        seeds_masked |= ~keep_a
    assert seeds_masked.all()  # both pairs were drawn


@pytest.mark.parametrize("num_fields", [2, 3, 4, 7, 10])
@pytest.mark.parametrize("method", ["rfm", "cfm"])
def test_views_are_complementary(num_fields: int, method: str) -> None:
    g = torch.Generator().manual_seed(num_fields)
    mi = torch.rand(num_fields, num_fields, generator=g)
    mi = mi + mi.T
    seen_masked = torch.zeros(num_fields, dtype=torch.bool)
    for _ in range(30):
        if method == "rfm":
            keep_a, keep_b = random_feature_masking(num_fields, g)
        else:
            keep_a, keep_b = correlated_feature_masking(mi, g)
        assert keep_a.dtype == keep_b.dtype == torch.bool and keep_a.shape == (num_fields,)
        assert (keep_a ^ keep_b).all()  # every field masked in exactly one view
        assert (~keep_a).sum().item() == num_fields // 2
        seen_masked |= ~keep_a
    assert seen_masked.all()  # the masked half varies with the seed


def test_cfm_group_is_the_top_half_by_mutual_information() -> None:
    mi = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.3, 0.2, 0.4],
            [0.1, 9.0, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.0, 9.0, 0.0, 0.0, 0.0],
            [0.3, 0.0, 0.0, 9.0, 0.0, 0.0],
            [0.2, 0.0, 0.0, 0.0, 9.0, 0.0],
            [0.4, 0.0, 0.0, 0.0, 0.0, 9.0],
        ]
    )
    assert correlated_group(mi, 0).tolist() == [0, 2, 5]


def test_feature_dropout_is_independent_per_view() -> None:
    g = torch.Generator().manual_seed(0)
    views = [torch.stack(feature_dropout(8, 0.5, g)) for _ in range(400)]  # (2, 8) each
    keep = torch.stack(views).float()  # (400, 2, 8)
    assert keep.mean().item() == pytest.approx(0.5, abs=0.03)
    both_dropped = ((keep[:, 0] == 0) & (keep[:, 1] == 0)).float().mean().item()
    assert both_dropped == pytest.approx(0.25, abs=0.03)  # not complementary: 1/4 dropped in both views
    assert all(v.all() for v in feature_dropout(5, 0.0, g))


def test_bad_input_raises_clearly() -> None:
    with pytest.raises(ValueError, match="integer"):
        field_mutual_information(torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        field_mutual_information(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="square"):
        correlated_feature_masking(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        random_feature_masking(1)
    with pytest.raises(ValueError, match="seed"):
        correlated_group(torch.zeros(4, 4), 4)
    with pytest.raises(ValueError, match="rate"):
        feature_dropout(4, 1.0)


@pytest.mark.parametrize("num_fields", [2, 5, 8])
def test_per_example_masks(num_fields: int) -> None:
    """num_examples=B gives (B, F) masks: complementary per row, each row a valid view, rows differ."""
    g = torch.Generator().manual_seed(3)
    mi = field_mutual_information(torch.randint(4, (500, num_fields), generator=g))
    groups = {tuple(sorted(correlated_group(mi, s).tolist())) for s in range(num_fields)}
    for keep_a, keep_b in (
        random_feature_masking(num_fields, g, num_examples=256),
        correlated_feature_masking(mi, g, num_examples=256),
    ):
        assert keep_a.shape == keep_b.shape == (256, num_fields)
        assert torch.equal(keep_a, ~keep_b)
        assert (~keep_a).sum(1).eq(num_fields // 2).all()
        assert len({tuple(row.tolist()) for row in keep_a}) > 1  # not one mask copied down the batch
    _, keep_b = correlated_feature_masking(mi, g, num_examples=256)
    assert {tuple(torch.nonzero(row).squeeze(1).tolist()) for row in keep_b} <= groups
    a, b = feature_dropout(num_fields, 0.5, g, num_examples=256)
    assert a.shape == b.shape == (256, num_fields) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="num_examples"):
        random_feature_masking(num_fields, g, num_examples=0)
