r"""Inference-free query encoding: a query is the IDF weights of its word-pieces, no model run.

Geng, Ru, Lin et al. *Towards Competitive Search Relevance For Inference-Free Learned Sparse
Representations*. 2024. https://arxiv.org/abs/2411.04403 -- and OpenSearch's neural sparse
search in "doc-only" mode, where documents are encoded by a SPLADE-like model at index time
and queries only by the tokenizer and an IDF table.

The vector of query :math:`q` puts on each distinct word-piece :math:`t` of its tokenization
(special tokens dropped; a word-piece repeated in the query counts once) the weight

.. math::
    \mathrm{idf}(t) = \ln\Bigl(1 + \frac{N - \mathrm{df}(t) + 0.5}{\mathrm{df}(t) + 0.5}\Bigr)

(BM25's IDF), where :math:`N` is the number of documents of the corpus the table was fitted on
and :math:`\mathrm{df}(t)` how many of them contain :math:`t` when tokenized by the same
tokenizer. A query-document score is then :math:`\sum_{t \in q} \mathrm{idf}(t)\, w_t^{(d)}`.

``idf.json`` (:meth:`InferenceFreeQueryEncoder.save`) is a JSON object::

    {"format": "sparrow-idf-1",
     "tokenizer": "<tokenizer name>",
     "num_docs": N,            # documents fitted on (null if unknown)
     "max_length": 256,        # word-pieces per document when fitting (null: no truncation)
     "idf": {"<token>": <float>, ...}}   # one entry per vocabulary token, in id order

Each float32 value is written as Python's ``repr`` of it (widened to float64, exact), so a
saved and reloaded table is bit-identical and has the same
:attr:`~InferenceFreeQueryEncoder.checksum`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrieval.encoders.sparse import check_texts, csr_from_coo
from retrieval.encoders.splade import model_dir, model_name, vocabulary
from retrieval.eval.report import atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "sparrow-idf-1"
_CHUNK = 10_000  # texts tokenized per step (bounds memory on large corpora)


def bm25_idf(df: torch.Tensor, num_docs: int) -> torch.Tensor:
    r""":math:`\ln(1 + (N - \mathrm{df} + 0.5) / (\mathrm{df} + 0.5))` elementwise, as float32.

    Args:
        df: (V,) document frequencies, ``0 <= df <= num_docs``.
        num_docs: :math:`N`.

    Returns:
        (V,) float32, computed in float64 then rounded.
    """
    df = df.double()
    return torch.log1p((num_docs - df + 0.5) / (df + 0.5)).float()


def _load_tokenizer(tokenizer: str | Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError("inference-free queries need transformers: pip install transformers") from err
    return AutoTokenizer.from_pretrained(model_dir(tokenizer))


def _unique_pieces(tokenizer, texts: list[str], special: torch.Tensor, max_length: int | None):
    """The distinct non-special word-pieces of each text as COO ``(rows, ids)``, sorted by (row, id).

    Args:
        texts: the texts (their positions are the rows).
        special: (S,) int64 special token ids, dropped.
        max_length: word-pieces per text, special tokens included; ``None`` for no truncation.

    Returns:
        (rows, ids): (n_pairs,) int64 each.
    """
    vocab_size = len(tokenizer)
    encoded = tokenizer(
        texts,
        truncation=max_length is not None,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    ids = torch.tensor([i for seq in encoded for i in seq], dtype=torch.int64)  # (total,)
    rows = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(seq) for seq in encoded]))
    keep = ~torch.isin(ids, special)
    keys = torch.unique(rows[keep] * vocab_size + ids[keep])  # (n_pairs,) sorted, each pair once
    return keys // vocab_size, keys % vocab_size


class InferenceFreeQueryEncoder:
    """Queries as IDF-weighted bags of distinct word-pieces (see the module docstring).

    Build it with :meth:`fit` over the corpus the documents come from, or :meth:`load` a saved
    table; the tokenizer must be the document encoder's, so that columns line up.

    Args:
        tokenizer: (str | Path) a tokenizer directory or hub id (usually the document model's).
        idf: (torch.Tensor) (V,) IDF per vocabulary id, ``V`` the tokenizer's vocabulary size.
        num_docs: (int | None, default None) documents the table was fitted on (recorded only).
        max_length: (int | None, default None) document truncation used when fitting (recorded only).

    Attributes:
        name: (str) ``"idf:" + tokenizer name`` (a directory's absolute path, or the hub id).
        tokenizer_name: (str) the tokenizer's name.
        checksum: (str) sha256 over the IDF values as little-endian float32.
        vocab: (list[str]) column ``j`` is token ``vocab[j]``.
        idf: (torch.Tensor) (V,) float32.
    """

    def __init__(
        self,
        tokenizer: str | Path,
        idf: torch.Tensor,
        num_docs: int | None = None,
        max_length: int | None = None,
    ):
        self.tokenizer_name = model_name(tokenizer)
        self.name = "idf:" + self.tokenizer_name
        self.tokenizer = _load_tokenizer(tokenizer)
        self.vocab = vocabulary(self.tokenizer, len(self.tokenizer))
        idf = torch.as_tensor(idf, dtype=torch.float32).cpu()
        if idf.shape != (len(self.vocab),):
            raise ValueError(f"idf has shape {tuple(idf.shape)}; this tokenizer needs ({len(self.vocab)},)")
        if not torch.isfinite(idf).all() or (idf < 0).any():
            raise ValueError("idf values must be finite and >= 0")
        self.idf = idf
        self.num_docs = num_docs
        self.max_length = max_length
        self.checksum = hashlib.sha256(idf.numpy().astype("<f4").tobytes()).hexdigest()
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.int64)

    @classmethod
    def fit(
        cls,
        tokenizer: str | Path,
        corpus_texts: Sequence[str],
        max_length: int | None = 256,
        progress: bool | None = None,
    ) -> InferenceFreeQueryEncoder:
        """Count document frequencies over a corpus and build the encoder.

        Args:
            tokenizer: (str | Path) the document encoder's tokenizer.
            corpus_texts: the documents (``title + " " + text``), ``N = len(corpus_texts)`` >= 1.
            max_length: (int | None, default 256) word-pieces per document, special tokens
                included, as the document encoder truncates (``SpladeEncoder``'s default); a
                word-piece beyond it does not count. ``None``: whole documents.
            progress: (bool | None, default None) a tqdm bar; ``None``: for corpora of at least
                ten chunks of 10,000 documents, on a terminal.

        Raises:
            ValueError: an empty corpus.
            TypeError: ``corpus_texts`` is not a sequence of strings.
        """
        texts = check_texts(corpus_texts)
        if not texts:
            raise ValueError("cannot fit IDF on an empty corpus")
        start = time.perf_counter()
        tok = _load_tokenizer(tokenizer)
        special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.int64)
        df = torch.zeros(len(tok), dtype=torch.int64)  # (V,)
        disable = (None if len(texts) >= 10 * _CHUNK else True) if progress is None else not progress
        for lo in tqdm(range(0, len(texts), _CHUNK), disable=disable, desc="IDF", unit="chunk"):
            _, ids = _unique_pieces(tok, texts[lo : lo + _CHUNK], special, max_length)
            df += torch.bincount(ids, minlength=len(tok))  # each (doc, piece) pair once
        log.info("IDF fitted on %d documents in %.1f s", len(texts), time.perf_counter() - start)
        return cls(tokenizer, bm25_idf(df, len(texts)), num_docs=len(texts), max_length=max_length)

    def save(self, path: str | Path) -> Path:
        """Write ``idf.json`` (format in the module docstring) atomically; returns its path."""
        path = Path(path)
        table = dict(zip(self.vocab, self.idf.tolist(), strict=True))  # float32 values, exact as float
        data = {
            "format": FORMAT,
            "tokenizer": self.tokenizer_name,
            "num_docs": self.num_docs,
            "max_length": self.max_length,
            "idf": table,
        }
        atomic_write_text(path, json.dumps(data, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, tokenizer: str | Path, path: str | Path) -> InferenceFreeQueryEncoder:
        """Read a table written by :meth:`save`, for ``tokenizer``.

        Raises:
            ValueError: not a Sparrow IDF file, or its tokens are not exactly the tokenizer's.
        """
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        table = data.get("idf") if isinstance(data, dict) else None
        if not isinstance(table, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a Sparrow IDF table (expected format {FORMAT!r})")
        tok = _load_tokenizer(tokenizer)
        if list(table) != vocabulary(tok, len(tok)):
            raise ValueError(
                f"{path}: its {len(table)} tokens are not this tokenizer's vocabulary "
                f"({model_name(tokenizer)}); fit the table with the same tokenizer"
            )
        idf = torch.tensor(list(table.values()), dtype=torch.float32)
        return cls(tokenizer, idf, num_docs=data.get("num_docs"), max_length=data.get("max_length"))

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> torch.Tensor:
        """Encode queries: ``idf(t)`` on each distinct non-special word-piece ``t``.

        Queries are not truncated.

        Args:
            texts: the queries.
            progress: (bool | None, default None) a tqdm bar; ``None``: for at least ten chunks of
                10,000 queries, on a terminal.

        Returns:
            (len(texts), V) sparse CSR float32 on the CPU, row ``i`` for ``texts[i]``.

        Raises:
            TypeError: ``texts`` is not a sequence of strings (the message names the bad index).
        """
        texts = check_texts(texts)
        empty = torch.zeros(0, dtype=torch.int64)
        rows, ids = [empty], [empty]
        disable = (None if len(texts) >= 10 * _CHUNK else True) if progress is None else not progress
        for lo in tqdm(range(0, len(texts), _CHUNK), disable=disable, desc="IDF queries", unit="chunk"):
            row, piece = _unique_pieces(self.tokenizer, texts[lo : lo + _CHUNK], self.special_ids, None)
            rows.append(row + lo)
            ids.append(piece)
        rows, ids = torch.cat(rows), torch.cat(ids)  # (nnz,) each
        values = self.idf[ids]  # (nnz,)
        keep = values != 0  # store non-zeros only
        return csr_from_coo(rows[keep], ids[keep], values[keep], (len(texts), len(self.vocab)))
