"""Negative sampling for pairwise (BPR-style) training, vectorised and seeded per epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from retrieval.types import ItemSets


def sample_negatives(
    users: Tensor, positives: ItemSets, num_negatives: int, generator: torch.Generator
) -> Tensor:
    """Uniform negatives: for each user, items outside the user's positive set.

    Exact and rejection-free: draw a rank ``r`` uniformly in ``[0, I - |P_u|)`` and map it
    to the ``r``-th item not in ``P_u``. With ``P_u = {p_0 < p_1 < ...}``, the number of
    non-positives before ``p_k`` is ``p_k - k``, so the ``r``-th non-positive is ``r + j``
    where ``j = #{k : p_k - k <= r}`` (a binary search in the user's CSR row).

    Args:
        users: (N,) int64 user ids.
        positives: the users' positive item sets (CSR, sorted rows).
        num_negatives: negatives per row.
        generator: seeded CPU generator.

    Returns:
        (N, num_negatives) int64 item ids, none of them in the user's positive set.
    """
    n_items = positives.num_items
    free = n_items - positives.sizes()[users]  # (N,)
    if users.numel() and int(free.min()) <= 0:
        bad = int(users[free <= 0][0])
        raise ValueError(
            f"user {bad} has every one of the {n_items} items as a positive, so no negative exists; "
            "filter such users before pairwise training"
        )
    local = torch.arange(positives.indices.numel()) - positives.indptr[:-1].repeat_interleave(
        positives.sizes()
    )
    keys = positives.row_ids() * n_items + (positives.indices - local)  # (nnz,) sorted
    ranks = (torch.rand((users.numel(), num_negatives), generator=generator) * free.unsqueeze(1)).long()
    ranks = torch.minimum(ranks, free.unsqueeze(1) - 1)  # (N, n) guard against rounding up to `free`
    query = users.unsqueeze(1) * n_items + ranks  # (N, n)
    before = torch.searchsorted(keys, query, right=True) - positives.indptr[users].unsqueeze(1)  # (N, n)
    return ranks + before


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
