"""Where dataset files live, how they are downloaded, and how prepared tables are cached.

Resolution order for a dataset's directory (first hit wins):
  1. an explicit ``root`` argument (Hydra: ``data.root``), holding ``<root>/<name>/``;
  2. the environment variable ``SPARROW_DATA_DIR``, holding ``$SPARROW_DATA_DIR/<name>/``;
  3. the default download directory ``~/.cache/sparrow/datasets/<name>/``
     (``SPARROW_CACHE_DIR`` moves ``~/.cache/sparrow``).
If the files are missing and ``download=True``, the official files are fetched there
(atomically: temp file, checksum, rename); otherwise :class:`DatasetNotFoundError`
says where it looked and how to get the data.

Prepared tables are cached as parquet under ``<cache>/prepared/<name>/`` with a
``manifest.json`` holding the checksums of the source files and the reader version; the
cache is rebuilt when either changes, and written to a temp directory renamed into place,
so a half-written cache is never read.
"""
# TODO(data-source helper): implement. Public API (others code against it):
#
# DATA_ENV = "SPARROW_DATA_DIR"; CACHE_ENV = "SPARROW_CACHE_DIR"
#
# @dataclass(frozen=True)
# class RemoteFile:
#     url: str              # official download URL
#     sha256: str | None    # or md5, see `checksum`; hex digest of the downloaded file
#     md5: str | None
#     extract: bool         # unzip / untar into the dataset dir after verification
#     strip: str = ""       # leading folder inside the archive to drop (e.g. "ml-100k/")
#
# @dataclass(frozen=True)
# class DatasetSource:
#     name: str                        # folder name, e.g. "movielens-100k"
#     required: tuple[str, ...]        # relative paths that must exist (alternatives as "a|b")
#     remote: tuple[RemoteFile, ...]   # official files; empty if there is no public URL
#     card: str                        # "datasets/<name>/README.md" (how to get it by hand)
#
# def cache_root() -> Path
# def resolve_dataset_dir(source: DatasetSource, root: str | Path | None = None,
#                         download: bool = False) -> Path
# def download(remote: RemoteFile, dest_dir: Path) -> Path
# def file_digest(path: Path, algo: str = "sha256") -> str
# def cached_tables(name: str, sources: Sequence[Path], reader_version: str,
#                   build: Callable[[], dict[str, pl.DataFrame]],
#                   cache_dir: str | Path | None = None) -> dict[str, pl.DataFrame]
#     # returns the cached tables when the manifest matches, otherwise calls build(),
#     # writes <table>.parquet + manifest.json atomically, and returns build()'s result.
