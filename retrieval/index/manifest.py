"""Index manifests and atomic index builds.

Every index directory Sparrow writes holds ``manifest.json``: what built it (kind, encoder and
its checksum, tokenizer, quantization scale), from what (document count, corpus checksum),
when and how long it took, and which Sparrow version. It is written last, inside a temporary
build directory that is renamed into place only when everything else is complete, so:

* a directory without a readable, complete manifest is a half-built or corrupt index and is
  refused (:func:`read_manifest`), never searched;
* a search whose query encoder differs from the index's document encoder is refused
  (:func:`check_encoder`), with a message naming both.

Builds that encode a corpus keep their work directory (``<index>.partial``) when interrupted,
so that a rerun resumes from the last finished shard (:func:`building`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from retrieval.eval.report import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the manifest's fields change meaning


class IndexFormatError(ValueError):
    """An index directory that cannot be used: missing, half-built, corrupt or mismatched."""


def sparrow_version() -> str:
    try:
        return version("sparrow-rec")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@dataclass(frozen=True)
class Manifest:
    """What an index holds and how it was built.

    Attributes:
        kind: ``"bm25"``, ``"impact"``, ``"sparse_torch"`` or ``"faiss"``.
        encoder: name of the document encoder (a model directory or hub id; ``"bm25"`` for BM25).
        encoder_checksum: sha256 over the encoder's weight files (``""`` when there are none).
        tokenizer: tokenizer name or path (``"lucene-english"`` for BM25's analyzer).
        quantization_scale: the integer scale applied to weights (impact indexes), else ``None``.
        num_docs: documents indexed.
        corpus: path of the corpus file that was read.
        corpus_checksum: sha256 of that file.
        build_seconds: wall time of the build.
        sparrow_version: the package version that built it.
        extra: kind-specific settings (e.g. faiss factory, BM25 k1/b, query encoder kind).
        format: manifest format version.
    """

    kind: str
    encoder: str
    encoder_checksum: str
    tokenizer: str
    num_docs: int
    corpus: str
    corpus_checksum: str
    quantization_scale: float | None = None
    build_seconds: float = 0.0
    sparrow_version: str = field(default_factory=sparrow_version)
    extra: dict = field(default_factory=dict)
    format: int = FORMAT


def checksum(paths: list[str | Path]) -> str:
    """sha256 over the bytes of ``paths`` in the given order (e.g. a model's weight files)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically into ``directory``; returns its path."""
    path = Path(directory) / MANIFEST
    atomic_write_text(path, json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(directory: str | Path, kind: str | None = None) -> Manifest:
    """The manifest of an index directory, checked.

    Args:
        directory: the index directory.
        kind: if given, the kind the caller expects.

    Raises:
        IndexFormatError: the directory or its manifest is missing, unreadable, incomplete, of
            another format, or of another kind.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: no such index directory")
    if not path.is_file():
        raise IndexFormatError(
            f"{directory}: no {MANIFEST}; this is not a finished Sparrow index (half-built or "
            "written by something else). Rebuild it."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFormatError(f"{path}: unreadable manifest ({err}); rebuild the index") from err
    names = {f.name for f in fields(Manifest)}
    required = {"kind", "encoder", "encoder_checksum", "tokenizer", "num_docs", "corpus", "corpus_checksum"}
    missing = sorted(required - set(raw)) if isinstance(raw, dict) else sorted(required)
    if missing:
        raise IndexFormatError(f"{path}: manifest lacks {', '.join(missing)}; rebuild the index")
    if raw.get("format", FORMAT) != FORMAT:
        raise IndexFormatError(f"{path}: manifest format {raw.get('format')} but this Sparrow reads {FORMAT}")
    manifest = Manifest(**{k: v for k, v in raw.items() if k in names})
    if kind is not None and manifest.kind != kind:
        raise IndexFormatError(f"{directory} is a {manifest.kind!r} index, not {kind!r}")
    return manifest


def check_encoder(manifest: Manifest, encoder: str, encoder_checksum: str, where: str | Path) -> None:
    """Refuse to search an index with a query encoder other than the one that built it.

    Raises:
        IndexFormatError: naming the index's encoder and the one given.
    """
    if (manifest.encoder, manifest.encoder_checksum) != (encoder, encoder_checksum):
        raise IndexFormatError(
            f"{where} was built with encoder {manifest.encoder} (sha256 {manifest.encoder_checksum[:12]}) "
            f"but the query encoder is {encoder} (sha256 {encoder_checksum[:12]}); search it with the "
            "same encoder or rebuild the index"
        )


def partial_dir(final: str | Path) -> Path:
    """The work directory of an unfinished build of ``final``: ``<final>.partial``."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


@contextmanager
def building(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build an index in ``<final>.partial`` and rename it to ``final`` when the block succeeds.

    The block writes every file, the manifest last. On an exception the work directory stays,
    so that shard-wise encoders can resume; nothing is ever visible at ``final`` half-built.

    Args:
        final: the index directory to produce.
        overwrite: replace an existing ``final`` (otherwise it is an error).

    Yields:
        the work directory (created if missing, kept if a previous build left it).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise IndexFormatError(f"{final} already exists; pass overwrite=true to rebuild it")
    work = partial_dir(final)
    if work.exists():
        log.info("resuming the unfinished build in %s", work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    yield work
    if not (work / MANIFEST).is_file():
        raise IndexFormatError(f"the build of {final} wrote no {MANIFEST}; left unfinished in {work}")
    replace_directory(work, final)
    log.info("index written to %s in %.1f s", final, time.perf_counter() - start)


def replace_directory(work: Path, final: Path) -> None:
    """Rename the finished ``work`` directory to ``final``; an existing ``final`` is moved aside
    first and deleted only once the new one is in place."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, final)
