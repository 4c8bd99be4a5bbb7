"""Where dataset files live, how they are downloaded, and how prepared tables are cached.

Resolution order for a dataset's directory (first hit wins):
  1. an explicit ``root`` argument (Hydra: ``data.root``), holding ``<root>/<name>/``;
  2. the environment variable ``SPARROW_DATA_DIR``, holding ``$SPARROW_DATA_DIR/<name>/``;
  3. the default download directory ``~/.cache/sparrow/datasets/<name>/``
     (``SPARROW_CACHE_DIR`` moves ``~/.cache/sparrow``).
If the files are missing and ``download=True``, the official files are fetched there
(atomically: temp file, checksum, rename); otherwise :class:`DatasetNotFoundError`
says where it looked and how to get the data.

An explicit ``root`` is authoritative: when it is given, only ``<root>/<name>/`` is looked
at, and a download goes there. Without it, ``$SPARROW_DATA_DIR/<name>/`` and then the
default directory are tried, and a download always goes to the default directory (a
``SPARROW_DATA_DIR`` is often a read-only shared folder).

Downloads are verified against the checksum recorded in :class:`RemoteFile`. A remote file
without a known checksum is refused: Sparrow never installs unverified data. Fetch it by hand
(the dataset card says how), or pass a :class:`RemoteFile` carrying the checksum you trust.

Prepared tables are cached as parquet under ``<cache>/prepared/<name>/`` with a
``manifest.json`` holding the checksums of the source files and the reader version; the
cache is rebuilt when either changes, and written to a temp directory renamed into place,
so a half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import polars as pl

from retrieval.data.errors import DataFormatError, DatasetNotFoundError

log = logging.getLogger(__name__)

DATA_ENV = "SPARROW_DATA_DIR"
CACHE_ENV = "SPARROW_CACHE_DIR"

_REPO = Path(__file__).resolve().parents[2]
_CHUNK = 1 << 20
_MANIFEST = "manifest.json"
_CACHE_FORMAT = 1  # bump when the layout of a prepared-table directory changes


@dataclass(frozen=True)
class RemoteFile:
    """One official file of a dataset.

    Attributes:
        url: (str) official download URL (``https://``, ``http://`` or ``file://``).
        sha256: (str | None) hex sha256 of the downloaded file; preferred when known.
        md5: (str | None) hex md5 of the downloaded file (what many dataset pages publish).
        extract: (bool) unzip / untar into the dataset dir after verification.
        strip: (str) leading folder inside the archive to drop, e.g. ``"ml-100k/"``;
            archive members outside it are skipped.
    """

    url: str
    sha256: str | None
    md5: str | None
    extract: bool
    strip: str = ""

    @property
    def filename(self) -> str:
        """The last path component of the URL, e.g. ``"scifact.zip"``."""
        name = PurePosixPath(urllib.parse.urlparse(self.url).path).name
        return urllib.parse.unquote(name) or "download"

    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` used to verify the file, or ``None`` when unknown."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None


@dataclass(frozen=True)
class DatasetSource:
    """What a dataset needs on disk and where its official files come from.

    Attributes:
        name: (str) folder name, e.g. ``"movielens-100k"``.
        required: (tuple[str, ...]) relative paths that must exist; ``"a|b"`` accepts either.
        remote: (tuple[RemoteFile, ...]) official files; empty if there is no public URL.
        card: (str) ``"datasets/<name>/README.md"``: how to get the data by hand.
    """

    name: str
    required: tuple[str, ...]
    remote: tuple[RemoteFile, ...]
    card: str


# --------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """Sparrow's cache directory: ``$SPARROW_CACHE_DIR`` or ``~/.cache/sparrow``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparrow"


def _missing(source: DatasetSource, directory: Path) -> list[str]:
    """The entries of ``source.required`` with no existing alternative in ``directory``."""
    if not directory.is_dir():
        return list(source.required)
    return [req for req in source.required if not any((directory / alt).exists() for alt in req.split("|"))]


def _card_path(source: DatasetSource) -> str:
    card = _REPO / source.card
    return str(card) if card.exists() else source.card


def _not_found(source: DatasetSource, looked: list[Path], default_dir: Path) -> DatasetNotFoundError:
    missing = _missing(source, looked[0])
    lines = [f"missing {', '.join(missing)}" if missing else "missing files"]
    if len(looked) > 1:
        lines.append("also looked in " + ", ".join(str(p) for p in looked[1:]))
    lines.append(f"see {_card_path(source)} for how to get it")
    lines.append(
        f"point Sparrow at a local copy with {DATA_ENV}=<dir holding {source.name}/> "
        f"or root=<dir> (Hydra: data.root=<dir>)"
    )
    if source.remote and all(r.checksum() for r in source.remote):
        lines.append(
            f"or pass download=True (Hydra: data.download=true) to fetch "
            f"{', '.join(r.url for r in source.remote)} into {default_dir}"
        )
    elif source.remote:
        lines.append("no checksum is known for its official file, so it is not downloaded automatically")
    else:
        lines.append("it has no public download URL")
    return DatasetNotFoundError(source.name, looked[0], "; ".join(lines))


def resolve_dataset_dir(
    source: DatasetSource, root: str | Path | None = None, download: bool = False
) -> Path:
    """The directory holding ``source``'s files (see the module docstring for the order).

    Args:
        source: the dataset's description.
        root: (str | Path | None) directory holding ``<name>/``; overrides the environment.
        download: (bool) fetch the official files when they are missing. Default False.

    Returns:
        The dataset directory, with every ``source.required`` entry present.

    Raises:
        DatasetNotFoundError: the files are missing and were not (or could not be) downloaded.
        DataFormatError: a download failed its checksum or is not a safe archive.
    """
    default_dir = cache_root() / "datasets" / source.name
    if root is not None:
        candidates = [Path(root).expanduser() / source.name]
    else:
        candidates = []
        if os.environ.get(DATA_ENV):
            candidates.append(Path(os.environ[DATA_ENV]).expanduser() / source.name)
        candidates.append(default_dir)
    for directory in candidates:
        if not _missing(source, directory):
            log.debug("dataset %s found at %s", source.name, directory)
            return directory
    target = candidates[0] if root is not None else default_dir
    if not download or not source.remote or not all(r.checksum() for r in source.remote):
        raise _not_found(source, candidates, target)
    for remote in source.remote:
        _download(remote, target)
    still = _missing(source, target)
    if still:
        raise DatasetNotFoundError(
            source.name,
            target,
            f"downloaded {', '.join(r.url for r in source.remote)} but {', '.join(still)} "
            f"are still missing; see {_card_path(source)}",
        )
    return target


# --------------------------------------------------------------------------- downloads


def file_digest(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (``algo``: any :func:`hashlib.new` name)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, out, algo: str, desc: str) -> str:
    """Stream ``url`` into the open binary file ``out``; returns its hex digest."""
    from tqdm.auto import tqdm

    h = hashlib.new(algo)
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (URLs come from DatasetSource)
        total = resp.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total else None, unit="B", unit_scale=True, desc=desc, disable=None
        ) as bar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def download(remote: RemoteFile, dest_dir: Path) -> Path:
    """Download ``remote`` into ``dest_dir``, verify it, and extract it if asked.

    The file is streamed to a temp file inside ``dest_dir``, checked against its sha256 (or
    md5), and renamed into place only when it matches. Archives are then extracted into a
    temp directory inside ``dest_dir`` (members that would land outside it, links and
    devices are refused), and each top-level entry is renamed into ``dest_dir``; the archive
    is deleted afterwards. On any failure nothing new is left behind.

    Args:
        remote: the file to fetch.
        dest_dir: (Path) the dataset directory; created if needed.

    Returns:
        The downloaded file, or ``dest_dir`` when the file was an extracted archive.

    Raises:
        DataFormatError: no checksum is known, the checksum does not match, or the archive
            is unsafe or unreadable.
        OSError: the download itself failed (network, permissions).
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / remote.filename
    check = remote.checksum()
    if check is None:
        raise DataFormatError(
            target,
            None,
            f"a known sha256 or md5 for {remote.url} (Sparrow does not install unverified downloads; "
            "fetch it by hand as the dataset card says, or pass a RemoteFile with the checksum)",
        )
    algo, expected = check
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{remote.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            log.info("downloading %s to %s", remote.url, target)
            actual = _fetch(remote.url, out, algo, remote.filename)
        if actual != expected:
            raise DataFormatError(
                target,
                None,
                f"{algo} {expected} for {remote.url} (the download was deleted; retry, or report "
                "a changed upstream file)",
                actual,
            )
        if not remote.extract:
            os.replace(tmp, target)
            ok = True
            return target
        _extract(tmp, dest_dir, remote.strip, shown=target)
        ok = True
        return dest_dir
    finally:
        tmp.unlink(missing_ok=True)
        if not ok and created and not any(dest_dir.iterdir()):
            dest_dir.rmdir()  # leave no empty dataset dir behind a failed download


_download = download  # for resolve_dataset_dir, whose ``download`` argument shadows the function


def _safe_member(name: str, strip: str, archive: Path, kind: str) -> PurePosixPath | None:
    """The member's path relative to the dataset dir, ``None`` to skip it; raises when unsafe."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DataFormatError(archive, None, f"{kind} members inside the archive", name)
    rel = path.as_posix()
    prefix = strip.strip("/")
    if prefix:
        if rel == prefix or not rel.startswith(prefix + "/"):
            return None
        rel = rel[len(prefix) + 1 :]
    rel = rel.strip("/")
    return PurePosixPath(rel) if rel and rel != "." else None


def _extract(archive: Path, dest_dir: Path, strip: str, shown: Path) -> None:
    """Extract ``archive`` into a temp dir in ``dest_dir``, then rename entries into place."""
    staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".extract-"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    rel = _safe_member(info.filename, strip, shown, "relative, in-tree")
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode == 0o120000:
                        raise DataFormatError(shown, None, "no symbolic links in the archive", info.filename)
                    if rel is None or info.is_dir():
                        continue
                    out = staging / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf:
                    rel = _safe_member(member.name, strip, shown, "relative, in-tree")
                    if not (member.isfile() or member.isdir()):
                        raise DataFormatError(shown, None, "only regular files and folders", member.name)
                    if rel is None or member.isdir():
                        continue
                    out = staging / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    assert src is not None  # a regular file
                    with src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
        else:
            raise DataFormatError(shown, None, "a zip or tar archive")
        for entry in sorted(staging.iterdir()):
            final = dest_dir / entry.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(entry, final)
        log.info("extracted %s into %s", shown.name, dest_dir)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataFormatError(shown, None, "a readable archive", str(e)) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- table cache


def _describe_sources(sources: Sequence[Path]) -> list[dict[str, object]]:
    """``[{name, size, sha256}]`` for each source, names relative to their common folder."""
    paths = [Path(p).resolve() for p in sources]
    if not paths:
        return []
    base = Path(os.path.commonpath([p.parent for p in paths]))
    return [
        {"name": p.relative_to(base).as_posix(), "size": p.stat().st_size, "sha256": file_digest(p)}
        for p in paths
    ]


def _read_cache(directory: Path, expected: dict[str, object]) -> dict[str, pl.DataFrame] | None:
    """The cached tables when ``directory`` holds a complete, matching cache; else ``None``."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
        return None
    tables = manifest.get("tables")
    if not isinstance(tables, dict):
        return None
    out: dict[str, pl.DataFrame] = {}
    try:
        for table, meta in tables.items():
            path = directory / meta["file"]
            if path.stat().st_size != meta["size"]:
                return None
            df = pl.read_parquet(path)
            if df.height != meta["rows"]:
                return None
            out[table] = df
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("prepared cache %s is unreadable (%s); rebuilding", directory, e)
        return None
    return out


def _swap_into_place(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``, replacing an older ``final``; losing a race is fine."""
    trash = None
    if final.exists() or final.is_symlink():
        trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        try:
            os.replace(final, trash / "old")
        except OSError:
            pass  # another process moved it first
    try:
        os.rename(staging, final)
    except OSError:
        log.debug("another process wrote %s first; keeping its cache", final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _sweep_stale(final: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp dirs of ``final`` left by crashed writers (older than ``max_age_s``)."""
    now = time.time()
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            try:
                if now - stale.stat().st_mtime > max_age_s:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass


def cached_tables(
    name: str,
    sources: Sequence[Path],
    reader_version: str,
    build: Callable[[], dict[str, pl.DataFrame]],
    cache_dir: str | Path | None = None,
) -> dict[str, pl.DataFrame]:
    """Prepared tables, read from the parquet cache when it is current, else built and cached.

    The cache directory ``<cache_dir>/<name>/`` (``cache_dir`` defaults to
    ``cache_root() / "prepared"``) holds ``<table>.parquet`` per table and ``manifest.json``
    with ``reader_version`` and each source's (name, size, sha256). The cache is used only when
    the manifest matches exactly and every table file is intact; otherwise ``build()`` runs,
    and its tables are written to a temp directory that is renamed into place, so concurrent
    readers see either the old complete cache, the new complete cache, or none (and build).

    Args:
        name: (str) cache key, e.g. ``"movielens-100k"`` or ``"beir/scifact/test"`` (``/`` nests).
        sources: (Sequence[Path]) the raw files the tables are built from.
        reader_version: (str) bump it whenever the reader's output changes.
        build: () -> {table name: DataFrame}; table names must be plain file stems.
        cache_dir: (str | Path | None) parent of the per-name cache directories.

    Returns:
        {table name: DataFrame}: the cached tables on a hit, ``build()``'s result on a miss.
    """
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or PurePosixPath(name).is_absolute():
        raise ValueError(f"cache name must be a relative path without '..', got {name!r}")
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "prepared"
    final = base.joinpath(*parts)
    expected = {
        "format": _CACHE_FORMAT,
        "name": name,
        "reader_version": reader_version,
        "sources": _describe_sources(sources),
    }
    hit = _read_cache(final, expected)
    if hit is not None:
        log.debug("prepared cache hit: %s", final)
        return hit
    log.info("preparing %s (cache miss at %s)", name, final)
    tables = build()
    for table in tables:
        if not table or "/" in table or "\\" in table or table.startswith(".") or table == "manifest":
            raise ValueError(f"table names must be plain file stems, got {table!r}")
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        meta = {}
        for table, df in tables.items():
            path = staging / f"{table}.parquet"
            df.write_parquet(path)
            meta[table] = {"file": path.name, "rows": df.height, "size": path.stat().st_size}
        manifest = {**expected, "tables": meta}
        with open(staging / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(staging, final)
    except OSError as e:  # a read-only or full cache dir must not stop the reader
        log.warning("could not write prepared cache %s: %s", final, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tables


__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "DatasetSource",
    "RemoteFile",
    "cache_root",
    "cached_tables",
    "download",
    "file_digest",
    "resolve_dataset_dir",
]
