"""One path from a BEIR directory to an index, a run and its metrics, for every index kind.

``python -m retrieval.index``, ``python -m retrieval.search`` and ``python -m retrieval.evaluate``
are thin wrappers over these functions. Index kinds (``cfg.index.kind``):

* ``bm25``: Lucene BM25 through Pyserini (:mod:`retrieval.index.bm25`);
* ``impact``: SPLADE document vectors quantized into a Lucene impact index (:mod:`retrieval.index.impact`);
* ``sparse_torch``: the same vectors scored exactly in torch (:mod:`retrieval.index.sparse_torch`);
* ``sparse_gpu``: the same vectors as a GPU inverted index scored by the sparse top-k kernel
  (:mod:`retrieval.index.sparse_gpu`; the torch reference on a CPU);
* ``faiss``: dense sentence-transformers vectors in faiss (:mod:`retrieval.index.faiss_index`).

The sparse kinds are searched either siamese (``index.query=splade``: the document encoder also
encodes queries) or inference-free (``index.query=idf``: tokenizer word-pieces weighted by an
IDF fitted on the corpus and saved as ``idf.json`` in the index directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from retrieval.cli import ConfigError
from retrieval.data.beir import BeirData, document_texts, load_beir
from retrieval.index.manifest import Manifest, check_encoder, checksum, read_manifest
from retrieval.types import Run

log = logging.getLogger(__name__)

KINDS = ("bm25", "impact", "sparse_torch", "sparse_gpu", "faiss")
QUERY_SIDES = ("splade", "idf")

SearchFn = Callable[[list[str], list[str], int], Run]  # (query ids, query texts, k) -> run


def load_dataset(cfg: DictConfig) -> BeirData:
    """The BEIR dataset named by ``cfg.dataset`` (``path`` wins over ``name``)."""
    ds = cfg.dataset
    return load_beir(ds.path or ds.name, split=ds.split, root=cfg.paths.data_dir, download=ds.download)


def index_dir_of(cfg: DictConfig, data: BeirData) -> Path:
    """``cfg.index_dir``, else ``<paths.indexes_dir>/<dataset>/<kind>``."""
    if cfg.get("index_dir"):
        return Path(cfg.index_dir)
    return Path(cfg.paths.indexes_dir) / data.name / cfg.index.kind


def _check_index_cfg(cfg: DictConfig) -> None:
    kind = cfg.index.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"index.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    query = cfg.index.get("query")
    if kind in ("impact", "sparse_torch", "sparse_gpu") and query not in QUERY_SIDES:
        raise ConfigError(f"index.query must be one of {', '.join(QUERY_SIDES)}, got {query!r}")


# --- building ---------------------------------------------------------------------------------


def build_index(cfg: DictConfig, data: BeirData, index_dir: Path, overwrite: bool = False) -> Manifest:
    """Build the configured index of ``data`` into ``index_dir`` (atomically; resumable encoding)."""
    _check_index_cfg(cfg)
    kind = cfg.index.kind
    corpus_path = data.path / "corpus.jsonl"
    doc_ids = data.corpus["doc_id"].to_list()
    log.info("building a %s index of %s (%d documents) in %s", kind, data.name, len(doc_ids), index_dir)
    if kind == "bm25":
        from retrieval.index.bm25 import build_bm25

        return build_bm25(
            data.corpus, index_dir, corpus_path, cfg.threads, overwrite, k1=cfg.index.k1, b=cfg.index.b
        )
    texts = document_texts(data.corpus)
    encoding_dir = encoding_cache(index_dir, cfg.index.encoder)
    if kind == "faiss":
        return _build_faiss(cfg, doc_ids, texts, index_dir, encoding_dir, corpus_path, overwrite)
    return _build_sparse(cfg, doc_ids, texts, index_dir, encoding_dir, corpus_path, overwrite)


def encoding_cache(index_dir: Path, encoder_cfg: DictConfig) -> Path:
    """Where document encodings are saved shard by shard: ``<indexes>/<dataset>/.encodings/<hash>``.

    Keyed by the encoder settings, so that an interrupted build resumes and the impact and
    sparse_torch indexes of one dataset share one encoding. The shards are checked against
    the texts and the encoder's checksum before reuse; deleting the folder is always safe.
    """
    settings = json.dumps(OmegaConf.to_container(encoder_cfg, resolve=True), sort_keys=True)
    return index_dir.parent / ".encodings" / hashlib.sha256(settings.encode()).hexdigest()[:16]


def sparse_encoder(cfg: DictConfig):
    """The SPLADE encoder of ``cfg.index.encoder``."""
    from retrieval.encoders.splade import SpladeEncoder

    enc = cfg.index.encoder
    return SpladeEncoder(
        model=str(enc.model),
        max_length=enc.max_length,
        batch_size=enc.batch_size,
        zero_special_tokens=enc.zero_special_tokens,
        top_k=enc.top_k,
        prune_ratio=enc.prune_ratio,
    )


def dense_encoder(cfg: DictConfig):
    """The sentence-transformers encoder of ``cfg.index.encoder`` (MiniLM by default)."""
    from retrieval.encoders.dense import DenseEncoder

    enc = cfg.index.encoder
    kwargs = {"batch_size": enc.batch_size}
    if enc.model:
        kwargs["model"] = str(enc.model)
    return DenseEncoder(**kwargs)


def _build_sparse(cfg, doc_ids, texts, index_dir, encoding_dir, corpus_path, overwrite) -> Manifest:
    from retrieval.encoders.sparse import activation_probability, encode_in_shards

    encoder = sparse_encoder(cfg)
    key = f"{encoder.name}:{encoder.checksum}"
    vectors = encode_in_shards(
        encoder.encode, texts, encoding_dir, shard_size=cfg.shard_size, key=key
    )  # (D, V)
    p_doc = activation_probability(vectors)  # (V,)
    active = torch.nonzero(p_doc).squeeze(1)
    # enough to report FLOPS for any query set later (sparse: terms no document uses are left out)
    extra = {"doc_activation": {str(j): float(p_doc[j]) for j in active.tolist()}}
    common = dict(
        encoder=encoder.name,
        encoder_checksum=encoder.checksum,
        tokenizer=encoder.tokenizer_name,
        corpus_path=corpus_path,
        overwrite=overwrite,
        extra=extra,
    )
    if cfg.index.kind == "impact":
        from retrieval.index.impact import build_impact

        scale = float(cfg.index.scale)
        return build_impact(
            doc_ids, vectors, encoder.vocab, index_dir, scale=scale, threads=cfg.threads, **common
        )
    if cfg.index.kind == "sparse_gpu":
        from retrieval.index.sparse_gpu import build_sparse_gpu

        return build_sparse_gpu(doc_ids, vectors, index_dir, weight_dtype=cfg.index.weight_dtype, **common)
    from retrieval.index.sparse_torch import build_sparse_torch

    return build_sparse_torch(doc_ids, vectors, index_dir, **common)


def _build_faiss(cfg, doc_ids, texts, index_dir, encoding_dir, corpus_path, overwrite) -> Manifest:
    from retrieval.encoders.dense import encode_dense_in_shards
    from retrieval.index.faiss_index import build_faiss

    encoder = dense_encoder(cfg)
    vectors = encode_dense_in_shards(encoder, texts, encoding_dir, shard_size=cfg.shard_size)  # (D, d)
    searched = {k: v for k, v in (("nprobe", cfg.index.nprobe), ("ef_search", cfg.index.ef_search)) if v}
    return build_faiss(
        doc_ids,
        vectors,
        index_dir,
        factory=cfg.index.factory,
        metric=cfg.index.metric,
        encoder=encoder.name,
        encoder_checksum=encoder.checksum,
        tokenizer=encoder.name,
        corpus_path=corpus_path,
        overwrite=overwrite,
        **searched,
    )


def ensure_index(cfg: DictConfig, data: BeirData) -> tuple[Path, Manifest, float]:
    """The index directory, built first when missing (or when ``cfg.overwrite``).

    Returns:
        (index directory, its manifest, build seconds: 0 when it already existed).
    """
    _check_index_cfg(cfg)
    index_dir = index_dir_of(cfg, data)
    if index_dir.exists() and not cfg.get("overwrite", False):
        manifest = read_manifest(index_dir, cfg.index.kind)
        _check_corpus(manifest, data, index_dir)
        return index_dir, manifest, 0.0
    start = time.perf_counter()
    manifest = build_index(cfg, data, index_dir, overwrite=cfg.get("overwrite", False))
    return index_dir, manifest, time.perf_counter() - start


def _check_corpus(manifest: Manifest, data: BeirData, index_dir: Path) -> None:
    """Refuse an index built from another corpus than the dataset being evaluated."""
    corpus = data.path / "corpus.jsonl"
    if manifest.corpus_checksum != checksum([corpus]):
        raise ConfigError(
            f"{index_dir} was built from {manifest.corpus} ({manifest.num_docs} documents), "
            f"not from {corpus}; "
            "pass overwrite=true to rebuild it or index_dir=... to use another directory"
        )


# --- searching --------------------------------------------------------------------------------


def open_search(
    cfg: DictConfig, index_dir: Path, manifest: Manifest, data: BeirData
) -> tuple[SearchFn, dict]:
    """A function ``(query ids, query texts, k) -> Run`` over the index, and what encodes queries.

    Query encoders are checked against the manifest: the siamese SPLADE side and the dense side
    must be the very encoder (name and weights checksum) that built the documents; the
    inference-free side must use the documents' tokenizer.
    """
    kind = cfg.index.kind
    threads = cfg.get("threads", 1)
    if kind == "bm25":
        from retrieval.index.bm25 import BM25Searcher

        searcher = BM25Searcher(index_dir, k1=cfg.index.k1, b=cfg.index.b)
        return (lambda ids, texts, k: searcher.search(dict(zip(ids, texts, strict=True)), k, threads)), {
            "query encoder": f"Lucene analyzer, BM25 k1={cfg.index.k1} b={cfg.index.b}"
        }
    if kind == "faiss":
        from retrieval.index.faiss_index import FaissSearcher

        encoder = dense_encoder(cfg)
        check_encoder(manifest, encoder.name, encoder.checksum, index_dir)
        searcher = FaissSearcher(index_dir, nprobe=cfg.index.nprobe, ef_search=cfg.index.ef_search)
        return (lambda ids, texts, k: searcher.search(ids, encoder.encode(texts, progress=False), k)), {
            "query encoder": encoder.name
        }
    encoder = _sparse_query_encoder(cfg, index_dir, manifest, data)
    if kind == "impact":
        from retrieval.index.impact import ImpactSearcher

        searcher = ImpactSearcher(index_dir)

        def search(ids, texts, k):
            return searcher.search(ids, encoder.encode(texts, progress=False), encoder.vocab, k, threads)

    elif kind == "sparse_gpu":
        from retrieval.index.sparse_gpu import SparseGpuSearcher

        searcher = SparseGpuSearcher(
            index_dir, device=cfg.index.get("device"), head_terms=cfg.index.get("head_terms", 128)
        )

        def search(ids, texts, k):
            return searcher.search(ids, encoder.encode(texts, progress=False), k)

    else:
        from retrieval.index.sparse_torch import SparseTorchSearcher

        searcher = SparseTorchSearcher(index_dir, device=cfg.index.get("device"))

        def search(ids, texts, k):
            return searcher.search(ids, encoder.encode(texts, progress=False), k)

    return search, {"query encoder": encoder.name, "encode": encoder.encode}


def _sparse_query_encoder(cfg: DictConfig, index_dir: Path, manifest: Manifest, data: BeirData):
    """SPLADE (siamese) or the inference-free IDF encoder, checked against the index.

    The inference-free table is the model's own ``idf.json`` when its directory ships one (what
    ``python -m retrieval.train`` saves, trained or not), else one fitted on this corpus and
    kept beside the index.
    """
    if cfg.index.query == "splade":
        encoder = sparse_encoder(cfg)
        check_encoder(manifest, encoder.name, encoder.checksum, index_dir)
        return encoder
    from retrieval.encoders.inference_free import InferenceFreeQueryEncoder

    shipped = Path(manifest.tokenizer) / "idf.json"  # a model trained for inference-free queries
    idf_path = index_dir / "idf.json"
    if shipped.is_file():
        encoder = InferenceFreeQueryEncoder.load(manifest.tokenizer, shipped)
    elif idf_path.is_file():
        encoder = InferenceFreeQueryEncoder.load(manifest.tokenizer, idf_path)
    else:  # fitted once on the corpus with the documents' tokenizer, then kept beside the index
        encoder = InferenceFreeQueryEncoder.fit(manifest.tokenizer, document_texts(data.corpus))
        encoder.save(idf_path)
    return encoder


def search_all(search: SearchFn, data: BeirData, k: int, batch_size: int) -> Run:
    """Every query of ``data`` through ``search``, in batches; one merged run."""
    ids = data.queries["query_id"].to_list()
    texts = data.queries["text"].to_list()
    merged: dict[str, dict[str, float]] = {}
    for start in range(0, len(ids), batch_size):
        part = search(ids[start : start + batch_size], texts[start : start + batch_size], k)
        merged.update({qid: dict(part[qid]) for qid in part})
    return Run(merged, name=data.name)


def query_latency(search: SearchFn, data: BeirData, k: int, n: int, warmup: int = 10) -> dict[str, float]:
    """Per-query latency in ms, one query per call (encoding included), after ``warmup`` calls.

    Returns:
        ``{"latency_median_ms", "latency_p99_ms", "latency_queries"}``.
    """
    ids = data.queries["query_id"].to_list()
    texts = data.queries["text"].to_list()
    for i in range(min(warmup, len(ids))):
        search([ids[i]], [texts[i]], k)
    times = []
    for i in range(min(n, len(ids))):
        start = time.perf_counter()
        search([ids[i]], [texts[i]], k)
        times.append((time.perf_counter() - start) * 1000)
    if not times:
        return {"latency_median_ms": float("nan"), "latency_p99_ms": float("nan"), "latency_queries": 0}
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    median = statistics.median(times)
    return {"latency_median_ms": median, "latency_p99_ms": p99, "latency_queries": len(times)}


def truncate(run: Run, k: int, drop_self_hits: bool = False) -> Run:
    """The top ``k`` documents of every query (trec_eval order), self hits dropped first if asked."""
    out = {}
    for qid in run:
        ranked = [(d, s) for d, s in run.ranked(qid) if not (drop_self_hits and d == qid)]
        out[qid] = dict(ranked[:k])
    return Run(out, name=run.name)


def directory_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_run(run: Run, path: Path, tag: str) -> None:
    """The run as a TREC run file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run.to_trec(path, tag=tag)
    log.info("run written to %s", path)


def sparsity(manifest: Manifest, query_vectors: torch.Tensor) -> dict[str, float]:
    """Average non-zeros per document and query, FLOPS and document FLOPS (for sparse indexes)."""
    from retrieval.encoders.sparse import activation_probability, sparsity_of

    p_doc = torch.zeros(query_vectors.shape[1], dtype=torch.float64)  # (V,)
    for j, p in manifest.extra.get("doc_activation", {}).items():
        p_doc[int(j)] = p
    stats = sparsity_of(p_doc, activation_probability(query_vectors))
    return {
        "avg_doc_nnz": stats["doc_nnz"],
        "avg_query_nnz": stats["query_nnz"],
        "flops": stats["flops"],
        "doc_flops": stats["doc_flops"],
    }


__all__ = [
    "KINDS",
    "build_index",
    "directory_size",
    "ensure_index",
    "index_dir_of",
    "load_dataset",
    "open_search",
    "query_latency",
    "search_all",
    "sparsity",
    "truncate",
    "write_run",
]
