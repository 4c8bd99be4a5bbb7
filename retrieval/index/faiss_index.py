"""Dense vector indexes with faiss: exact (``Flat``) and approximate (``HNSW32``, ``IVF{nlist},Flat``).

Johnson, Douze and Jégou, *Billion-scale similarity search with GPUs*, IEEE Trans. Big Data
2019, https://arxiv.org/abs/1702.08734 (faiss); Malkov and Yashunin, *Efficient and robust
approximate nearest neighbor search using Hierarchical Navigable Small World graphs*, TPAMI
2018, https://arxiv.org/abs/1603.09320 (HNSW).

A document ``d`` with vector :math:`v_d` is scored for a query vector :math:`q` by

.. math::

    s(q, d) = \\langle q, v_d \\rangle \\quad (\\text{metric "ip"}), \\qquad
    s(q, d) = -\\lVert q - v_d \\rVert_2^2 \\quad (\\text{metric "l2"}),

so that, as everywhere in Sparrow, a higher score ranks higher. ``Flat`` computes every score
exactly; ``HNSW32`` and ``IVF`` indexes return approximately the same top-k, faster, trading
recall for speed through ``efSearch`` and ``nprobe``. HNSW's candidate list is raised to ``k``
when it is shorter (hnswlib's rule): faiss does not do this itself, and with ``efSearch < k`` it
returns fewer than ``k`` documents and a tail far from the exact ranking (on NFCorpus with
MiniLM, ``efSearch=16`` and ``k=1000`` gave 428 documents on average, 31% of the exact top 1000).

An index directory holds ``index.faiss`` (the index, written by ``faiss.write_index``),
``doc_ids.json`` (row ``i`` of the index is document ``doc_ids[i]``) and ``manifest.json``
(written last; :mod:`retrieval.index.manifest`), with ``factory``, ``metric``, ``dim`` and the
default search settings in its ``extra``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from retrieval.eval.report import atomic_write_text
from retrieval.index.manifest import (
    IndexFormatError,
    Manifest,
    building,
    checksum,
    read_manifest,
    write_manifest,
)
from retrieval.types import Run

log = logging.getLogger(__name__)

KIND = "faiss"
INDEX_FILE = "index.faiss"
DOC_IDS_FILE = "doc_ids.json"
SHARDS = (
    "shards"  # encode_dense_in_shards' folder inside the work directory; removed once the index is written
)
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FAISS_NAMES = {"nprobe": "nprobe", "ef_search": "efSearch"}  # search setting -> faiss.ParameterSpace name


def _as_matrix(vectors: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous (n, d) float32 array, checked for NaN and infinity."""
    array = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) matrix, got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)  # (n, d)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    return array


def _tunable(index: faiss.Index) -> set[str]:
    """The search settings that apply to ``index``: ``nprobe`` (IVF), ``ef_search`` (HNSW)."""
    names = set()
    if faiss.try_extract_index_ivf(index) is not None:
        names.add("nprobe")
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        names.add("ef_search")
    return names


def _to_gpu(index: faiss.Index) -> tuple[faiss.Index, object | None]:
    """``index`` on GPU 0 when faiss has a GPU and a GPU version of it, else ``index`` itself.

    Returns:
        (index, resources): keep ``resources`` alive while the GPU index is used.
    """
    if faiss.get_num_gpus() == 0:
        return index, None
    resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except RuntimeError as err:  # e.g. HNSW, which faiss only has on the CPU
        log.info("building on the CPU, faiss has no GPU version of this index: %s", str(err).splitlines()[-1])
        return index, None


def _train_and_add(index: faiss.Index, vectors: np.ndarray, train_seed: int) -> faiss.Index:
    """Train ``index`` if it needs it (IVF k-means, seeded) and add every vector; on a GPU if there is one.

    Returns:
        the filled index, on the CPU.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = train_seed
    work, resources = _to_gpu(index)
    if not work.is_trained:
        start = time.perf_counter()
        work.train(vectors)
        log.info("trained the index on %d vectors in %.1f s", len(vectors), time.perf_counter() - start)
    work.add(vectors)
    return index if resources is None else faiss.index_gpu_to_cpu(work)


def build_faiss(
    doc_ids: list[str],
    vectors: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    *,
    factory: str = "Flat",
    metric: str = "ip",
    encoder: str,
    encoder_checksum: str,
    tokenizer: str,
    corpus_path: str | Path,
    overwrite: bool = False,
    train_seed: int = 0,
    nprobe: int = 32,
    ef_search: int = 128,
) -> Manifest:
    """Build a faiss index of document vectors in ``out_dir``, atomically.

    Everything is written into ``<out_dir>.partial`` (:func:`~retrieval.index.manifest.building`),
    the manifest last, and renamed into place only when complete; a ``shards/`` folder left there
    by :func:`retrieval.encoders.dense.encode_dense_in_shards` is removed before the manifest.

    With a GPU (``faiss-gpu`` installed and ``faiss.get_num_gpus() > 0``) training and adding
    run on GPU 0 where faiss has a GPU version of the index (Flat, IVF; not HNSW); the index is
    moved back to the CPU to be written.

    Args:
        doc_ids: (list[str]) document ids, row ``i`` of ``vectors`` is ``doc_ids[i]``; unique.
        vectors: (n, d) float document vectors (cast to float32).
        out_dir: (str | Path) the index directory to produce.
        factory: (str) a ``faiss.index_factory`` string: ``"Flat"`` (exact), ``"HNSW32"``,
            ``"IVF{nlist},Flat"``, ... Default: ``"Flat"``.
        metric: (str) ``"ip"`` (inner product; cosine for unit vectors) or ``"l2"`` (scores are
            negated squared distances). Default: ``"ip"``.
        encoder: (str) name of the document encoder (``DenseEncoder.name``).
        encoder_checksum: (str) its weights' sha256 (``DenseEncoder.checksum``).
        tokenizer: (str) tokenizer name or path.
        corpus_path: (str | Path) the corpus file the documents were read from (checksummed).
        overwrite: (bool) replace an existing index. Default: False.
        train_seed: (int) seed of IVF's k-means. Default: 0.
        nprobe: (int) IVF lists visited per query, the searcher's default (IVF indexes only).
            Default: 32.
        ef_search: (int) HNSW candidate list size, the searcher's default (HNSW only; raised
            to ``k`` at search time when smaller). Default: 128.

    Returns:
        the manifest written.

    Raises:
        ValueError: mismatched or duplicate ids, a bad matrix, an unknown metric.
        IndexFormatError: ``out_dir`` exists and ``overwrite`` is False.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    matrix = _as_matrix(vectors, "document vectors")  # (n, d)
    if len(doc_ids) != len(matrix):
        raise ValueError(f"{len(doc_ids)} doc ids but {len(matrix)} vectors")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc ids are not unique")
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise ValueError(f"corpus_path {corpus_path} is not a file (pass the corpus file, e.g. corpus.jsonl)")
    start = time.perf_counter()
    dim = matrix.shape[1]
    with building(out_dir, overwrite=overwrite) as work:  # refuses an existing out_dir before any work
        index = _train_and_add(faiss.index_factory(dim, factory, METRICS[metric]), matrix, train_seed)
        settings = {"nprobe": nprobe, "ef_search": ef_search}
        extra = {"factory": factory, "metric": metric, "dim": dim, "train_seed": train_seed}
        extra.update({name: settings[name] for name in sorted(_tunable(index))})
        faiss.write_index(index, str(work / INDEX_FILE))
        atomic_write_text(work / DOC_IDS_FILE, json.dumps(list(doc_ids)) + "\n")
        manifest = Manifest(
            kind=KIND,
            encoder=encoder,
            encoder_checksum=encoder_checksum,
            tokenizer=tokenizer,
            num_docs=len(doc_ids),
            corpus=str(corpus_path),
            corpus_checksum=checksum([corpus_path]),
            build_seconds=time.perf_counter() - start,
            extra=extra,
        )
        shutil.rmtree(work / SHARDS, ignore_errors=True)
        write_manifest(work, manifest)
    log.info("faiss %s index of %d x %d vectors (%s) in %s", factory, len(matrix), dim, metric, out_dir)
    return manifest


class FaissSearcher:
    """Top-k search over an index written by :func:`build_faiss`.

    The directory is refused unless it holds a finished faiss index (:func:`read_manifest`
    with kind ``"faiss"``) whose vector count matches its ids. To refuse queries encoded by
    another model, check the index's encoder first::

        check_encoder(searcher.manifest, encoder.name, encoder.checksum, index_dir)

    Args:
        index_dir: (str | Path) the index directory.
        nprobe: (int | None) IVF lists visited per query; ``None``: the value stored at build
            time. IVF indexes only. Default: ``None``.
        ef_search: (int | None) HNSW candidate list size, raised to ``k`` when smaller;
            ``None``: the value stored at build time. HNSW indexes only. Default: ``None``.
        threads: (int | None) OpenMP threads for faiss (``faiss.omp_set_num_threads``, a
            process-wide setting); ``None`` leaves faiss's setting. Default: ``None``.

    Attributes:
        manifest: (Manifest) the index's manifest.
        doc_ids: (list[str]) document id of each index row.
        dim: (int) vector size.

    Raises:
        IndexFormatError: missing, half-built or other-kind directory, or inconsistent files.
        ValueError: ``nprobe`` or ``ef_search`` given for an index they do not apply to.
    """

    def __init__(
        self,
        index_dir: str | Path,
        nprobe: int | None = None,
        ef_search: int | None = None,
        threads: int | None = None,
    ):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir, kind=KIND)
        self.index = faiss.read_index(str(self.index_dir / INDEX_FILE))
        self.doc_ids: list[str] = json.loads((self.index_dir / DOC_IDS_FILE).read_text(encoding="utf-8"))
        if not self.index.ntotal == len(self.doc_ids) == self.manifest.num_docs:
            raise IndexFormatError(
                f"{self.index_dir}: {self.index.ntotal} vectors, {len(self.doc_ids)} doc ids and "
                f"{self.manifest.num_docs} documents in the manifest; rebuild the index"
            )
        self.dim = self.index.d
        self.metric = self.manifest.extra.get("metric", "ip")
        self._set_search_parameters({"nprobe": nprobe, "ef_search": ef_search})
        if threads is not None:
            faiss.omp_set_num_threads(threads)

    def _set_search_parameters(self, given: dict[str, int | None]) -> None:
        """Apply ``nprobe``/``ef_search``: the given value, else the manifest's, else faiss's default."""
        tunable = _tunable(self.index)
        for name, value in given.items():
            if value is not None and name not in tunable:
                factory = self.manifest.extra.get("factory")
                raise ValueError(f"{name} does not apply to the {factory} index at {self.index_dir}")
            value = value if value is not None else self.manifest.extra.get(name)
            if value is not None:
                faiss.ParameterSpace().set_index_parameter(self.index, FAISS_NAMES[name], value)

    def search(self, query_ids: list[str], query_vectors: torch.Tensor | np.ndarray, k: int = 1000) -> Run:
        """The top ``k`` documents of every query.

        Args:
            query_ids: (list[str]) unique query ids, one per row of ``query_vectors``.
            query_vectors: (n, d) float query vectors from the index's encoder.
            k: (int) documents per query (at most the index size). Default: 1000.

        Returns:
            a :class:`~retrieval.types.Run` with every query, scores as in the module docstring
            (approximate indexes may return fewer than ``k`` documents).

        Raises:
            ValueError: ``k < 1``, duplicate or mismatched query ids, or a query dimension that
                is not the index's.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = _as_matrix(query_vectors, "query vectors")  # (n, d)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"query vectors have dimension {queries.shape[1]} but the index at {self.index_dir} has "
                f"dimension {self.dim} (built with encoder {self.manifest.encoder}); encode the queries "
                "with the index's encoder"
            )
        if len(query_ids) != len(queries):
            raise ValueError(f"{len(query_ids)} query ids but {len(queries)} query vectors")
        if len(set(query_ids)) != len(query_ids):
            raise ValueError("query ids are not unique")
        k = min(k, self.index.ntotal)
        scores, rows = self.index.search(queries, k, params=self._call_parameters(k))  # (n, k), (n, k)
        if self.metric == "l2":
            scores = -scores  # squared distance -> higher is better
        return Run({qid: self._ranking(s, r) for qid, s, r in zip(query_ids, scores, rows, strict=True)})

    def _call_parameters(self, k: int) -> faiss.SearchParameters | None:
        """Per-call settings: HNSW's efSearch raised to ``k`` (hnswlib's rule); ``None`` otherwise."""
        if "ef_search" not in _tunable(self.index):
            return None
        return faiss.SearchParametersHNSW(efSearch=max(faiss.downcast_index(self.index).hnsw.efSearch, k))

    def _ranking(self, scores: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        """One query's ``{doc id: score}`` from faiss's (k,) scores and rows (row -1: no result)."""
        ids = self.doc_ids
        return {ids[r]: s for r, s in zip(rows.tolist(), scores.tolist(), strict=True) if r >= 0}

    def __repr__(self) -> str:
        factory = self.manifest.extra.get("factory")
        return f"FaissSearcher({str(self.index_dir)!r}, factory={factory!r}, docs={self.index.ntotal})"
