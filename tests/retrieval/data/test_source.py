"""Dataset dir resolution, verified downloads (offline, file:// URLs) and the parquet table cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import polars as pl
import pytest

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

FILES = {"toy/a.txt": b"alpha\n", "toy/sub/b.txt": b"beta\n", "__MACOSX/junk": b"x"}


def make_zip(path: Path, files: dict[str, bytes] = FILES) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, files: dict[str, bytes] = FILES, link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo("toy/link")
            info.type = tarfile.SYMTYPE
            info.linkname = link
            tf.addfile(info)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote_for(archive: Path, algo: str = "sha256", digest: str | None = None) -> RemoteFile:
    digest = digest or hashlib.new(algo, archive.read_bytes()).hexdigest()
    return RemoteFile(
        url=archive.resolve().as_uri(),
        sha256=digest if algo == "sha256" else None,
        md5=digest if algo == "md5" else None,
        extract=True,
        strip="toy/",
    )


def toy_source(remote: tuple[RemoteFile, ...] = ()) -> DatasetSource:
    return DatasetSource("toy", ("a.txt", "sub/b.txt|sub/c.txt"), remote, "datasets/toy/README.md")


def leftovers(directory: Path) -> list[str]:
    """Hidden temp files/dirs (``.name.part``, ``.extract-*``, ``.x.tmp-*``) under ``directory``."""
    return sorted(str(p) for p in directory.rglob(".*")) if directory.exists() else []


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A private data dir and cache dir for one test."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setenv(DATA_ENV, str(data))
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return {"data": data, "cache": cache, "default": cache / "datasets"}


def put(directory: Path, names: tuple[str, ...] = ("a.txt", "sub/b.txt")) -> Path:
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(name)
    return directory


# --------------------------------------------------------------------------- resolution


def test_cache_root_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "sparrow"


@pytest.mark.parametrize("where", ["root", "env", "default"])
def test_resolution_finds_each_location(env: dict[str, Path], tmp_path: Path, where: str) -> None:
    root = tmp_path / "explicit"
    base = {"root": root, "env": env["data"], "default": env["default"]}[where]
    put(base / "toy")
    got = resolve_dataset_dir(toy_source(), root=root if where == "root" else None)
    assert got == base / "toy"


def test_resolution_order(env: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "explicit"
    for base in (root, env["data"], env["default"]):
        put(base / "toy")
    assert resolve_dataset_dir(toy_source(), root=root) == root / "toy"
    assert resolve_dataset_dir(toy_source()) == env["data"] / "toy"
    (env["data"] / "toy" / "a.txt").unlink()  # incomplete copy: fall through to the default dir
    assert resolve_dataset_dir(toy_source()) == env["default"] / "toy"


def test_explicit_root_is_authoritative(env: dict[str, Path], tmp_path: Path) -> None:
    put(env["data"] / "toy")
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_dataset_dir(toy_source(), root=tmp_path / "elsewhere")
    assert e.value.path == tmp_path / "elsewhere" / "toy"


@pytest.mark.parametrize("alt", ["sub/b.txt", "sub/c.txt"])
def test_required_alternatives(env: dict[str, Path], alt: str) -> None:
    put(env["data"] / "toy", ("a.txt", alt))
    assert resolve_dataset_dir(toy_source()) == env["data"] / "toy"


def test_not_found_hint_without_remote(env: dict[str, Path]) -> None:
    put(env["data"] / "toy", ("a.txt",))
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_dataset_dir(toy_source())
    msg = str(e.value)
    assert "datasets/toy/README.md" in msg and DATA_ENV in msg and "data.root" in msg
    assert "sub/b.txt|sub/c.txt" in msg  # what is missing
    assert "download=True" not in msg and "no public download URL" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_not_found_hint_with_remote(env: dict[str, Path], tmp_path: Path) -> None:
    remote = remote_for(make_zip(tmp_path / "toy.zip"))
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_dataset_dir(toy_source((remote,)))
    msg = str(e.value)
    assert "download=True" in msg and "data.download=true" in msg and remote.url in msg
    assert not (env["default"] / "toy").exists()  # nothing fetched without download=True


# --------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("algo", ["sha256", "md5"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_download_verifies_and_extracts(env: dict[str, Path], tmp_path: Path, algo: str, kind: str) -> None:
    archive = make_zip(tmp_path / "toy.zip") if kind == "zip" else make_tar(tmp_path / "toy.tar.gz")
    got = resolve_dataset_dir(toy_source((remote_for(archive, algo),)), download=True)
    assert got == env["default"] / "toy"
    assert (got / "a.txt").read_bytes() == b"alpha\n"
    assert (got / "sub" / "b.txt").read_bytes() == b"beta\n"
    assert not (got / "__MACOSX").exists()  # outside the stripped prefix
    assert not (got / archive.name).exists()  # the archive is removed after extraction
    assert leftovers(env["cache"]) == []
    # a second call finds the files and does not download again
    os.remove(archive)
    assert resolve_dataset_dir(toy_source((remote_for(tmp_path / "gone.zip", digest="0" * 64),))) == got


def test_download_into_explicit_root(env: dict[str, Path], tmp_path: Path) -> None:
    remote = remote_for(make_zip(tmp_path / "toy.zip"))
    got = resolve_dataset_dir(toy_source((remote,)), root=tmp_path / "mine", download=True)
    assert got == tmp_path / "mine" / "toy" and (got / "a.txt").is_file()


def test_checksum_mismatch_leaves_nothing(env: dict[str, Path], tmp_path: Path) -> None:
    remote = remote_for(make_zip(tmp_path / "toy.zip"), digest="0" * 64)
    with pytest.raises(DataFormatError) as e:
        resolve_dataset_dir(toy_source((remote,)), download=True)
    msg = str(e.value)
    assert "sha256" in msg and "0" * 64 in msg and sha256(tmp_path / "toy.zip") in msg
    assert not (env["default"] / "toy").exists()
    assert leftovers(env["cache"]) == []


def test_checksum_mismatch_keeps_existing_files(tmp_path: Path) -> None:
    dest = put(tmp_path / "dest", ("keep.txt",))
    remote = remote_for(make_zip(tmp_path / "toy.zip"), digest="1" * 64)
    with pytest.raises(DataFormatError):
        download(remote, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]


def test_download_without_checksum_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "toy.zip")
    remote = RemoteFile(archive.as_uri(), sha256=None, md5=None, extract=True, strip="toy/")
    with pytest.raises(DataFormatError, match="checksum"):
        download(remote, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    with pytest.raises(DatasetNotFoundError, match="no checksum is known"):
        resolve_dataset_dir(toy_source((remote,)), download=True)


def test_download_plain_file(tmp_path: Path) -> None:
    src = tmp_path / "ratings.csv"
    src.write_text("u,i\n1,2\n")
    remote = RemoteFile(src.as_uri(), sha256=sha256(src), md5=None, extract=False)
    got = download(remote, tmp_path / "dest")
    assert got == tmp_path / "dest" / "ratings.csv" and got.read_text() == "u,i\n1,2\n"
    assert leftovers(tmp_path / "dest") == []


@pytest.mark.parametrize("bad", ["toy/../../evil.txt", "/abs/evil.txt", "toy/../evil.txt"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_path_traversal_is_rejected(tmp_path: Path, bad: str, kind: str) -> None:
    files = {"toy/a.txt": b"a", bad: b"evil"}
    if kind == "zip":
        archive = make_zip(tmp_path / "evil.zip", files)
    else:
        archive = make_tar(tmp_path / "evil.tar.gz", files)
    dest = tmp_path / "out" / "toy"
    with pytest.raises(DataFormatError, match="in-tree"):
        download(remote_for(archive), dest)
    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_tar_links_are_rejected(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "link.tar.gz", link="/etc/passwd")
    dest = tmp_path / "out"
    with pytest.raises(DataFormatError, match="regular files"):
        download(remote_for(archive), dest)
    assert not dest.exists()


def test_not_an_archive(tmp_path: Path) -> None:
    src = tmp_path / "data.zip"
    src.write_bytes(b"not a zip at all")
    with pytest.raises(DataFormatError, match="zip or tar"):
        download(remote_for(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algo", ["sha256", "md5", "sha1"])
def test_file_digest(tmp_path: Path, algo: str) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))  # spans several 1 MiB chunks
    assert file_digest(path, algo) == hashlib.new(algo, path.read_bytes()).hexdigest()
    assert file_digest(path) == sha256(path)


# --------------------------------------------------------------------------- table cache


class Builder:
    """A build() that counts its calls and derives its table from the source file."""

    def __init__(self, src: Path):
        self.src, self.calls = src, 0

    def __call__(self) -> dict[str, pl.DataFrame]:
        self.calls += 1
        words = self.src.read_text().split()
        return {"words": pl.DataFrame({"w": words}), "n": pl.DataFrame({"n": [len(words)]})}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "raw" / "src.txt"
    path.parent.mkdir()
    path.write_text("a b c")
    return path


def test_cache_miss_then_hit(tmp_path: Path, src: Path) -> None:
    build, cache = Builder(src), tmp_path / "cache"
    first = cached_tables("toy", [src], "1", build, cache_dir=cache)
    second = cached_tables("toy", [src], "1", build, cache_dir=cache)
    assert build.calls == 1
    assert set(second) == {"words", "n"}
    assert second["words"].equals(first["words"]) and second["n"]["n"].to_list() == [3]
    manifest = json.loads((cache / "toy" / "manifest.json").read_text())
    assert manifest["reader_version"] == "1"
    assert manifest["sources"] == [{"name": "src.txt", "size": 5, "sha256": sha256(src)}]
    assert sorted(p.name for p in (cache / "toy").iterdir()) == [
        "manifest.json",
        "n.parquet",
        "words.parquet",
    ]
    assert leftovers(cache) == []


def test_default_cache_dir(src: Path, env: dict[str, Path]) -> None:
    build = Builder(src)
    cached_tables("nested/toy", [src], "1", build)
    assert (env["cache"] / "prepared" / "nested" / "toy" / "manifest.json").is_file()


def test_rebuilt_when_source_changes(tmp_path: Path, src: Path) -> None:
    build, cache = Builder(src), tmp_path / "cache"
    cached_tables("toy", [src], "1", build, cache_dir=cache)
    src.write_text("a b d")  # same size, new content
    again = cached_tables("toy", [src], "1", build, cache_dir=cache)
    assert build.calls == 2 and again["words"]["w"].to_list() == ["a", "b", "d"]
    assert cached_tables("toy", [src], "1", build, cache_dir=cache)["words"]["w"].to_list() == ["a", "b", "d"]
    assert build.calls == 2
    assert leftovers(cache) == []


def test_rebuilt_when_reader_version_changes(tmp_path: Path, src: Path) -> None:
    build, cache = Builder(src), tmp_path / "cache"
    cached_tables("toy", [src], "1", build, cache_dir=cache)
    cached_tables("toy", [src], "2", build, cache_dir=cache)
    cached_tables("toy", [src], "2", build, cache_dir=cache)
    assert build.calls == 2


def test_rebuilt_when_sources_added(tmp_path: Path, src: Path) -> None:
    build, cache = Builder(src), tmp_path / "cache"
    other = src.parent / "other.txt"
    other.write_text("z")
    cached_tables("toy", [src], "1", build, cache_dir=cache)
    cached_tables("toy", [src, other], "1", build, cache_dir=cache)
    assert build.calls == 2


@pytest.mark.parametrize(
    "damage", ["truncate_parquet", "delete_parquet", "garbage_manifest", "delete_manifest", "empty_dir"]
)
def test_corrupt_cache_is_rebuilt(tmp_path: Path, src: Path, damage: str) -> None:
    build, cache = Builder(src), tmp_path / "cache"
    cached_tables("toy", [src], "1", build, cache_dir=cache)
    d = cache / "toy"
    if damage == "truncate_parquet":
        data = (d / "words.parquet").read_bytes()
        (d / "words.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "delete_parquet":
        (d / "words.parquet").unlink()
    elif damage == "garbage_manifest":
        (d / "manifest.json").write_text("{not json")
    elif damage == "delete_manifest":
        (d / "manifest.json").unlink()
    else:
        for p in d.iterdir():
            p.unlink()
    got = cached_tables("toy", [src], "1", build, cache_dir=cache)
    assert build.calls == 2 and got["words"]["w"].to_list() == ["a", "b", "c"]
    assert cached_tables("toy", [src], "1", build, cache_dir=cache)["n"]["n"].to_list() == [3]
    assert build.calls == 2
    assert leftovers(cache) == []


@pytest.mark.parametrize("cached_before", [False, True])
def test_failing_build_leaves_nothing(tmp_path: Path, src: Path, cached_before: bool) -> None:
    cache = tmp_path / "cache"
    if cached_before:
        cached_tables("toy", [src], "1", Builder(src), cache_dir=cache)
        src.write_text("changed")

    def boom() -> dict[str, pl.DataFrame]:
        raise RuntimeError("bad input")

    with pytest.raises(RuntimeError, match="bad input"):
        cached_tables("toy", [src], "1", boom, cache_dir=cache)
    assert leftovers(cache) == []
    if cached_before:  # the old (complete) cache is still there, and is not used for the new source
        assert (cache / "toy" / "manifest.json").is_file()
        build = Builder(src)
        assert cached_tables("toy", [src], "1", build, cache_dir=cache)["n"]["n"].to_list() == [1]
        assert build.calls == 1
    else:
        assert not (cache / "toy").exists()


def test_failing_write_leaves_nothing(tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"

    def broken_write(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken_write)
    got = cached_tables("toy", [src], "1", Builder(src), cache_dir=cache)
    assert got["n"]["n"].to_list() == [3]  # the reader still gets its tables
    assert leftovers(cache) == [] and not (cache / "toy").exists()


def test_concurrent_builders_and_readers(tmp_path: Path, src: Path) -> None:
    cache, results, errors = tmp_path / "cache", [], []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(cached_tables("toy", [src], "1", Builder(src), cache_dir=cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 30 and all(r["words"]["w"].to_list() == ["a", "b", "c"] for r in results)
    assert leftovers(cache) == []


@pytest.mark.parametrize("name", ["", "../x", "/abs", "a/../b", "."])
def test_bad_cache_names(tmp_path: Path, src: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cache name"):
        cached_tables(name, [src], "1", Builder(src), cache_dir=tmp_path)


@pytest.mark.parametrize("table", ["", "a/b", ".hidden", "manifest"])
def test_bad_table_names(tmp_path: Path, src: Path, table: str) -> None:
    with pytest.raises(ValueError, match="table names"):
        cached_tables("toy", [src], "1", lambda: {table: pl.DataFrame({"a": [1]})}, cache_dir=tmp_path)
    assert leftovers(tmp_path) == []


def test_stale_temp_dirs_are_swept(tmp_path: Path, src: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    old, fresh = cache / ".toy.tmp-crashed", cache / ".toy.tmp-running"
    for d in (old, fresh):
        d.mkdir()
        (d / "words.parquet").write_bytes(b"half")
    os.utime(old, (0, 0))
    cached_tables("toy", [src], "1", Builder(src), cache_dir=cache)
    assert not old.exists() and fresh.exists()  # a concurrent writer's fresh temp dir is left alone
