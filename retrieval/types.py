"""Ranking types shared by every part of Sparrow: defined here once, used everywhere.

* :class:`Qrels` -- relevance judgements, ``query id -> {doc id: integer label}``.
* :class:`Run` -- a ranking, ``query id -> {doc id: float score}``.
* :class:`ItemSets` -- per-user sets of item ids in CSR form (the recommender side's
  ground truth and exclusion masks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch


class _NestedMapping(Mapping):
    """A read-only ``str -> {str: value}`` mapping with light validation."""

    _value_type: type = object

    def __init__(self, data: Mapping[str, Mapping[str, object]] | None = None, name: str = ""):
        self.name = name
        self._data: dict[str, dict[str, object]] = {}
        for qid, docs in (data or {}).items():
            self._data[str(qid)] = {str(d): self._value_type(v) for d, v in docs.items()}

    def __getitem__(self, qid: str) -> dict:
        return self._data[qid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        n = sum(len(d) for d in self._data.values())
        return f"{type(self).__name__}(name={self.name!r}, queries={len(self)}, pairs={n})"

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {q: dict(d) for q, d in self._data.items()}


class Qrels(_NestedMapping):
    """Relevance judgements: ``query id -> {doc id: label}`` with integer labels.

    Labels <= 0 are judged non-relevant (trec_eval's convention).
    """

    _value_type = int

    def num_pairs(self) -> int:
        return sum(len(d) for d in self._data.values())


class Run(_NestedMapping):
    """A retrieval run: ``query id -> {doc id: score}`` with float scores."""

    _value_type = float


@dataclass(frozen=True)
class ItemSets:
    """Per-user item sets in CSR form.

    Row ``u`` holds ``indices[indptr[u]:indptr[u + 1]]``, sorted ascending, no duplicates.

    Attributes:
        indptr: (num_users + 1,) int64 row pointers.
        indices: (nnz,) int64 item ids.
        num_items: (int) size of the item catalogue.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    num_items: int

    @property
    def num_users(self) -> int:
        return self.indptr.numel() - 1

    def sizes(self) -> torch.Tensor:
        """(num_users,) int64: |set| per user."""
        return self.indptr[1:] - self.indptr[:-1]

    @classmethod
    def from_pairs(
        cls, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int
    ) -> ItemSets:
        """Build from parallel (user, item) id tensors; duplicates are dropped."""
        users = torch.as_tensor(users, dtype=torch.int64)
        items = torch.as_tensor(items, dtype=torch.int64)
        if users.numel() and (users.min() < 0 or users.max() >= num_users):
            raise ValueError(f"user ids must be in [0, {num_users}), got [{users.min()}, {users.max()}]")
        if items.numel() and (items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"item ids must be in [0, {num_items}), got [{items.min()}, {items.max()}]")
        keys = torch.unique(users * num_items + items)  # sorted: by user, then item
        rows = keys // num_items
        counts = torch.bincount(rows, minlength=num_users)
        indptr = torch.zeros(num_users + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        return cls(indptr=indptr, indices=keys % num_items, num_items=num_items)

    @classmethod
    def empty(cls, num_users: int, num_items: int) -> ItemSets:
        return cls(torch.zeros(num_users + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), num_items)

    def union(self, other: ItemSets) -> ItemSets:
        """Per-user union of two sets over the same users and items."""
        if self.num_users != other.num_users or self.num_items != other.num_items:
            raise ValueError("ItemSets.union needs the same users and items")
        users = torch.cat([self.row_ids(), other.row_ids()])
        items = torch.cat([self.indices, other.indices])
        return ItemSets.from_pairs(users, items, self.num_users, self.num_items)

    def row_ids(self) -> torch.Tensor:
        """(nnz,) int64: the user of each stored item."""
        return torch.repeat_interleave(torch.arange(self.num_users), self.sizes())

    def rows(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sets of a batch of users as COO pairs.

        Args:
            users: (B,) int64 user ids.

        Returns:
            (row, item): (n,) int64 each; ``row`` indexes into ``users`` (0..B-1).
        """
        users = users.to(self.indptr.device)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts  # (B,)
        row = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), lengths)
        offsets = torch.arange(row.numel(), device=users.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        return row, self.indices[starts[row] + offsets]

    def to(self, device: torch.device | str) -> ItemSets:
        return ItemSets(self.indptr.to(device), self.indices.to(device), self.num_items)
