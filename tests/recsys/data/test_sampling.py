import pytest
import torch

from recsys.data.sampling import NegativeSampler, PairwiseBatches, UserBatches
from retrieval.types import ItemSets


def _sets(n_users: int = 50, n_items: int = 40, density: float = 0.5, seed: int = 0) -> ItemSets:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_users, n_items, generator=g) < density
    mask[torch.arange(n_users), torch.arange(n_users) % n_items] = False  # every user has a negative
    mask[0, 1:] = True  # user 0 has exactly one negative: item 0
    users, items = mask.nonzero(as_tuple=True)
    return ItemSets.from_pairs(users, items, n_users, n_items)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.99])
@pytest.mark.parametrize("num_negatives", [1, 4])
def test_negatives_never_hit_positives(density: float, num_negatives: int) -> None:
    sets = _sets(density=density)
    users = sets.row_ids()
    neg = NegativeSampler(sets).sample(users, num_negatives, torch.Generator().manual_seed(1))
    assert neg.shape == (users.numel(), num_negatives)
    dense = torch.zeros(sets.num_users, sets.num_items, dtype=torch.bool)
    dense[sets.row_ids(), sets.indices] = True
    assert not dense[users.unsqueeze(1).expand_as(neg), neg].any()
    assert neg.min() >= 0 and neg.max() < sets.num_items
    assert (neg[users == 0] == 0).all()


def test_negatives_are_uniform_over_non_positives() -> None:
    # one user with items {1, 3} positive out of 6: negatives uniform over {0, 2, 4, 5}
    sets = ItemSets.from_pairs(torch.tensor([0, 0]), torch.tensor([3, 1]), 1, 6)
    users = torch.zeros(40000, dtype=torch.int64)
    neg = NegativeSampler(sets).sample(users, 1, torch.Generator().manual_seed(0))
    counts = torch.bincount(neg.flatten(), minlength=6).float() / 40000
    assert counts[1] == 0 and counts[3] == 0
    assert (counts[[0, 2, 4, 5]] - 1 / 4).abs().max() < 0.02


def test_user_with_every_item_gives_a_clear_error() -> None:
    sets = ItemSets.from_pairs(torch.zeros(3, dtype=torch.int64), torch.arange(3), 1, 3)
    with pytest.raises(ValueError, match="user 0 has every one of the 3 items"):
        NegativeSampler(sets).sample(torch.tensor([0]), 1, torch.Generator().manual_seed(0))


def test_pairwise_batches_cover_the_epoch_and_depend_only_on_seed_and_epoch() -> None:
    sets = _sets()
    users, items = sets.row_ids(), sets.indices
    epoch = {"e": 0}
    ds = PairwiseBatches(
        users, items, sets, batch_size=64, num_negatives=2, seed=7, epoch_fn=lambda: epoch["e"]
    )
    first = list(ds)
    assert len(first) == len(ds)
    seen = torch.cat([b["users"] * 1000 + b["pos"] for b in first]).sort().values
    assert torch.equal(seen, (users * 1000 + items).sort().values)  # every interaction once
    again = list(ds)
    assert all(torch.equal(a["neg"], b["neg"]) for a, b in zip(first, again, strict=True))
    epoch["e"] = 1
    other = list(ds)
    assert not torch.equal(first[0]["pos"], other[0]["pos"])


def test_user_batches_cover_users_in_order() -> None:
    users = torch.arange(10)
    batches = [b["users"] for b in UserBatches(users, 4)]
    assert [b.numel() for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), users)


def test_uniform_users_draws_users_uniformly_and_only_their_positives() -> None:
    # user 0 has 1 positive, user 1 has 9: interaction order would favour user 1 nine to one
    users = torch.tensor([0] + [1] * 9)
    items = torch.tensor([5] + list(range(9)))
    sets = ItemSets.from_pairs(users, items, 3, 10)  # user 2 has none and is never drawn
    ds = PairwiseBatches(
        users.repeat(2000), items.repeat(2000), sets, 4096, 1, 0, lambda: 0, positive_draw="uniform_users"
    )
    batch = torch.cat([b["users"] * 100 + b["pos"] for b in ds])
    drawn_users = batch // 100
    assert (drawn_users == 2).sum() == 0
    assert abs((drawn_users == 0).float().mean().item() - 0.5) < 0.02
    assert ((batch[drawn_users == 0] % 100) == 5).all()
    assert set((batch[drawn_users == 1] % 100).tolist()) == set(range(9))


def test_unknown_positive_draw_is_refused() -> None:
    sets = _sets()
    with pytest.raises(ValueError, match="positive_draw must be one of"):
        PairwiseBatches(sets.row_ids(), sets.indices, sets, 8, 1, 0, lambda: 0, positive_draw="bogus")
