"""Feature tables: a dataset's side information as the id tensors a two-tower model reads.

The fields follow the towers of Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
Corpus Item Recommendations", RecSys 2019 (https://doi.org/10.1145/3298689.3346996): each entity
is described by F categorical or multi-valued fields, each field a padded list of value ids
(see :class:`recsys.models.two_tower.Tower`).

A *spec* is a plain mapping ``field name -> extractor`` (it comes as-is from a Hydra config)::

    {"gender": "categorical", "genres": "multi", "title": "tokens", "zip": "prefix:2"}

Extractors (the field name is the column it reads, or the group for ``onehot_group``):

- ``categorical``: the column's one value (``str(value)``); null gives no value.
- ``multi``: the values of a list column (duplicates dropped, order kept).
- ``tokens``: lowercased word tokens (``\\w+``) of a string, a trailing ``"(YYYY)"`` removed.
- ``prefix:N``: the first N characters of ``str(value)`` (e.g. a zip code's region).
- ``onehot_group``: every column ``"<group>:<value>"`` equal to 1 gives ``<value>``
  (Coat's binary feature matrices); several may be set.

Vocabulary of every field: id 0 = ``"<pad>"``, id 1 = ``"<oov>"``, then the values seen when
fitting, sorted as strings, from id 2 on. :func:`fit_feature_table` fits the vocabularies and
encodes the training entities; :func:`encode` encodes new rows (serving time) with those
vocabularies, mapping unseen values to ``<oov>`` and counting them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

log = logging.getLogger(__name__)

PAD, OOV = "<pad>", "<oov>"
SPECIALS = (PAD, OOV)
ID_FIELD = "id"
"""Name (and extractor) of the optional per-row identity field."""

EXTRACTORS = ("categorical", "multi", "tokens", "prefix:N", "onehot_group")
"""Extractor names a spec may use (``N`` a positive integer)."""

ML1M_USER: dict[str, str] = {
    "gender": "categorical",
    "age": "categorical",
    "occupation": "categorical",
    "zip": "prefix:2",
}
"""MovieLens-1M user fields: gender, age code, occupation code, first two zip digits."""

ML1M_ITEM: dict[str, str] = {"genres": "multi", "title": "tokens", "year": "categorical"}
"""MovieLens-1M item fields: genres, title words (year removed), release year."""

COAT_USER: dict[str, str] = {
    "gender": "onehot_group",
    "age": "onehot_group",
    "location": "onehot_group",
    "fashioninterest": "onehot_group",
}
"""Coat user fields: one per group of the 14 binary user features."""

COAT_ITEM: dict[str, str] = {
    "gender": "onehot_group",
    "jackettype": "onehot_group",
    "color": "onehot_group",
    "onfrontpage": "onehot_group",
}
"""Coat item fields: one per group of the 33 binary item features."""

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FeatureTable:
    """Encoded feature fields of N entities (users or items).

    Attributes:
        names: (list[str]) the F field names.
        extractors: (list[str]) each field's extractor (``"id"`` for the identity field).
        vocabularies: (list[list[str]]) per field, the value strings; index = id,
            ``[0] = "<pad>"``, ``[1] = "<oov>"``.
        fields: (list[Tensor]) F int64 tensors of shape (N, L_f), padded with 0; row r = entity r.
        oov_counts: (dict[str, int]) per field, how many values were mapped to ``<oov>``
            while encoding (0 for a freshly fitted table).
    """

    names: list[str]
    extractors: list[str]
    vocabularies: list[list[str]]
    fields: list[Tensor]
    oov_counts: dict[str, int]

    @property
    def vocab_sizes(self) -> list[int]:
        """Vocabulary size of each field, padding and ``<oov>`` included (a ``Tower``'s argument)."""
        return [len(v) for v in self.vocabularies]

    @property
    def num_rows(self) -> int:
        """Number of encoded entities N."""
        return self.fields[0].shape[0]

    def row_values(self, row: int) -> dict[str, list[str]]:
        """The value strings of one row, per field (padding left out), e.g. for inspection."""
        return {
            name: [vocab[i] for i in ids.tolist() if i != 0]
            for name, vocab, ids in zip(
                self.names, self.vocabularies, (f[row] for f in self.fields), strict=True
            )
        }


def _prefix_length(extractor: str) -> int:
    n = extractor.removeprefix("prefix:")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"extractor {extractor!r}: expected 'prefix:N' with N a positive integer")
    return int(n)


def _group_columns(frame: pl.DataFrame, group: str) -> list[str]:
    columns = [c for c in frame.columns if c.startswith(f"{group}:")]
    if not columns:
        groups = sorted({c.split(":", 1)[0] for c in frame.columns if ":" in c})
        raise ValueError(
            f"one-hot group {group!r}: no column '{group}:*' in the frame; groups present: {groups}"
        )
    return columns


def _check_column(frame: pl.DataFrame, column: str, extractor: str) -> None:
    if column not in frame.columns:
        raise ValueError(
            f"field {column!r} ({extractor}): column {column!r} missing from the frame; "
            f"columns: {frame.columns}"
        )


def _categorical(value: object) -> list[str]:
    return [] if value is None else [str(value)]


def _multi(value: Sequence[object] | None) -> list[str]:
    return [] if value is None else list(dict.fromkeys(str(v) for v in value if v is not None))


def _tokens(value: object) -> list[str]:
    return [] if value is None else list(dict.fromkeys(_WORD.findall(_YEAR.sub("", str(value)).lower())))


def _per_value(extractor: str) -> Callable[[object], list[str]]:
    if extractor == "categorical":
        return _categorical
    if extractor == "multi":
        return _multi
    if extractor == "tokens":
        return _tokens
    if extractor.startswith("prefix:"):
        n = _prefix_length(extractor)
        return lambda v: [] if v is None else [str(v)[:n]]
    raise ValueError(f"unknown extractor {extractor!r}; known: {', '.join(EXTRACTORS)}")


def extract(frame: pl.DataFrame, name: str, extractor: str) -> list[list[str]]:
    """One field's value strings for every row of ``frame``.

    Args:
        frame: (pl.DataFrame) the feature frame.
        name: (str) the field: the column read, or the group for ``onehot_group``.
        extractor: (str) one of :data:`EXTRACTORS`.

    Returns:
        list[list[str]]: per row of ``frame``, the field's values (possibly none).

    Raises:
        ValueError: unknown extractor, or a column / group missing from ``frame``.
    """
    if extractor == "onehot_group":
        columns = _group_columns(frame, name)
        values = [c.split(":", 1)[1] for c in columns]
        return [
            [v for v, bit in zip(values, row, strict=True) if bit == 1]
            for row in frame.select(columns).rows()
        ]
    fn = _per_value(extractor)
    _check_column(frame, name, extractor)
    return [fn(v) for v in frame[name].to_list()]


def _keys(frame: pl.DataFrame, key: str) -> list[int]:
    if key not in frame.columns:
        raise ValueError(f"key column {key!r} missing from the frame; columns: {frame.columns}")
    keys = frame[key]
    if not keys.dtype.is_integer() or keys.null_count():
        raise ValueError(f"key column {key!r}: expected non-null integer ids, got {keys.dtype}")
    if keys.n_unique() != len(keys):
        raise ValueError(f"key column {key!r}: ids must be unique, {len(keys) - keys.n_unique()} duplicates")
    return keys.to_list()


def _placement(keys: list[int], num_rows: int, ids: Sequence[int] | Tensor | None) -> list[int | None]:
    """Row of each frame row (None: not placed), given the optional ``ids[row] = dataset id``."""
    if ids is None:
        bad = [k for k in keys if not 0 <= k < num_rows]
        if bad:
            raise ValueError(f"key ids must lie in [0, num_rows={num_rows}), got e.g. {bad[:5]}")
        return list(keys)
    ids = torch.as_tensor(ids).tolist()
    if len(ids) != num_rows:
        raise ValueError(f"ids must have num_rows={num_rows} entries (ids[row] = dataset id), got {len(ids)}")
    row_of = {d: r for r, d in enumerate(ids)}
    if len(row_of) != len(ids):
        raise ValueError("ids must not repeat a dataset id")
    return [row_of.get(k) for k in keys]


def _fit_vocabulary(values: list[list[str]]) -> list[str]:
    seen = {v for row in values for v in row} - set(SPECIALS)
    return [*SPECIALS, *sorted(seen)]


def _to_ids(values: list[list[str]], vocabulary: list[str]) -> tuple[list[list[int]], int]:
    """Value strings -> ids (unseen -> 1), and how many were unseen."""
    index = {v: i for i, v in enumerate(vocabulary)}
    rows = [[index.get(v, 1) for v in row] for row in values]
    return rows, sum(r.count(1) for r in rows)


def _pad(rows: list[list[int]], placement: list[int | None], num_rows: int) -> Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.zeros(num_rows, width, dtype=torch.int64)  # (N, L_f)
    for row, ids in zip(placement, rows, strict=True):
        if row is not None and ids:
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def _check_spec(spec: Mapping[str, str], with_id: bool) -> dict[str, str]:
    spec = {str(k): str(v) for k, v in spec.items()}
    if not spec and not with_id:
        raise ValueError("spec lists no field and with_id is False: a feature table needs >= 1 field")
    if with_id and ID_FIELD in spec:
        raise ValueError(f"field name {ID_FIELD!r} is reserved for with_id=True; rename it in the spec")
    for extractor in spec.values():
        if extractor != "onehot_group":
            _per_value(extractor)
    return spec


def fit_feature_table(
    frame: pl.DataFrame,
    key: str,
    spec: Mapping[str, str],
    num_rows: int,
    ids: Sequence[int] | Tensor | None = None,
    with_id: bool = False,
) -> FeatureTable:
    """Fit the vocabularies on ``frame`` and encode its entities into an N-row table.

    Args:
        frame: (pl.DataFrame) one row per entity: the ``key`` column and the spec's columns.
        key: (str) the id column, e.g. ``"user"`` or ``"item"`` (unique integer dataset ids).
        spec: (Mapping[str, str]) field name -> extractor, e.g. :data:`ML1M_USER`.
        num_rows: (int) N, the number of rows (entities) of the table.
        ids: (Sequence[int] | Tensor | None) when a datamodule compacted the ids,
            ``ids[row] = dataset id``: row ``row`` takes the features of dataset id ``ids[row]``
            and frame rows whose id is not listed are left out. Default None (row = dataset id,
            which must lie in ``[0, N)``).
        with_id: (bool) add a last field ``"id"`` whose value is the row index (vocabulary size
            N + 2). Default False.

    Returns:
        FeatureTable: N rows; rows without a frame row are all padding. Vocabularies are fitted
        on every frame row, placed or not.

    Raises:
        ValueError: unknown extractor, missing column/group, bad key column or ``ids``.
    """
    spec = _check_spec(spec, with_id)
    placement = _placement(_keys(frame, key), num_rows, ids)
    names, extractors, vocabularies, fields = [], [], [], []
    for name, extractor in spec.items():
        values = extract(frame, name, extractor)
        vocabulary = _fit_vocabulary(values)
        rows, _ = _to_ids(values, vocabulary)
        names.append(name)
        extractors.append(extractor)
        vocabularies.append(vocabulary)
        fields.append(_pad(rows, placement, num_rows))
    if with_id:
        names.append(ID_FIELD)
        extractors.append(ID_FIELD)
        vocabularies.append([*SPECIALS, *map(str, range(num_rows))])
        fields.append(torch.arange(2, num_rows + 2, dtype=torch.int64).unsqueeze(1))  # (N, 1)
    empty = num_rows - len({p for p in placement if p is not None})
    sizes = dict(zip(names, (len(v) for v in vocabularies), strict=True))
    log.info(
        "feature table on %r: %d rows (%d without features), vocab sizes %s", key, num_rows, empty, sizes
    )
    return FeatureTable(names, extractors, vocabularies, fields, {n: 0 for n in names})


def fit_side_tables(
    data,
    specs: tuple[Mapping[str, str] | None, Mapping[str, str] | None],
    ids: tuple[Tensor, Tensor],
    with_id: bool = False,
) -> tuple[FeatureTable | None, FeatureTable | None]:
    """A datamodule's user and item tables from a dataset's side information.

    Args:
        data: the dataset (:func:`recsys.data.registry.load_interactions`), with ``name``,
            ``user_features`` and ``item_features`` frames (``None`` where it has none).
        specs: (user spec, item spec); ``None`` skips that side.
        ids: ((U,), (I,)) int64 dataset id of each user and item row.
        with_id: add the id field to both tables.

    Raises:
        ValueError: a spec for a side the dataset has no information about (or as in
            :func:`fit_feature_table`).
    """
    tables = []
    for kind, spec, frame, rows in zip(
        ("user", "item"), specs, (data.user_features, data.item_features), ids, strict=True
    ):
        if spec is None:
            tables.append(None)
            continue
        if frame is None:
            raise ValueError(f"data.{kind}_features is set, but {data.name} has no {kind} side information")
        table = fit_feature_table(frame, kind, dict(spec), rows.numel(), ids=rows, with_id=with_id)
        log.info("%s features: %s", kind, dict(zip(table.names, table.vocab_sizes, strict=True)))
        tables.append(table)
    return tables[0], tables[1]


def encode(table: FeatureTable, frame: pl.DataFrame, key: str) -> FeatureTable:
    """Encode new rows with ``table``'s fitted vocabularies (e.g. items added at serving time).

    Values never seen when fitting map to id 1 (``<oov>``) and are counted per field. The
    ``"id"`` field (if any) reads the ``key`` column as row indices of ``table``: a key outside
    ``[0, table.num_rows)`` is a new entity and maps to ``<oov>``.

    Args:
        table: (FeatureTable) a fitted table (from :func:`fit_feature_table`).
        frame: (pl.DataFrame) the new rows: the ``key`` column and the fields' columns.
        key: (str) the id column.

    Returns:
        FeatureTable: same names and vocabularies, ``len(frame)`` rows in frame order, and
        ``oov_counts`` the number of values per field mapped to ``<oov>``.

    Raises:
        ValueError: a column / group of the table's fields missing from ``frame``, bad key column.
    """
    keys = _keys(frame, key)
    placement = list(range(len(keys)))
    fields, oov_counts = [], {}
    for name, extractor, vocabulary in zip(table.names, table.extractors, table.vocabularies, strict=True):
        values = [[str(k)] for k in keys] if extractor == ID_FIELD else extract(frame, name, extractor)
        rows, oov = _to_ids(values, vocabulary)
        fields.append(_pad(rows, placement, len(keys)))
        oov_counts[name] = oov
    if any(oov_counts.values()):
        log.info("encoded %d new rows on %r; values mapped to <oov>: %s", len(keys), key, oov_counts)
    return FeatureTable(list(table.names), list(table.extractors), table.vocabularies, fields, oov_counts)


__all__ = [
    "COAT_ITEM",
    "COAT_USER",
    "EXTRACTORS",
    "ML1M_ITEM",
    "ML1M_USER",
    "FeatureTable",
    "encode",
    "extract",
    "fit_feature_table",
]
