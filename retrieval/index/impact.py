"""Learned sparse vectors (SPLADE, uniCOIL, ...) in a Lucene impact index, searched by exact dot product.

Lin and Ma, *A Few Brief Notes on DeepImpact, COIL, and a Conceptual Framework for
Information Retrieval Techniques*, arXiv:2106.14807, 2021; Anserini's impact indexes as used
by Pyserini (https://github.com/castorini/pyserini). Weights are quantized to integers
(:func:`quantize`), each document's integer weights are stored as Lucene term frequencies
(``IndexCollection -impact -pretokenized``, one Lucene term per vocabulary token, no analysis),
and Anserini's ``ImpactSimilarity`` scores a document by the integer dot product

.. math::

    s(q, d) = \\sum_{t} q_t \\, d_t, \\qquad q_t = \\mathrm{round}(s \\cdot w^q_t), \\quad
    d_t = \\mathrm{round}(s \\cdot w^d_t)

with the same quantization scale :math:`s` (the index's, from its manifest) on both sides.
Lucene adds the products as float32, so scores are exact while they stay below
:math:`2^{24}` (e.g. 100 shared terms of weight 3.0 at scale 100 give :math:`9 \\cdot 10^6`).
As for BM25 (:mod:`retrieval.index.bm25`), Anserini rounds scores to 1e-4 and lowers the n-th
of a group of tied documents (doc id order, ascending) by ``n * 1e-6``.

Tokens are Lucene terms as they are (case, ``##`` prefixes, punctuation, non-ASCII all kept,
tested); a token that is used and contains whitespace is refused, since the pre-tokenized
index splits on whitespace.

Example::

    manifest = build_impact(doc_ids, doc_vectors, encoder.vocab, "indexes/scifact-splade",
                            encoder=name, encoder_checksum=sha, tokenizer=name, corpus_path=path)
    run = ImpactSearcher("indexes/scifact-splade").search(qids, query_vectors, encoder.vocab)
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from retrieval.index.manifest import (
    IndexFormatError,
    Manifest,
    building,
    checksum,
    read_manifest,
    write_manifest,
)
from retrieval.lucene import index_collection, java_class, run_from_hits, write_collection
from retrieval.types import Run

log = logging.getLogger(__name__)

KIND = "impact"
_MAX_WEIGHT = 2**31 - 1  # Lucene term frequencies and Java Integers are int32
_ROWS_PER_CHUNK = 4096  # rows converted to Python lists at a time while writing the collection


def quantize(vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """Integer impact weights: ``round(w * scale)`` per stored weight, zeros dropped.

    The product is taken in float64 and rounded half to even (``torch.round``, as Python's
    ``round``), e.g. at scale 100: 0.123 -> 12, 0.125 -> 12, 0.135 -> 14, 0.004 -> 0 (dropped).

    Args:
        vectors: (n, V) sparse CSR, float weights.
        scale: (float) positive multiplier applied before rounding (Pyserini's SPLADE indexes use 100).

    Returns:
        (n, V) sparse CSR int32 holding the non-zero rounded weights, columns in input order.

    Raises:
        TypeError: ``vectors`` is not a 2-D sparse CSR tensor.
        ValueError: ``scale`` is not positive, or a rounded weight does not fit in int32.
    """
    if not isinstance(vectors, torch.Tensor) or vectors.layout != torch.sparse_csr or vectors.dim() != 2:
        raise TypeError(f"vectors must be a 2-D torch sparse CSR tensor, got {_describe(vectors)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    crow, col, val = vectors.crow_indices().long(), vectors.col_indices().long(), vectors.values()
    weights = torch.round(val.double() * scale)  # (nnz,)
    if weights.numel() and weights.abs().max() > _MAX_WEIGHT:
        raise ValueError(
            f"a weight times scale={scale} exceeds int32 ({weights.abs().max():.3g}); lower scale"
        )
    keep = weights != 0  # (nnz,)
    n = vectors.shape[0]
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())  # (nnz,) row ids
    kept_per_row = torch.bincount(rows[keep], minlength=n)  # (n,)
    new_crow = torch.cat([crow.new_zeros(1), kept_per_row.cumsum(0)])  # (n + 1,)
    return torch.sparse_csr_tensor(new_crow, col[keep], weights[keep].to(torch.int32), tuple(vectors.shape))


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.layout} tensor"
    return type(x).__name__


def vocab_checksum(vocab: Sequence[str]) -> str:
    """sha256 of the vocabulary (order included), recorded in the manifest and checked at search."""
    return hashlib.sha256(json.dumps(list(vocab), ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_for_lucene(
    vocab: Sequence[str], weights: torch.Tensor, what: str, check_unique: bool = True
) -> None:
    """Refuse what a Lucene impact index cannot hold (the ValueErrors of :func:`build_impact`)."""
    if len(vocab) != weights.shape[1]:
        raise ValueError(
            f"{what} have V={weights.shape[1]} columns but the vocabulary has {len(vocab)} tokens"
        )
    if check_unique and len(set(vocab)) != len(vocab):
        raise ValueError("the vocabulary repeats a token string; two columns would become one Lucene term")
    for token_id in torch.unique(weights.col_indices()).tolist():
        token = vocab[token_id]
        if not token or any(c.isspace() for c in token):
            raise ValueError(
                f"token {token_id} ({token!r}) of the {what} is empty or contains whitespace; the "
                "pre-tokenized Lucene index would split it"
            )
    if weights.values().numel() and weights.values().min() < 0:
        raise ValueError(f"the {what} have negative weights; Lucene impacts must be >= 0")


def _vector_lines(doc_ids: Sequence[str], weights: torch.Tensor, vocab: Sequence[str]) -> Iterator[str]:
    """JsonVectorCollection lines ``{"id", "contents": "", "vector": {token: int weight}}``."""
    crow, col, val = weights.crow_indices(), weights.col_indices(), weights.values()
    for start in range(0, len(doc_ids), _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, len(doc_ids))
        lo, hi = int(crow[start]), int(crow[stop])
        bounds = (crow[start : stop + 1] - lo).tolist()  # (rows + 1,) offsets into this chunk
        cols, vals = col[lo:hi].tolist(), val[lo:hi].tolist()
        for r, doc_id in enumerate(doc_ids[start:stop]):
            a, b = bounds[r], bounds[r + 1]
            vector = {vocab[c]: v for c, v in zip(cols[a:b], vals[a:b], strict=True)}
            yield json.dumps({"id": doc_id, "contents": "", "vector": vector}, ensure_ascii=False)


def build_impact(
    doc_ids: Sequence[str],
    vectors: torch.Tensor,
    vocab: Sequence[str],
    out_dir: str | Path,
    *,
    scale: float = 100.0,
    encoder: str,
    encoder_checksum: str,
    tokenizer: str,
    corpus_path: str | Path,
    threads: int = 1,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Manifest:
    """Quantize document vectors and write them as a Lucene impact index.

    The vectors are written as a temporary JsonVectorCollection (``threads`` files) next to
    ``out_dir``, indexed with ``-impact -pretokenized`` into the build directory and deleted;
    the manifest is written last and the directory renamed into place. A document whose
    weights all round to 0 has nothing to index and is left out by Anserini (logged).

    Args:
        doc_ids: (Sequence[str]) ``n`` unique doc ids, row order of ``vectors``.
        vectors: (n, V) sparse CSR float32 document weights (non-negative).
        vocab: (Sequence[str]) ``V`` unique token strings, ``vocab[j]`` names column ``j``.
        out_dir: (str | Path) the index directory to create.
        scale: (float, default 100.0) quantization scale (:func:`quantize`), kept in the manifest.
        encoder: (str) the document encoder's name, for :func:`~retrieval.index.manifest.check_encoder`.
        encoder_checksum: (str) sha256 of its weights.
        tokenizer: (str) its tokenizer's name or path.
        corpus_path: (str | Path) the corpus file the vectors were encoded from (sha256 recorded).
        threads: (int, default 1) indexing threads.
        overwrite: (bool, default False) replace an existing index at ``out_dir``.
        extra: (dict | None, default None) more settings to record; ``vocab_size`` and
            ``vocab_sha256`` are added.

    Returns:
        the manifest written (kind ``"impact"``, ``quantization_scale=scale``).

    Raises:
        TypeError: ``vectors`` is not sparse CSR.
        ValueError: sizes disagree, doc ids or tokens repeat, a used token is empty or has
            whitespace, or a weight is negative.
        IndexFormatError: ``out_dir`` exists and ``overwrite`` is False.
    """
    weights = quantize(vectors, scale)  # (n, V) int32
    if len(doc_ids) != weights.shape[0]:
        raise ValueError(f"{len(doc_ids)} doc ids for {weights.shape[0]} vectors")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc ids are not unique; Lucene would index both and runs repeat ids")
    _check_for_lucene(vocab, weights, "document vectors")
    corpus_sum = checksum([corpus_path])
    out_dir = Path(out_dir)
    start = time.perf_counter()
    with building(out_dir, overwrite) as work:
        with tempfile.TemporaryDirectory(prefix=f"{out_dir.name}.collection.", dir=work.parent) as tmp:
            write_collection(_vector_lines(doc_ids, weights.cpu(), vocab), len(doc_ids), tmp, shards=threads)
            flags = ("-impact", "-pretokenized")
            indexed = index_collection(tmp, work, "JsonVectorCollection", len(doc_ids), threads, flags)
        manifest = Manifest(
            kind=KIND,
            encoder=encoder,
            encoder_checksum=encoder_checksum,
            tokenizer=tokenizer,
            num_docs=indexed,
            corpus=str(corpus_path),
            corpus_checksum=corpus_sum,
            quantization_scale=float(scale),
            build_seconds=round(time.perf_counter() - start, 3),
            extra={**(extra or {}), "vocab_size": len(vocab), "vocab_sha256": vocab_checksum(vocab)},
        )
        write_manifest(work, manifest)
    log.info("impact index of %d documents written to %s", indexed, out_dir)
    return manifest


class ImpactSearcher:
    """Exact integer dot-product search of an index written by :func:`build_impact`.

    Queries go to Anserini's ``SimpleImpactSearcher`` as ``{token: Integer weight}`` maps,
    the very call Pyserini's ``LuceneImpactSearcher.batch_search`` makes, but not through that
    wrapper: it takes query *text* and encodes it with its own encoder, drops query tokens
    whose ``ln(N / df)`` is not above ``min_idf = 0`` (so a token found in every document is
    silently ignored, changing the dot product), and reads every index term's df in Python
    when constructed.

    Args:
        index_dir: (str | Path) the index directory; refused unless its manifest is an
            ``"impact"`` one with a quantization scale.

    Raises:
        IndexFormatError: missing or unreadable manifest, another kind, or no scale.
    """

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir, kind=KIND)
        if not self.manifest.quantization_scale:
            raise IndexFormatError(f"{self.index_dir}: impact manifest has no quantization_scale; rebuild it")
        self.scale = float(self.manifest.quantization_scale)
        self._searcher = java_class("io.anserini.search.SimpleImpactSearcher")(str(self.index_dir))
        self._checked_vocab: Sequence[str] | None = None  # the last vocabulary found to match the index

    def _check_vocab_matches(self, vocab: Sequence[str]) -> None:
        expected = self.manifest.extra.get("vocab_sha256")
        if expected is not None and vocab_checksum(vocab) != expected:
            raise ValueError(
                f"the query vocabulary ({len(vocab)} tokens) is not the one {self.index_dir} was built "
                f"with ({self.manifest.extra.get('vocab_size')} tokens, sha256 {expected[:12]})"
            )

    def _java_queries(self, weights: torch.Tensor, vocab: Sequence[str]):
        """A ``java.util.ArrayList`` of ``HashMap<String, Integer>``, one per row of ``weights``."""
        hash_map, integer = java_class("java.util.HashMap"), java_class("java.lang.Integer")
        queries = java_class("java.util.ArrayList")()
        crow, col = weights.crow_indices().tolist(), weights.col_indices().tolist()
        val = weights.values().tolist()
        for r in range(weights.shape[0]):
            query = hash_map()
            for c, v in zip(col[crow[r] : crow[r + 1]], val[crow[r] : crow[r + 1]], strict=True):
                query.put(vocab[c], integer(v))
            queries.add(query)
        return queries

    def search(
        self,
        query_ids: Sequence[str],
        query_vectors: torch.Tensor,
        vocab: Sequence[str],
        k: int = 1000,
        threads: int = 1,
    ) -> Run:
        """The top ``k`` documents of every query by integer dot product.

        Args:
            query_ids: (Sequence[str]) ``n`` unique query ids, row order of ``query_vectors``.
            query_vectors: (n, V) sparse CSR float query weights (non-negative), quantized
                here with the index's scale.
            vocab: (Sequence[str]) the vocabulary the index was built with.
            k: (int, default 1000) documents per query.
            threads: (int, default 1) search threads.

        Returns:
            a :class:`Run` with every query (an empty ranking when no weight survives
            quantization or no document shares a token).

        Raises:
            TypeError: ``query_vectors`` is not sparse CSR.
            ValueError: sizes disagree, ids repeat, the vocabulary is not the index's, a used
                token is unusable, or a weight is negative.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        weights = quantize(query_vectors, self.scale).cpu()  # (n, V) int32
        if len(query_ids) != weights.shape[0]:
            raise ValueError(f"{len(query_ids)} query ids for {weights.shape[0]} query vectors")
        if len(set(query_ids)) != len(query_ids):
            raise ValueError("query ids are not unique; their results would overwrite each other")
        if vocab is not self._checked_vocab:  # hashing 30k tokens per call would dominate latency
            self._check_vocab_matches(vocab)
        _check_for_lucene(vocab, weights, "query vectors", check_unique=vocab is not self._checked_vocab)
        self._checked_vocab = vocab
        qids = java_class("java.util.ArrayList")()
        for qid in query_ids:
            qids.add(qid)
        results = self._searcher.batch_search(self._java_queries(weights, vocab), qids, int(k), int(threads))
        hits = {entry.getKey(): entry.getValue() for entry in results.entrySet().toArray()}
        return run_from_hits(hits, query_ids, name=f"impact-{self.manifest.encoder}")

    def __repr__(self) -> str:
        return f"ImpactSearcher({str(self.index_dir)!r}, scale={self.scale}, docs={self.manifest.num_docs})"
