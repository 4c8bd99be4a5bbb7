"""Ranking types shared by every part of Sparrow: defined here once, used everywhere.

* :class:`Qrels` -- relevance judgements, ``query id -> {doc id: integer label}``.
* :class:`Run` -- a ranking, ``query id -> {doc id: float score}``.
* :class:`ItemSets` -- per-user sets of item ids in CSR form (the recommender side's
  ground truth and exclusion masks).

File formats (read with :meth:`Qrels.from_trec`, :meth:`Qrels.from_beir_tsv`,
:meth:`Qrels.read`, :meth:`Run.from_trec`; written atomically with ``to_trec``):

* TREC qrels: ``qid iter docid label`` -- 4 whitespace-separated fields, ``iter`` ignored,
  ``label`` an integer (may be negative: judged, never relevant).
* BEIR qrels: a header ``query-id<TAB>corpus-id<TAB>score``, then 3 tab-separated fields.
* TREC run: ``qid Q0 docid rank score tag`` -- 6 whitespace-separated fields; ``rank`` must
  be an integer but is ignored (trec_eval re-ranks by score, see :func:`trec_order`),
  ``score`` a float (NaN refused), ``tag`` of the last line becomes :attr:`Run.name`.

Blank lines and lines starting with ``#`` are skipped. A repeated (query, doc) pair is an
error in both qrels and runs (trec_eval also refuses them). Any other problem raises
:class:`~retrieval.data.errors.DataFormatError` naming the file and the 1-based line.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_INT = re.compile(r"[+-]?[0-9]+")
_BEIR_HEADER = ["query-id", "corpus-id", "score"]


def trec_order(docids: Sequence[str] | np.ndarray, scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """The permutation that puts one query's documents in trec_eval's rank order.

    trec_eval (and pytrec_eval, checked bit-for-bit) ranks a query's documents by

    1. score, descending, with scores compared **as float32** (pytrec_eval and the trec_eval
       releases it bundles store ``float sim``): two scores that round to the same float32
       are tied, e.g. ``1.0`` and ``1.0 + 1e-9``, or ``16777216.0`` and ``16777217.0``;
       ``-0.0`` and ``0.0`` are tied;
    2. ties broken by doc id in **descending** byte (``strcmp``) order of the UTF-8 ids, e.g.
       ``"b" > "a" > "B"`` and ``"9" > "10"``.

    The ``rank`` column of a run file plays no part.

    Args:
        docids: (n,) doc ids.
        scores: (n,) scores (any float type; rounded to float32 here). NaN is refused.

    Returns:
        (n,) int64 indices into ``docids``: first the top-ranked document.
    """
    ids = np.asarray(docids, dtype=str)  # (n,) fixed-width unicode: sorts by code point = UTF-8 bytes
    s32 = np.asarray(scores, dtype=np.float64).astype(np.float32) + np.float32(0.0)  # (n,); -0.0 -> 0.0
    if ids.shape != s32.shape or ids.ndim != 1:
        raise ValueError(f"docids and scores must be 1-D of one length, got {ids.shape} and {s32.shape}")
    if np.isnan(s32).any():
        bad = ids[np.isnan(s32)][0]
        raise ValueError(f"score of doc {bad!r} is NaN; NaN scores cannot be ranked")
    # ascending by (score, doc id), then reversed: score descending, doc id descending
    return np.lexsort((ids, s32))[::-1].astype(np.int64)


def _format_error(path: Path, line: int | None, expected: str, found: str | None = None) -> Exception:
    """:class:`retrieval.data.errors.DataFormatError`, imported on first use.

    (``retrieval.data``'s package import pulls in dataset code that itself imports this
    module, so the import is deferred to keep ``retrieval.types`` free of cycles.)
    """
    from retrieval.data.errors import DataFormatError as _DataFormatError

    return _DataFormatError(path, line, expected, found)


def _content_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(1-based line number, line without the newline)``, skipping blank and ``#`` lines."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise _format_error(path, None, "UTF-8 text", f"undecodable bytes at offset {e.start}") from e


def _atomic_write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(path: Path, qid: str, docid: str, doc_field: int) -> int:
    """The first line of ``path`` whose fields 0 and ``doc_field`` are ``qid`` and ``docid``.

    ``doc_field == 1`` means BEIR tsv (tab-separated), else whitespace-separated TREC.
    Only called to word an error message, so the file is scanned again.
    """
    for lineno, line in _content_lines(path):
        fields = [f.strip() for f in line.split("\t")] if doc_field == 1 else line.split()
        if len(fields) > doc_field and fields[0] == qid and fields[doc_field] == docid:
            return lineno
    raise AssertionError("unreachable: the pair was read from this file")


def _add_judgement(
    data: dict, path: Path, lineno: int, qid: str, docid: str, label: str, doc_field: int = 2
) -> None:
    """Add one qrels line to ``data``, refusing a non-integer label or a repeated pair."""
    if not _INT.fullmatch(label):
        raise _format_error(path, lineno, "an integer relevance label", label)
    docs = data.setdefault(qid, {})
    if docid in docs:
        raise _format_error(
            path,
            lineno,
            "one judgement per (query, doc) pair",
            f"({qid}, {docid}) again, first judged on line {_first_line(path, qid, docid, doc_field)}",
        )
    docs[docid] = int(label)


def _check_token(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be written to a TREC file (empty or has whitespace)")
    return value


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

    @classmethod
    def from_trec(cls, path: str | Path, name: str | None = None) -> Qrels:
        """Read TREC qrels: ``qid iter docid label`` per line (see the module docstring).

        Raises:
            DataFormatError: wrong field count, a non-integer label, or a repeated pair.
        """
        path = Path(path)
        data: dict[str, dict[str, int]] = {}
        for lineno, line in _content_lines(path):
            fields = line.split()
            if len(fields) != 4:
                expected = "4 whitespace-separated fields 'qid iter docid label'"
                raise _format_error(path, lineno, expected, line)
            qid, _, docid, label = fields
            _add_judgement(data, path, lineno, qid, docid, label)
        return cls(data, name=path.stem if name is None else name)

    @classmethod
    def from_beir_tsv(cls, path: str | Path, name: str | None = None) -> Qrels:
        """Read BEIR qrels: header ``query-id<TAB>corpus-id<TAB>score``, then 3 tab-separated fields.

        Raises:
            DataFormatError: a missing header, wrong field count, a non-integer score, or a
                repeated pair.
        """
        path = Path(path)
        data: dict[str, dict[str, int]] = {}
        header = True
        for lineno, line in _content_lines(path):
            fields = [f.strip() for f in line.split("\t")]
            if header:
                if fields != _BEIR_HEADER:
                    raise _format_error(path, lineno, "the header 'query-id<TAB>corpus-id<TAB>score'", line)
                header = False
                continue
            if len(fields) != 3 or not all(fields):
                raise _format_error(path, lineno, "3 tab-separated fields 'query-id corpus-id score'", line)
            _add_judgement(data, path, lineno, *fields, doc_field=1)
        if header:
            raise _format_error(path, None, "the header 'query-id<TAB>corpus-id<TAB>score'", "an empty file")
        return cls(data, name=path.stem if name is None else name)

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> Qrels:
        """Read TREC or BEIR qrels, chosen by the first content line (the BEIR header or not)."""
        path = Path(path)
        for _, line in _content_lines(path):
            if [f.strip() for f in line.split("\t")] == _BEIR_HEADER:
                return cls.from_beir_tsv(path, name)
            break
        return cls.from_trec(path, name)

    def to_trec(self, path: str | Path) -> None:
        """Write TREC qrels (``qid 0 docid label``), atomically (temp file + ``os.replace``)."""
        lines = (
            f"{_check_token(q, 'query id')} 0 {_check_token(d, 'doc id')} {label}\n"
            for q, docs in self._data.items()
            for d, label in docs.items()
        )
        _atomic_write_lines(path, lines)


class Run(_NestedMapping):
    """A retrieval run: ``query id -> {doc id: score}`` with float scores.

    The order of a query's documents is trec_eval's (:func:`trec_order`): score descending
    compared as float32, ties by doc id in descending byte order. A query with an empty
    ranking is still "in the run" (as in pytrec_eval).
    """

    _value_type = float

    def ranked(self, qid: str) -> list[tuple[str, float]]:
        """``[(doc id, score), ...]`` of one query in trec_eval's rank order."""
        docs = self._data[qid]
        ids = list(docs)
        order = trec_order(ids, np.fromiter(docs.values(), dtype=np.float64, count=len(ids)))
        return [(ids[i], docs[ids[i]]) for i in order.tolist()]

    @classmethod
    def from_trec(cls, path: str | Path, name: str | None = None) -> Run:
        """Read a TREC run: ``qid Q0 docid rank score tag`` per line (see the module docstring).

        The ``rank`` column is checked to be an integer and otherwise ignored; ``name``
        defaults to the tag of the last line (as trec_eval's ``runid``).

        Raises:
            DataFormatError: wrong field count, a non-integer rank, a non-float or NaN score,
                or a repeated (query, doc) pair.
        """
        path = Path(path)
        data: dict[str, dict[str, float]] = {}
        tag = path.stem
        for lineno, line in _content_lines(path):
            fields = line.split()
            if len(fields) != 6:
                raise _format_error(
                    path, lineno, "6 whitespace-separated fields 'qid Q0 docid rank score tag'", line
                )
            qid, _, docid, rank, score, tag = fields
            if not _INT.fullmatch(rank):
                raise _format_error(path, lineno, "an integer rank in field 4", rank)
            try:
                value = float(score) if "_" not in score else math.nan
            except ValueError:
                value = math.nan
            if math.isnan(value):
                raise _format_error(path, lineno, "a float (not NaN) score in field 5", score)
            docs = data.setdefault(qid, {})
            if docid in docs:
                raise _format_error(
                    path,
                    lineno,
                    "each doc at most once per query",
                    f"({qid}, {docid}) again, first on line {_first_line(path, qid, docid, 2)}",
                )
            docs[docid] = value
        return cls(data, name=tag if name is None else name)

    def to_trec(self, path: str | Path, tag: str | None = None) -> None:
        """Write a TREC run, atomically (temp file + ``os.replace``).

        Documents are written in trec_eval's rank order with ranks 1..n and scores as
        ``repr(float)`` (read back exactly). ``tag`` defaults to :attr:`name`, else ``"sparrow"``.
        """
        tag = _check_token(tag or self.name or "sparrow", "run tag")

        def lines() -> Iterator[str]:
            for qid in self._data:
                _check_token(qid, "query id")
                for rank, (doc, score) in enumerate(self.ranked(qid), 1):
                    yield f"{qid} Q0 {_check_token(doc, 'doc id')} {rank} {score!r} {tag}\n"

        _atomic_write_lines(path, lines())


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
    def from_pairs(cls, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int) -> ItemSets:
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
        return cls(
            torch.zeros(num_users + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), num_items
        )

    def union(self, other: ItemSets) -> ItemSets:
        """Per-user union of two sets over the same users and items."""
        if self.num_users != other.num_users or self.num_items != other.num_items:
            raise ValueError("ItemSets.union needs the same users and items")
        users = torch.cat([self.row_ids(), other.row_ids()])
        items = torch.cat([self.indices, other.indices])
        return ItemSets.from_pairs(users, items, self.num_users, self.num_items)

    def restrict(self, keep_items: torch.Tensor) -> ItemSets:
        """The same sets holding only the items where ``keep_items`` ((num_items,) bool) is true."""
        if keep_items.dtype != torch.bool or keep_items.shape != (self.num_items,):
            raise ValueError(
                f"keep_items must be a ({self.num_items},) bool mask, "
                f"got {tuple(keep_items.shape)} {keep_items.dtype}"
            )
        kept = keep_items.to(self.indices.device)[self.indices]  # (nnz,)
        return ItemSets.from_pairs(self.row_ids()[kept], self.indices[kept], self.num_users, self.num_items)

    def row_ids(self) -> torch.Tensor:
        """(nnz,) int64: the user of each stored item (no host sync on a GPU)."""
        users = torch.arange(self.num_users, device=self.indptr.device)
        return torch.repeat_interleave(users, self.sizes(), output_size=self.indices.numel())

    def rows(self, users: torch.Tensor, output_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sets of a batch of users as COO pairs, on the sets' device.

        Args:
            users: (B,) int64 user ids.
            output_size: (int | None) ``n``, the number of pairs, if the caller knows it: on a GPU
                this saves the host sync that sizing the output takes. Default: ``None``.

        Returns:
            (row, item): (n,) int64 each; ``row`` indexes into ``users`` (0..B-1).
        """
        users = users.to(self.indptr.device)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts  # (B,)
        row = torch.repeat_interleave(
            torch.arange(users.numel(), device=users.device), lengths, output_size=output_size
        )  # (n,)
        first = torch.cumsum(lengths, 0) - lengths  # (B,) where each user's pairs start in row
        offsets = torch.arange(row.numel(), device=users.device) - torch.repeat_interleave(
            first, lengths, output_size=row.numel()
        )  # (n,)
        return row, self.indices[starts[row] + offsets]

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each (user, item) pair is in the sets, on the sets' device without a host sync.

        A binary search over the sorted ``user * num_items + item`` keys of all stored pairs.

        Args:
            users: int64 user ids, broadcastable against ``items``, on the sets' device.
            items: int64 item ids in ``[0, num_items)``.

        Returns:
            bool tensor of the broadcast shape of ``users`` and ``items``.
        """
        keys = self.row_ids() * self.num_items + self.indices  # (nnz,) ascending: by user, then item
        query = users * self.num_items + items  # (...)
        if keys.numel() == 0:
            return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
        pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)  # (...)
        return keys[pos] == query

    def to(self, device: torch.device | str) -> ItemSets:
        return ItemSets(self.indptr.to(device), self.indices.to(device), self.num_items)
