"""SPLADE: sparse lexical representations from a masked language model's logits."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrieval.encoders.sparse import check_texts, csr_from_coo
from retrieval.eval.topk import topk_with_id_ties
from retrieval.index.manifest import checksum
from retrieval.models import load_sparse_model

log = logging.getLogger(__name__)

_PROGRESS_MIN_BATCHES = 8  # progress=None shows a bar only for inputs of at least this many batches
_SORT_CHUNK = 10_000  # texts tokenized, sorted by length and batched together (bounds memory)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or ``cuda`` when a GPU is present and ``cpu`` otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_name(model: str | Path) -> str:
    """The name Sparrow records for a model: a local directory's absolute path, else the hub id."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve().as_posix()
    return str(model).strip().rstrip("/")


def model_dir(model: str | Path) -> Path:
    """The local directory of ``model``: the directory itself, or the hub snapshot in the HF cache.

    A hub id is fetched with ``huggingface_hub.snapshot_download`` (which, with
    ``HF_HUB_OFFLINE=1``, only looks in the cache).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model)))


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory, sorted: ``*.safetensors``, else ``pytorch_model*.bin``.

    Raises:
        FileNotFoundError: the directory has neither.
    """
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weight file")
    return files


def vocabulary(tokenizer, size: int) -> list[str]:
    """Column names of sparse vectors, ``id -> token string`` for ids ``0..size-1``.

    Ids the tokenizer does not know (a model may pad its output layer beyond the tokenizer's
    vocabulary) are named ``"<id:N>"``.
    """
    known = {i: token for token, i in tokenizer.get_vocab().items()}
    return [known.get(i, f"<id:{i}>") for i in range(size)]


def splade_max_pool(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    r"""SPLADE-max pooling of MLM logits: :math:`w_j = \max_i \log(1 + \mathrm{ReLU}(x_{ij}))`.

    The max runs over the non-padding positions :math:`i`. Since :math:`\log(1 + \mathrm{ReLU}(x))`
    is non-decreasing, it equals :math:`\log(1 + \mathrm{ReLU}(\max_i x_{ij}))`: the max is taken
    on the raw logits (one pass over the largest tensor, padding set to 0, which the ReLU floors
    anyway), and the activation on the ``(B, V)`` result only. ``logits`` is overwritten.

    Args:
        logits: (B, L, V) float, modified in place.
        attention_mask: (B, L) 1 for tokens, 0 for padding.

    Returns:
        (B, V) float32 weights, >= 0.
    """
    padding = (attention_mask == 0).unsqueeze(-1)  # (B, L, 1)
    pooled = logits.masked_fill_(padding, 0.0).amax(dim=1)  # (B, V)
    return pooled.float().relu_().log1p_()


def prune_weights(weights: torch.Tensor, top_k: int | None = None, prune_ratio: float | None = None):
    """Keep only the strongest weights of each row; the others become 0.

    * ``prune_ratio`` keeps :math:`w_j \\ge \\text{prune\\_ratio} \\cdot \\max_j w_j` (row-wise);
    * ``top_k`` keeps the ``top_k`` largest weights; among equal weights at the cut the lower
      vocabulary id is kept.

    With both, a weight is kept when it passes both tests (the order does not matter).

    Args:
        weights: (B, V) non-negative.
        top_k: (int | None) weights kept per row, >= 1.
        prune_ratio: (float | None) fraction of the row's maximum, in (0, 1].

    Returns:
        (B, V) a new tensor.
    """
    if prune_ratio is not None:
        weights = weights * (weights >= prune_ratio * weights.amax(dim=1, keepdim=True))  # (B, V)
    if top_k is not None and top_k < weights.shape[1]:
        values, ids = topk_with_id_ties(weights, top_k)  # (B, k) each, ties by lower id
        weights = torch.zeros_like(weights).scatter_(1, ids, values)  # (B, V)
    return weights


class SpladeEncoder:
    r"""SPLADE sparse encoder over any Hugging Face masked language model, or a Sparrow echo model.

    Formal, Piwowarski, Clinchant. *SPLADE: Sparse Lexical and Expansion Model for First Stage
    Ranking*. SIGIR 2021. https://arxiv.org/abs/2107.05720 -- with the max pooling of SPLADE v2
    (Formal, Lassance, Piwowarski, Clinchant, https://arxiv.org/abs/2109.10086).

    The weight of vocabulary term :math:`j` for a text of tokens :math:`i = 1..L` is

    .. math::
        w_j = \max_{i \,:\, \text{not padding}} \log\bigl(1 + \mathrm{ReLU}(x_{ij})\bigr)

    where :math:`x_{ij}` is the MLM logit of term :math:`j` at position :math:`i`. The same
    encoder serves queries and documents (the "siamese" setting); a query-document score is
    the dot product of their vectors.

    The model is opened with :func:`retrieval.models.load_sparse_model`: a masked LM gives
    :class:`~retrieval.models.SpladeMLM`, a causal LM (or a directory whose ``sparrow.json``
    says so) :class:`~retrieval.models.SpladeEcho`, which reads each text twice and pools the
    second copy. The pooling is chunked over the vocabulary, so the ``(B, L, V)`` logits are
    never held at once.

    Texts are tokenized by the model's ``tokenize`` in chunks of 10,000, sorted by token count
    within a chunk (longest first) and batched, so that a batch holds texts of similar length and
    little padding; rows come back in input order.

    Args:
        model: (str | Path) a local model directory or a hub id: a masked LM
            (``AutoModelForMaskedLM``), a causal LM, or a model saved by Sparrow; with its tokenizer.
        max_length: (int, default 256) word-pieces per text, special tokens included; longer
            texts are truncated (an echo model's input holds two copies of at most
            ``(max_length - 1) // 2`` pieces each).
        batch_size: (int, default 32) texts per forward pass.
        device: (str | None, default None) ``None`` picks ``cuda`` when available, else ``cpu``.
        zero_special_tokens: (bool, default True) set the weights of the tokenizer's special
            tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``, ``[MASK]`` for BERT) to 0; they are
            not words and would otherwise be in every vector.
        top_k: (int | None, default None) keep only the ``top_k`` largest weights per vector
            (ties at the cut: lower vocabulary id kept).
        prune_ratio: (float | None, default None) keep only weights ``>= prune_ratio * max``
            of the vector, ``0 < prune_ratio <= 1``.
        chunk_size: (int | None, default 4096) vocabulary rows per pooling chunk; ``None`` pools
            through the full logits.

    Attributes:
        name: (str) the model's absolute directory, or its hub id (what manifests record).
        tokenizer_name: (str) the tokenizer's name: the model's, since it is loaded from there.
        checksum: (str) sha256 over the model's weight files, sorted by name.
        vocab: (list[str]) column ``j`` of the vectors is token ``vocab[j]``.
        sparse_model: (SpladeMLM | SpladeEcho) the SPLADE module.
        model: the Hugging Face model inside it (``model(...).logits`` are the full logits).
    """

    def __init__(
        self,
        model: str | Path,
        max_length: int = 256,
        batch_size: int = 32,
        device: str | None = None,
        zero_special_tokens: bool = True,
        top_k: int | None = None,
        prune_ratio: float | None = None,
        chunk_size: int | None = 4096,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if prune_ratio is not None and not 0 < prune_ratio <= 1:
            raise ValueError(f"prune_ratio must be in (0, 1] or None, got {prune_ratio}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.name = model_name(model)
        self.tokenizer_name = self.name
        directory = model_dir(model)
        self.checksum = checksum(weight_files(directory))
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.top_k = top_k
        self.prune_ratio = prune_ratio
        self.sparse_model = (
            load_sparse_model(directory, chunk_size, zero_special_tokens).to(self.device).eval()
        )
        self.model = self.sparse_model.model
        self.tokenizer = self.sparse_model.tokenizer
        self.vocab_size = self.sparse_model.vocab_size
        self.vocab = vocabulary(self.tokenizer, self.vocab_size)
        special = self.sparse_model.special_ids if zero_special_tokens else []
        self.special_ids = torch.tensor(special, dtype=torch.int64, device=self.device)
        log.info(
            "SPLADE %s (%s) on %s, V=%d, max_length=%d",
            self.name,
            self.sparse_model.kind,
            self.device,
            self.vocab_size,
            max_length,
        )

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> torch.Tensor:
        """Encode texts into SPLADE vectors.

        Args:
            texts: the texts (queries, or documents as ``title + " " + text``).
            progress: (bool | None, default None) a tqdm bar; ``None`` shows it for inputs of at
                least 8 batches, on a terminal.

        Returns:
            (len(texts), V) sparse CSR float32 on the CPU, row ``i`` for ``texts[i]``.

        Raises:
            TypeError: ``texts`` is not a sequence of strings (the message names the bad index).
        """
        texts = check_texts(texts)
        start = time.perf_counter()
        chunks = range(0, len(texts), _SORT_CHUNK)
        n_batches = sum(-(-min(_SORT_CHUNK, len(texts) - lo) // self.batch_size) for lo in chunks)
        disable = (None if n_batches >= _PROGRESS_MIN_BATCHES else True) if progress is None else not progress
        empty = torch.zeros(0, dtype=torch.int64)
        rows, cols, values = [empty], [empty], [torch.zeros(0)]  # COO triples, rows in input order
        with tqdm(total=n_batches, disable=disable, desc="SPLADE", unit="batch") as bar:
            for batch, inputs in self._batches(texts):
                weights = self._encode_batch(inputs)  # (B, V)
                row, col = weights.nonzero(as_tuple=True)  # (nnz,) each
                rows.append(batch[row.cpu()])
                cols.append(col.cpu())
                values.append(weights[row, col].cpu())
                bar.update()
        seconds = time.perf_counter() - start
        rate = len(texts) / max(seconds, 1e-9)
        log.info("SPLADE encoded %d texts in %.1f s (%.1f texts/s)", len(texts), seconds, rate)
        shape = (len(texts), self.vocab_size)
        return csr_from_coo(torch.cat(rows), torch.cat(cols), torch.cat(values), shape)  # (n, V)

    def _batches(self, texts: list[str]):
        """Yield ``(rows, inputs)``: (B,) input positions and the padded batch, longest texts first.

        Texts are tokenized ``_SORT_CHUNK`` at a time (padded on the right), sorted by length
        within the chunk, and each batch is cut to its longest text.
        """
        for lo in range(0, len(texts), _SORT_CHUNK):
            encoded = self.sparse_model.tokenize(texts[lo : lo + _SORT_CHUNK], self.max_length)
            lengths = encoded["attention_mask"].sum(dim=1)  # (n,)
            order = torch.sort(lengths, descending=True, stable=True).indices  # longest first
            for b in range(0, len(order), self.batch_size):
                batch = order[b : b + self.batch_size]  # (B,)
                width = int(lengths[batch].max())
                yield batch + lo, {key: value[batch, :width] for key, value in encoded.items()}

    @torch.inference_mode()
    def _encode_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) pruned SPLADE weights of one padded batch, on the encoder's device."""
        batch = {key: value.to(self.device) for key, value in batch.items()}
        weights = self.sparse_model(**batch)  # (B, V), special tokens already zeroed
        return prune_weights(weights, self.top_k, self.prune_ratio)
