"""Negative sampling for pairwise (BPR-style) training, vectorised and seeded per epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from retrieval.types import ItemSets


def sample_negatives(
    users: Tensor, positives: ItemSets, num_negatives: int, generator: torch.Generator, max_rounds: int = 100
) -> Tensor:
    """Uniform negatives: for each user, items outside the user's positive set.

    Rejection sampling, vectorised: draw all candidates, redraw only the collisions.

    Args:
        users: (N,) int64 user ids.
        positives: the users' positive item sets (CSR, sorted rows).
        num_negatives: negatives per row.
        generator: seeded CPU generator.
        max_rounds: redraw rounds before giving up (only a user who has interacted
            with almost every item can exhaust it).

    Returns:
        (N, num_negatives) int64 item ids, none of them in the user's positive set.
    """
    n_items = positives.num_items
    keys = positives.row_ids() * n_items + positives.indices  # (nnz,) sorted
    shape = (users.numel(), num_negatives)
    negatives = torch.randint(n_items, shape, generator=generator)  # (N, n)
    user_keys = users.unsqueeze(1) * n_items  # (N, 1)
    for _ in range(max_rounds):
        cand = user_keys + negatives  # (N, n)
        pos = torch.searchsorted(keys, cand).clamp(max=max(keys.numel() - 1, 0))
        clash = keys[pos] == cand if keys.numel() else torch.zeros_like(cand, dtype=torch.bool)
        n_clash = int(clash.sum())
        if n_clash == 0:
            return negatives
        negatives[clash] = torch.randint(n_items, (n_clash,), generator=generator)
    full = positives.sizes()[users].max().item()
    raise RuntimeError(
        f"negative sampling failed after {max_rounds} rounds: some user has {full} of {n_items} items "
        "as positives; filter such users (k-core / max-degree) or lower num_negatives"
    )


class PairwiseBatches(IterableDataset):
    """Shuffled batches of (user, positive, negatives) triples, resampled every epoch.

    The permutation and the negatives of epoch ``e`` come from a generator seeded with
    ``seed + e``, so a run resumed at epoch ``e`` sees exactly the batches an
    uninterrupted run would.

    Args:
        users: (N,) int64 user of each training interaction.
        items: (N,) int64 item of each training interaction.
        positives: every user's training items (the set negatives must avoid).
        batch_size: triples per batch.
        num_negatives: negatives per triple.
        seed: base seed.
        epoch_fn: returns the current epoch (the trainer's counter).
    """

    def __init__(
        self,
        users: Tensor,
        items: Tensor,
        positives: ItemSets,
        batch_size: int,
        num_negatives: int,
        seed: int,
        epoch_fn: Callable[[], int],
    ):
        super().__init__()
        self.users, self.items, self.positives = users, items, positives
        self.batch_size, self.num_negatives, self.seed = batch_size, num_negatives, seed
        self.epoch_fn = epoch_fn

    def __len__(self) -> int:
        return -(-self.users.numel() // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch_fn())
        order = torch.randperm(self.users.numel(), generator=gen)
        users, items = self.users[order], self.items[order]
        negatives = sample_negatives(users, self.positives, self.num_negatives, gen)  # (N, n)
        for start in range(0, users.numel(), self.batch_size):
            end = start + self.batch_size
            yield {"users": users[start:end], "pos": items[start:end], "neg": negatives[start:end]}


class UserBatches(IterableDataset):
    """Batches of user ids, in order, for full-sort evaluation.

    Args:
        users: (U,) int64 ids of the users to evaluate.
        batch_size: users per batch (bounds the (B, num_items) score block).
    """

    def __init__(self, users: Tensor, batch_size: int):
        super().__init__()
        self.users, self.batch_size = users, batch_size

    def __len__(self) -> int:
        return -(-self.users.numel() // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for start in range(0, self.users.numel(), self.batch_size):
            yield {"users": self.users[start : start + self.batch_size]}
