"""Registered datasets: name -> (where its files come from, how to read them).

>>> data = load_interactions("movielens-100k")       # doctest: +SKIP
>>> data.num_users, data.num_items
(943, 1682)

The files are found as :func:`retrieval.data.source.resolve_dataset_dir` says (``root``,
then ``$SPARROW_DATA_DIR``, then the download cache); prepared tables are cached as parquet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from recsys.data import coat, diginetica, gowalla, movielens
from recsys.data.diginetica import SessionData
from recsys.data.tables import InteractionData
from retrieval.data.source import DatasetSource, resolve_dataset_dir

Reader = Callable[[Path], InteractionData]

DATASETS: dict[str, tuple[DatasetSource, Reader]] = {
    movielens.ML100K.name: (movielens.ML100K, movielens.load_ml100k),
    movielens.ML1M.name: (movielens.ML1M, movielens.load_ml1m),
    gowalla.GOWALLA.name: (gowalla.GOWALLA, gowalla.load_gowalla),
    coat.COAT.name: (coat.COAT, coat.load_coat),
    diginetica.DIGINETICA_SAMPLE.name: (diginetica.DIGINETICA_SAMPLE, diginetica.load_diginetica),
}
"""Datasets :func:`load_interactions` knows."""

SESSION_DATASETS: tuple[str, ...] = tuple(diginetica.SOURCES)
"""Datasets :func:`load_sessions` knows."""


def _lookup(name: str) -> tuple[DatasetSource, Reader]:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` (required files, official URLs, card) of a dataset."""
    return _lookup(name)[0]


def load_interactions(name: str, root: str | Path | None = None, download: bool = False) -> InteractionData:
    """A registered dataset's interactions, id maps and side information.

    Args:
        name: (str) one of ``"movielens-100k"``, ``"movielens-1m"``, ``"lightgcn-gowalla"``,
            ``"coat"``, ``"session-diginetica-sample"``.
        root: (str | Path | None) directory holding ``<name>/``. Default None
            (``$SPARROW_DATA_DIR``, then ``~/.cache/sparrow/datasets``).
        download: (bool) fetch the official files when missing (only datasets whose
            official files have a known checksum). Default False.

    Returns:
        :class:`InteractionData` with contiguous ids.

    Raises:
        ValueError: unknown name.
        DatasetNotFoundError: the files are missing; the message says how to get them.
        DataFormatError: a file is malformed; the message names file, line and expectation.
    """
    src, reader = _lookup(name)
    return reader(resolve_dataset_dir(src, root, download))


def load_sessions(name: str, root: str | Path | None = None, download: bool = False) -> SessionData:
    """A registered session dataset's events (see :func:`recsys.data.diginetica.load_sessions`)."""
    return diginetica.load_sessions(name, root, download)


__all__ = ["DATASETS", "SESSION_DATASETS", "load_interactions", "load_sessions", "source"]
