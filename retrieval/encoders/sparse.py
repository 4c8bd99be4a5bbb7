"""Sparse vectors as Sparrow passes them around: torch sparse CSR tensors ``(n, V)``.

Row ``i`` is input text ``i``, column ``j`` is the tokenizer's vocabulary id ``j``, values are
float32 and only non-zero weights are stored (columns sorted within a row). This module holds
what every sparse encoder and index shares:

* :func:`check_texts` -- input validation for ``encode(texts)``;
* :func:`csr_from_coo`, :func:`vstack_csr`, :func:`save_csr`, :func:`load_csr` -- building,
  stacking and storing such tensors (``torch.load(weights_only=True)`` can read the files);
* :func:`sparsity_stats` -- average active dimensions and FLOPS, reported beside quality;
* :func:`encode_in_shards` -- a resumable corpus encoding, one saved shard at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrieval.eval.report import atomic_write_text
from retrieval.index.manifest import IndexFormatError

log = logging.getLogger(__name__)

SHARDS_INFO = "shards.json"  # the fingerprint of the texts a shard directory belongs to


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, after checking that it is a sequence of strings.

    Raises:
        TypeError: ``texts`` is a single string or not a sequence, or an item is not a string
            (the message names its index).
    """
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return list(texts)


def csr_from_coo(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
    """A float32 CSR tensor from COO triples (no repeated ``(row, col)`` pairs), on the values' device.

    Args:
        rows: (nnz,) int64 row ids, in any order.
        cols: (nnz,) int64 column ids.
        values: (nnz,) weights.
        shape: ``(n, V)``.

    Returns:
        (n, V) sparse CSR float32, columns sorted within each row.
    """
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values.float(), shape, check_invariants=False)
    return coo.coalesce().to_sparse_csr()  # coalesce sorts by (row, col)


def vstack_csr(parts: Sequence[torch.Tensor], num_cols: int) -> torch.Tensor:
    """Stack CSR tensors ``(n_k, V)`` into one ``(sum n_k, V)`` (an empty list gives ``(0, V)``)."""
    crows, cols, vals, offset = [torch.zeros(1, dtype=torch.int64)], [], [], 0
    for part in parts:
        if part.shape[1] != num_cols:
            raise ValueError(f"cannot stack a ({part.shape[0]}, {part.shape[1]}) block into V={num_cols}")
        crows.append(part.crow_indices()[1:].cpu().long() + offset)
        cols.append(part.col_indices().cpu().long())
        vals.append(part.values().cpu())
        offset += part.values().numel()
    crow = torch.cat(crows)
    n = crow.numel() - 1
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64)
    val = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float32)
    return torch.sparse_csr_tensor(crow, col, val, (n, num_cols), check_invariants=False)


def save_csr(path: str | Path, matrix: torch.Tensor) -> None:
    """Save a CSR tensor atomically (temp file + ``os.replace``) as plain tensors.

    The file holds ``{"crow_indices", "col_indices", "values": tensors, "shape": [n, V]}``, so
    ``torch.load(path, weights_only=True)`` reads it without unpickling code.
    """
    path = Path(path)
    state = {
        "crow_indices": matrix.crow_indices().cpu(),
        "col_indices": matrix.col_indices().cpu(),
        "values": matrix.values().cpu(),
        "shape": list(matrix.shape),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_csr(path: str | Path) -> torch.Tensor:
    """Read a file written by :func:`save_csr` as a CSR tensor on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    crow, col, values = state["crow_indices"], state["col_indices"], state["values"]
    return torch.sparse_csr_tensor(crow, col, values, tuple(state["shape"]), check_invariants=True)


def sparsity_stats(doc_vectors: torch.Tensor, query_vectors: torch.Tensor) -> dict[str, float]:
    r"""Average active dimensions and FLOPS of sparse document and query vectors.

    FLOPS as in SPLADE (Formal, Piwowarski, Clinchant, SIGIR 2021, https://arxiv.org/abs/2107.05720),
    following Paria et al., *Minimizing FLOPs to Learn Efficient Sparse Representations*, ICLR 2020:
    the expected number of multiply-adds an inverted index spends on one (query, document) pair,

    .. math::
        \mathrm{FLOPS} = \sum_{j=1}^{V} p_j^{(q)} \, p_j^{(d)}, \qquad
        p_j^{(q)} = \frac{|\{q : w_j^{(q)} \neq 0\}|}{|Q|}, \quad
        p_j^{(d)} = \frac{|\{d : w_j^{(d)} \neq 0\}|}{|D|},

    i.e. the activation probability of term :math:`j` in a query times that in a document. The
    document FLOPS :math:`\sum_j (p_j^{(d)})^2` is the same count for a document against another
    document: what the FLOPS regulariser on documents drives down, independent of the queries.

    Args:
        doc_vectors: (n_docs, V) sparse CSR.
        query_vectors: (n_queries, V) sparse CSR over the same vocabulary.

    Returns:
        ``{"doc_nnz": mean non-zeros per document, "query_nnz": mean non-zeros per query,
        "flops": FLOPS, "doc_flops": document FLOPS}`` (0.0 for an empty side).
    """
    if doc_vectors.shape[1] != query_vectors.shape[1]:
        v_doc, v_query = doc_vectors.shape[1], query_vectors.shape[1]
        raise ValueError(f"vocabularies differ: documents have V={v_doc}, queries V={v_query}")
    return sparsity_of(activation_probability(doc_vectors), activation_probability(query_vectors))


def sparsity_of(p_doc: torch.Tensor, p_query: torch.Tensor) -> dict[str, float]:
    """:func:`sparsity_stats` from the (V,) activation probabilities of each side.

    An index keeps only ``p_doc`` (:func:`activation_probability` of its documents), which is
    enough to report FLOPS for any query set later.
    """
    return {
        "doc_nnz": float(p_doc.sum()),  # sum_j p_j = mean non-zeros per row
        "query_nnz": float(p_query.sum()),
        "flops": float((p_query * p_doc).sum()),
        "doc_flops": float((p_doc * p_doc).sum()),
    }


def activation_probability(vectors: torch.Tensor) -> torch.Tensor:
    """(V,) float64: the fraction of rows with a non-zero weight on each column."""
    n, vocab = vectors.shape
    active = vectors.col_indices()[vectors.values() != 0].cpu()  # (nnz,) columns of stored non-zeros
    counts = torch.bincount(active, minlength=vocab).double()  # (V,)
    return counts / n if n else counts


def texts_fingerprint(texts: Sequence[str], shard_size: int, key: str = "") -> str:
    """sha256 over the texts (length-prefixed UTF-8), their count, the shard size and ``key``."""
    digest = hashlib.sha256(f"{len(texts)}\0{shard_size}\0{key}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def encode_in_shards(
    encode_fn: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    work_dir: str | Path,
    shard_size: int = 2000,
    progress: bool = True,
    key: str = "",
) -> torch.Tensor:
    """Encode ``texts`` shard by shard, saving each finished shard, resuming after an interruption.

    Shard ``s`` holds ``texts[s * shard_size : (s + 1) * shard_size]`` and is saved to
    ``work_dir/shard_{s:05d}.pt`` (:func:`save_csr`, atomically) as soon as it is encoded. A rerun
    over the same texts loads the shards that exist and encodes only the missing ones. To never
    mix in another corpus, ``work_dir/shards.json`` records a fingerprint of the texts, the shard
    size and ``key`` (:func:`texts_fingerprint`); a rerun with a different one is refused.

    For an index build, pass a folder inside the build's work directory, e.g.
    ``partial_dir(out_dir) / "shards"`` (:func:`retrieval.index.manifest.partial_dir`): it
    survives an interrupted build and the index builder removes it when the index is complete.

    Args:
        encode_fn: ``list[str] -> (len, V)`` sparse CSR, e.g. ``SpladeEncoder(...).encode``.
        texts: the corpus, in output order.
        work_dir: (str | Path) where shards are kept (created if missing).
        shard_size: (int, default 2000) texts per shard.
        progress: (bool, default True) a tqdm bar over texts.
        key: (str, default "") anything else the shards depend on, e.g. the encoder's name and
            checksum: part of the fingerprint, so shards of another encoder are refused too.

    Returns:
        (len(texts), V) sparse CSR float32 on the CPU, rows in input order.

    Raises:
        IndexFormatError: ``work_dir`` holds shards of other texts, shard size or key, or a shard
            whose row count is wrong.
        ValueError: ``shard_size < 1``, or ``encode_fn`` returned a wrong number of rows.
    """
    texts = check_texts(texts)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _claim_work_dir(work_dir, texts_fingerprint(texts, shard_size, key), len(texts), shard_size)
    starts = range(0, len(texts), shard_size)
    paths = [work_dir / f"shard_{s // shard_size:05d}.pt" for s in starts]
    done = sum(p.is_file() for p in paths)
    if done:
        log.info("%s: %d of %d shards already encoded, resuming", work_dir, done, len(paths))
    parts, encoded, start_time = [], 0, time.perf_counter()
    with tqdm(total=len(texts), disable=not progress, desc="encoding shards", unit="text") as bar:
        for start, path in zip(starts, paths, strict=True):
            chunk = texts[start : start + shard_size]
            if path.is_file():
                part = load_csr(path)
                if part.shape[0] != len(chunk):
                    raise IndexFormatError(f"{path}: {part.shape[0]} rows, expected {len(chunk)}; delete it")
            else:
                part = encode_fn(chunk).to_sparse_csr().cpu()
                if part.shape[0] != len(chunk):
                    raise ValueError(f"encode_fn returned {part.shape[0]} rows for {len(chunk)} texts")
                save_csr(path, part)
                encoded += len(chunk)
            parts.append(part)
            bar.update(len(chunk))
    if encoded:
        seconds = time.perf_counter() - start_time
        log.info("encoded %d texts in %.1f s (%.1f texts/s)", encoded, seconds, encoded / max(seconds, 1e-9))
    num_cols = parts[0].shape[1] if parts else _empty_vocab(encode_fn)
    return vstack_csr(parts, num_cols)


def _claim_work_dir(work_dir: Path, fingerprint: str, num_texts: int, shard_size: int) -> None:
    """Record the fingerprint in a fresh ``work_dir``, or check it against the recorded one."""
    info_path = work_dir / SHARDS_INFO
    info = {"fingerprint": fingerprint, "num_texts": num_texts, "shard_size": shard_size}
    if not info_path.is_file():
        if any(work_dir.glob("shard_*.pt")):
            raise IndexFormatError(f"{work_dir} holds shards but no {SHARDS_INFO}; delete it or use another")
        atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
        return
    old = json.loads(info_path.read_text(encoding="utf-8"))
    if old.get("fingerprint") != fingerprint:
        raise IndexFormatError(
            f"{work_dir} holds shards of other texts ({old.get('num_texts')} texts, shard size "
            f"{old.get('shard_size')}, fingerprint {str(old.get('fingerprint'))[:12]}) than these "
            f"({num_texts} texts, shard size {shard_size}, fingerprint {fingerprint[:12]}); refusing to "
            "mix them. Delete that directory or use another."
        )


def _empty_vocab(encode_fn: Callable[[list[str]], torch.Tensor]) -> int:
    """The column count for an empty corpus, asked of ``encode_fn([])``."""
    return encode_fn([]).shape[1]
