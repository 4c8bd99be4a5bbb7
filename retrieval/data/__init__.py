"""Dataset access: locating and downloading files, caching prepared tables, BEIR readers.

The BEIR names are imported lazily so that ``retrieval.data.source`` stays light to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.data.errors import DataFormatError, DatasetNotFoundError
from retrieval.data.source import (
    CACHE_ENV,
    DATA_ENV,
    DatasetSource,
    RemoteFile,
    cache_root,
    cached_tables,
    download,
    file_digest,
    resolve_dataset_dir,
)

if TYPE_CHECKING:
    from retrieval.data.beir import BEIR_SOURCES, BeirData, load_beir

_LAZY = {"BEIR_SOURCES", "BeirData", "load_beir"}


def __getattr__(name: str):
    if name in _LAZY:
        from retrieval.data import beir

        return getattr(beir, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BEIR_SOURCES",
    "CACHE_ENV",
    "DATA_ENV",
    "BeirData",
    "DataFormatError",
    "DatasetNotFoundError",
    "DatasetSource",
    "RemoteFile",
    "cache_root",
    "cached_tables",
    "download",
    "file_digest",
    "load_beir",
    "resolve_dataset_dir",
]
