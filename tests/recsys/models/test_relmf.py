"""Rel-MF: the estimator is unbiased for the ideal loss (the naive one is not), its two loss forms
and the propensity estimators with their refusals (the Coat pipeline: tests/recsys/data/test_mnar.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys.models.relmf import RelMF, relmf_loss
from recsys.propensity import PropensityError, check_clicked, popularity, shipped, uniform


def ideal_loss(logits: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The log-loss ideal: relevance probabilities as soft labels."""
    return (gamma * F.softplus(-logits) + (1 - gamma) * F.softplus(logits)).mean()


@pytest.mark.parametrize("loss", ["log", "squared"])
def test_the_unclipped_estimator_is_unbiased_and_the_naive_one_is_not(loss: str) -> None:
    """Mean over exposure draws of the IPS loss = the ideal loss within 4 standard errors."""
    g = torch.Generator().manual_seed(0)
    n, draws = 400, 4000
    logits = torch.randn(n, generator=g) * 2  # fixed predictions
    gamma = torch.rand(n, generator=g) * 0.6  # P(relevant)
    theta = 0.05 + 0.95 * torch.rand(n, generator=g) ** 2  # P(exposed), MNAR: many small
    relevant = torch.rand(draws, n, generator=g) < gamma  # (draws, n)
    exposed = torch.rand(draws, n, generator=g) < theta
    clicks = (relevant & exposed).float()
    ips = torch.stack([relmf_loss(logits, c, theta, loss) for c in clicks])  # (draws,)
    naive = torch.stack([relmf_loss(logits, c, torch.ones(n), loss) for c in clicks])
    p = torch.sigmoid(logits)
    target = (
        ideal_loss(logits, gamma)
        if loss == "log"
        else (gamma * (1 - p) ** 2 + (1 - gamma) * p**2).mean()  # the squared form's ideal
    )
    se = ips.std() / draws**0.5
    assert abs(ips.mean() - target) < 4 * se
    assert abs(naive.mean() - target) > 20 * (naive.std() / draws**0.5)  # biased, far beyond noise


def test_uniform_propensities_give_the_naive_pointwise_loss_and_zero_theta_is_never_divided() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0])
    clicks = torch.tensor([1.0, 0.0, 0.0])
    want = (F.softplus(-logits) * clicks + F.softplus(logits) * (1 - clicks)).mean()
    assert torch.allclose(relmf_loss(logits, clicks, torch.ones(3)), want)
    got = relmf_loss(logits, clicks, torch.tensor([0.5, 0.0, 0.0]))  # theta 0 where no click
    assert torch.isfinite(got)
    p = torch.sigmoid(logits)
    squared = (2 * (1 - p[0]) ** 2 + (1 - 2) * p[0] ** 2 + p[1] ** 2 + p[2] ** 2) / 3
    assert torch.allclose(relmf_loss(logits, clicks, torch.tensor([0.5, 1.0, 1.0]), "squared"), squared)
    with pytest.raises(ValueError, match="loss must be one of"):
        relmf_loss(logits, clicks, torch.ones(3), "hinge")
    with pytest.raises(ValueError, match="loss must be one of"):
        RelMF(3, 4, loss="hinge")


def test_popularity_propensity_is_the_papers_formula() -> None:
    items = torch.tensor([0, 0, 0, 0, 1, 2, 2])  # counts 4, 1, 2, 0
    users = torch.zeros_like(items)
    prop = popularity(users, items, 1, 4, eta=0.5)
    torch.testing.assert_close(prop.table, torch.tensor([1.0, 0.5, 2**-0.5, 0.0]))
    clipped = popularity(users, items, 1, 4, eta=0.5, clip=0.6)
    torch.testing.assert_close(clipped.table, torch.tensor([1.0, 0.6, 2**-0.5, 0.6]))
    assert "clipped at 0.6" in clipped.name
    assert torch.equal(uniform(users, items, 1, 4).table, torch.ones(4))
    with pytest.raises(PropensityError, match="eta must be >= 0"):
        popularity(users, items, 1, 4, eta=-1.0)
    with pytest.raises(PropensityError, match="clip must lie in"):
        popularity(users, items, 1, 4, clip=2.0)


class _Data:
    name = "toy"

    def __init__(self, frame):
        self.extra = {"propensities": frame}


def _frame(n_users: int, n_items: int, values: list[float]):
    import polars as pl

    users = [u for u in range(n_users) for _ in range(n_items)]
    items = [i for _ in range(n_users) for i in range(n_items)]
    return pl.DataFrame({"user": users, "item": items, "propensity": values})


def test_zero_negative_or_nan_propensities_are_refused_unless_clipped() -> None:
    users, items = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 2])
    data = _Data(_frame(2, 3, [0.5, 0.0, 0.5, -0.1, 0.5, 0.2]))  # (0,1) = 0, (1,0) = -0.1
    prop = shipped(users, items, 2, 3, data)
    with pytest.raises(PropensityError, match=r"2 clicked pairs .* user 0, item 1: 0.0.*> 0"):
        check_clicked(prop, users, items)
    check_clicked(shipped(users, items, 2, 3, data, clip=0.05), users, items)  # clipping repairs them
    nan = _Data(_frame(2, 3, [0.5, float("nan"), 0.5, 0.5, 0.5, 0.2]))
    with pytest.raises(PropensityError, match="1 clicked pairs"):
        check_clicked(shipped(users, items, 2, 3, nan, clip=0.05), users, items)  # NaN: always refused
    check_clicked(popularity(users, items, 2, 3), users, items)  # clicked items have n_i >= 1


def test_a_propensity_table_of_the_wrong_shape_names_both_shapes() -> None:
    data = _Data(_frame(2, 3, [0.5] * 6))
    with pytest.raises(PropensityError, match=r"2 x 3 matrix .* data has 2 users x 4 items"):
        shipped(torch.tensor([0]), torch.tensor([0]), 2, 4, data)
    with pytest.raises(PropensityError, match="ships no 'other' table"):
        shipped(torch.tensor([0]), torch.tensor([0]), 2, 3, data, table="other")
