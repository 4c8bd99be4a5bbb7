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

log = logging.getLogger(__name__)

_PROGRESS_MIN_BATCHES = 8  # progress=None shows a bar only for inputs of at least this many batches


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


def _transformers():
    """``(AutoModelForMaskedLM, AutoTokenizer)``, imported lazily with an install hint."""
    try:
        from transformers import AutoModelForMaskedLM, AutoTokenizer
    except ImportError as err:
        raise ImportError("SPLADE encoders need Hugging Face transformers: pip install transformers") from err
    return AutoModelForMaskedLM, AutoTokenizer


class SpladeEncoder:
    r"""SPLADE sparse encoder over any Hugging Face masked language model.

    Formal, Piwowarski, Clinchant. *SPLADE: Sparse Lexical and Expansion Model for First Stage
    Ranking*. SIGIR 2021. https://arxiv.org/abs/2107.05720 -- with the max pooling of SPLADE v2
    (Formal, Lassance, Piwowarski, Clinchant, https://arxiv.org/abs/2109.10086).

    The weight of vocabulary term :math:`j` for a text of tokens :math:`i = 1..L` is

    .. math::
        w_j = \max_{i \,:\, \text{not padding}} \log\bigl(1 + \mathrm{ReLU}(x_{ij})\bigr)

    where :math:`x_{ij}` is the MLM logit of term :math:`j` at position :math:`i`. The same
    encoder serves queries and documents (the "siamese" setting); a query-document score is
    the dot product of their vectors.

    Texts are tokenized once, sorted by token count (longest first) and batched, so that a batch
    holds texts of similar length and little padding; rows come back in input order.

    Args:
        model: (str | Path) a local model directory or a hub id with an MLM head
            (``AutoModelForMaskedLM``) and its tokenizer.
        max_length: (int, default 256) word-pieces per text, special tokens included; longer
            texts are truncated.
        batch_size: (int, default 32) texts per forward pass.
        device: (str | None, default None) ``None`` picks ``cuda`` when available, else ``cpu``.
        zero_special_tokens: (bool, default True) set the weights of the tokenizer's special
            tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``, ``[MASK]`` for BERT) to 0; they are
            not words and would otherwise be in every vector.
        top_k: (int | None, default None) keep only the ``top_k`` largest weights per vector
            (ties at the cut: lower vocabulary id kept).
        prune_ratio: (float | None, default None) keep only weights ``>= prune_ratio * max``
            of the vector, ``0 < prune_ratio <= 1``.

    Attributes:
        name: (str) the model's absolute directory, or its hub id (what manifests record).
        tokenizer_name: (str) the tokenizer's name: the model's, since it is loaded from there.
        checksum: (str) sha256 over the model's weight files, sorted by name.
        vocab: (list[str]) column ``j`` of the vectors is token ``vocab[j]``.
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
    ):
        AutoModelForMaskedLM, AutoTokenizer = _transformers()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if prune_ratio is not None and not 0 < prune_ratio <= 1:
            raise ValueError(f"prune_ratio must be in (0, 1] or None, got {prune_ratio}")
        self.name = model_name(model)
        self.tokenizer_name = self.name
        directory = model_dir(model)
        self.checksum = checksum(weight_files(directory))
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.top_k = top_k
        self.prune_ratio = prune_ratio
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForMaskedLM.from_pretrained(directory).to(self.device).eval()
        self.vocab_size = self.model.config.vocab_size
        self.vocab = vocabulary(self.tokenizer, self.vocab_size)
        special = sorted(set(self.tokenizer.all_special_ids)) if zero_special_tokens else []
        self.special_ids = torch.tensor(special, dtype=torch.int64, device=self.device)
        log.info("SPLADE %s on %s, V=%d, max_length=%d", self.name, self.device, self.vocab_size, max_length)

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
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length) if texts else {}
        lengths = [len(ids) for ids in encoded.get("input_ids", [])]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first, stable
        n_batches = -(-len(texts) // self.batch_size)
        disable = (None if n_batches >= _PROGRESS_MIN_BATCHES else True) if progress is None else not progress
        empty = torch.zeros(0, dtype=torch.int64)
        rows, cols, values = [empty], [empty], [torch.zeros(0)]  # COO triples, rows in input order
        for b in tqdm(range(n_batches), disable=disable, desc="SPLADE", unit="batch"):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            features = [{key: column[i] for key, column in encoded.items()} for i in batch]
            weights = self._encode_batch(self.tokenizer.pad(features, return_tensors="pt"))  # (B, V)
            row, col = weights.nonzero(as_tuple=True)  # (nnz,) each
            rows.append(torch.tensor(batch)[row.cpu()])
            cols.append(col.cpu())
            values.append(weights[row, col].cpu())
        seconds = time.perf_counter() - start
        rate = len(texts) / max(seconds, 1e-9)
        log.info("SPLADE encoded %d texts in %.1f s (%.1f texts/s)", len(texts), seconds, rate)
        shape = (len(texts), self.vocab_size)
        return csr_from_coo(torch.cat(rows), torch.cat(cols), torch.cat(values), shape)  # (n, V)

    @torch.inference_mode()
    def _encode_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) pruned SPLADE weights of one padded batch, on the encoder's device."""
        batch = {key: value.to(self.device) for key, value in batch.items()}
        logits = self.model(**batch).logits  # (B, L, V)
        weights = splade_max_pool(logits, batch["attention_mask"])  # (B, V)
        weights[:, self.special_ids] = 0.0
        return prune_weights(weights, self.top_k, self.prune_ratio)
