"""SPLADE: sparse lexical representations from a masked language model's logits."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.encoders.sparse import check_texts, csr_from_coo
from retrieval.eval.topk import topk_with_id_ties
from retrieval.index.manifest import checksum
from retrieval.models import SpladeMLM, load_sparse_model

log = logging.getLogger(__name__)

_PROGRESS_MIN_BATCHES = 8  # progress=None shows a bar only for inputs of at least this many batches
_SORT_CHUNK = 10_000  # texts tokenized, sorted by length and batched together (bounds memory)
_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROBE_TEXTS = [  # checked against the model's tokenize before the Rust path is trusted
    "",
    "x",
    "Vitamin D deficiency; risk of fractures in older adults (n = 1,204).",
    "[CLS] [MASK] [SEP] [PAD] [UNK] <s> </s>",
    "Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u4e2d\u6587 \U0001f600 \u2603\ufdfd  tabs\tand\nnewlines",
    " ".join(f"word{i} co-operation" for i in range(400)),  # longer than any max_length
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or ``cuda`` when a GPU is present and ``cpu`` otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def reduced_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The half-precision dtype named by ``dtype`` (``"bfloat16"``, ``"float16"``, a torch dtype).

    None for float32.

    Raises:
        ValueError: any other value.
    """
    if dtype is None or dtype in (torch.float32, "float32"):
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, a torch dtype or None, got {dtype!r}")
    return _DTYPES[dtype]


def attention_without_plans(device: torch.device):
    """On CUDA, scaled-dot-product attention without cuDNN's kernel; elsewhere nothing.

    Length-sorted batches come in many widths, and cuDNN's attention builds an execution plan
    for every new shape: on the H200, SciFact (x4, bf16 weights) encoded at 5,371 docs/s on a
    first pass with it and 10,891 without it (the flash and memory-efficient kernels need no
    plans; ``benchmarks/RESULTS.md``, "SpladeEncoder end to end: attention kernels").
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends)


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


class RustBatchTokenizer:
    """:meth:`SpladeMLM.tokenize <retrieval.models.SpladeMLM.tokenize>` for a fast (Rust) tokenizer,
    without the Python overhead of the Hugging Face call.

    The Hugging Face call computes character offsets, then turns every text's ids into Python lists
    and nested lists into tensors, all but the first while holding the GIL (about 135 us per text
    on one core), which caps tokenization at a few thousand texts per second whatever the number of
    cores (3,400 SciFact documents/s on 16 cores, against 13,600 here, at max length 256). Here
    a private copy of the Rust tokenizer (truncation set once, no padding) encodes a batch with
    ``encode_batch_fast`` (no offsets; the texts spread over the cores in Rust), and the ids go
    into one numpy array, padded on the right: the same ``input_ids`` and ``attention_mask``.

    Args:
        tokenizer: a Hugging Face fast tokenizer (``tokenizer.is_fast``).
        max_length: (int) word-pieces per text, special tokens included.
    """

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # settings of our own
        backend.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side
        )
        backend.no_padding()
        backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, (B, L) int64 each, padded on the right to the longest."""
        ids = [encoding.ids for encoding in self._encode(texts)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (B,)
        width = int(lengths.max()) if len(ids) else 0
        mask = np.arange(width) < lengths[:, None]  # (B, L)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)  # (B, L)
        input_ids[mask] = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
        )
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        }


def batch_tokenizer(sparse_model, max_length: int) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """The fastest tokenizer that gives ``sparse_model.tokenize``'s output: ``texts -> dict``.

    A :class:`RustBatchTokenizer` for a :class:`~retrieval.models.SpladeMLM` with a fast tokenizer
    once it agrees with ``sparse_model.tokenize`` on probe texts (special tokens, accents, CJK,
    emoji, a text longer than ``max_length``); else ``sparse_model.tokenize`` itself.
    """
    fallback = functools.partial(sparse_model.tokenize, max_length=max_length)
    if not isinstance(sparse_model, SpladeMLM) or not getattr(sparse_model.tokenizer, "is_fast", False):
        return fallback
    fast = RustBatchTokenizer(sparse_model.tokenizer, max_length)
    got, expected = fast(_PROBE_TEXTS), fallback(_PROBE_TEXTS)
    if got.keys() != expected.keys() or not all(torch.equal(got[k], expected[k]) for k in got):
        log.warning(
            "the Rust batch tokenizer disagrees with %s.tokenize: not used", type(sparse_model).__name__
        )
        return fallback
    return fast


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

    Texts are tokenized (as by the model's ``tokenize``) in chunks of 10,000, sorted by token count
    within a chunk (longest first) and batched, so that a batch holds texts of similar length and
    little padding; rows come back in input order. End to end, encoding is a pipeline:

    * texts are tokenized by :func:`batch_tokenizer`: for a masked LM with a fast tokenizer, the
      Rust tokenizer's batch call straight into numpy (:class:`RustBatchTokenizer`), which spreads
      the texts over the cores without the GIL (``TOKENIZERS_PARALLELISM=false`` limits it to one);
    * ``tokenize_workers`` background threads tokenize the next chunks while the model encodes
      the current one;
    * on CUDA the batches are cut in pinned memory and copied without blocking;
    * on CUDA the next batch is queued on the device before the non-zeros of the current one are
      read back (on a side stream that waits for that batch only), so the GPU does not wait for
      the host between batches.

    The batches, and so the vectors, are the same whatever ``tokenize_workers`` is.

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
        dtype: (str | torch.dtype | None, default None) cast the model's weights to this dtype
            (``"bfloat16"`` or ``"float16"``) and run it in it: the encoder only encodes, so no
            float32 master copy is needed, and on the H200 the encoder (without its head) runs
            1.3-1.9x as fast as under ``torch.autocast`` (which re-casts every weight at every
            call). On CUDA the fused SPLADE head multiplies in this dtype with float32
            accumulation. ``None`` or ``"float32"``: float32. The vectors are float32 either way.
        compile: (bool, default False) ``torch.compile`` the model's transformer body
            (``model.base_model``): faster encoding once compiled (a one-off cost of tens of
            seconds, so for large corpora), same vectors up to floating-point rounding.
        tokenize_workers: (int | None, default None) threads that tokenize chunks ahead of the
            model; 0 tokenizes each chunk when the model needs it; ``None``: 1 on CUDA, 0 on CPU
            (where the model already keeps every core busy).

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
        dtype: str | torch.dtype | None = None,
        tokenize_workers: int | None = None,
        compile: bool = False,
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
        if tokenize_workers is not None and tokenize_workers < 0:
            raise ValueError(f"tokenize_workers must be >= 0 or None, got {tokenize_workers}")
        self.dtype = reduced_dtype(dtype)
        self.name = model_name(model)
        self.tokenizer_name = self.name
        directory = model_dir(model)
        self.checksum = checksum(weight_files(directory))
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = resolve_device(device)
        on_cuda = self.device.type == "cuda"
        self.tokenize_workers = int(on_cuda) if tokenize_workers is None else tokenize_workers
        self._copy_stream = torch.cuda.Stream(self.device) if on_cuda else None  # reads non-zeros back
        self.top_k = top_k
        self.prune_ratio = prune_ratio
        self.sparse_model = (
            load_sparse_model(directory, chunk_size, zero_special_tokens)
            .to(self.device, self.dtype or torch.float32)
            .eval()
        )
        if compile:
            self.sparse_model.model.base_model.compile()
        self.model = self.sparse_model.model
        self.tokenizer = self.sparse_model.tokenizer
        self.vocab_size = self.sparse_model.vocab_size
        self.vocab = vocabulary(self.tokenizer, self.vocab_size)
        self._tokenize = batch_tokenizer(self.sparse_model, max_length)
        special = self.sparse_model.special_ids if zero_special_tokens else []
        self.special_ids = torch.tensor(special, dtype=torch.int64, device=self.device)
        log.info(
            "SPLADE %s (%s) on %s, V=%d, max_length=%d, %s, %d tokenizing threads",
            self.name,
            self.sparse_model.kind,
            self.device,
            self.vocab_size,
            max_length,
            self.dtype or torch.float32,
            self.tokenize_workers,
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
            for row, col, value in self._nonzeros(texts):
                rows.append(row)
                cols.append(col)
                values.append(value)
                bar.update()
        seconds = time.perf_counter() - start
        rate = len(texts) / max(seconds, 1e-9)
        log.info("SPLADE encoded %d texts in %.1f s (%.1f texts/s)", len(texts), seconds, rate)
        shape = (len(texts), self.vocab_size)
        return csr_from_coo(torch.cat(rows), torch.cat(cols), torch.cat(values), shape)  # (n, V)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The padded model inputs of ``texts``: ``sparse_model.tokenize(texts, max_length)``, computed
        by :func:`batch_tokenizer`'s fastest path that gives the same tensors."""
        return self._tokenize(texts)

    def _nonzeros(self, texts: list[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield each batch's non-zeros ``(rows, cols, values)`` on the CPU, ``rows`` as input positions.

        A batch's weights are read back only once the next batch is queued on the device.
        """
        pending = None
        with closing(self._batches(texts)) as batches:
            for positions, inputs in batches:
                weights = self._encode_batch(inputs)  # (B, V), possibly still being computed
                done = None
                if self._copy_stream is not None:
                    done = torch.cuda.Event()
                    done.record()
                if pending is not None:
                    yield self._read_back(*pending)
                pending = positions, weights, done
        if pending is not None:
            yield self._read_back(*pending)

    def _read_back(
        self, positions: torch.Tensor, weights: torch.Tensor, done: torch.cuda.Event | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The non-zeros of (B, V) ``weights`` on the CPU; on CUDA read on the side stream after ``done``."""
        stream = self._copy_stream
        with nullcontext() if stream is None else torch.cuda.stream(stream):
            if stream is not None:
                stream.wait_event(done)  # this batch only: the next one keeps the device busy
            row, col = weights.nonzero(as_tuple=True)  # (nnz,) each; waits for `done` only
            return positions[row.cpu()], col.cpu(), weights[row, col].cpu()

    def _batches(self, texts: list[str]) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield ``(positions, inputs)``: (B,) input positions and the padded batch, chunk by chunk.

        With ``tokenize_workers`` threads, the next chunks are tokenized while the caller works
        on the current one; an error in a thread is raised here, and closing the generator
        cancels the chunks not started (the running ones finish first).
        """
        starts = range(0, len(texts), _SORT_CHUNK)
        if self.tokenize_workers == 0:
            for lo in starts:
                yield from self._chunk_batches(texts, lo)
            return
        if self.tokenize_workers > 1 and texts:
            self.tokenize(texts[:1])  # settle a Hugging Face tokenizer's settings before threads share it
        with ThreadPoolExecutor(self.tokenize_workers, thread_name_prefix="splade-tokenize") as pool:
            ahead = deque()
            try:
                for lo in starts:
                    ahead.append(pool.submit(self._chunk_batches, texts, lo))
                    if len(ahead) > self.tokenize_workers:
                        yield from ahead.popleft().result()
                while ahead:
                    yield from ahead.popleft().result()
            finally:
                for future in ahead:
                    future.cancel()

    def _chunk_batches(self, texts: list[str], lo: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The batches of texts ``lo .. lo + _SORT_CHUNK - 1``, longest texts first.

        The chunk is tokenized at once (padded on the right), sorted by length (stably) and cut
        into batches, each cut to its longest text; on CUDA the batches are in pinned memory.
        """
        encoded = self.tokenize(texts[lo : lo + _SORT_CHUNK])
        lengths = encoded["attention_mask"].sum(dim=1)  # (n,)
        order = torch.sort(lengths, descending=True, stable=True).indices  # longest first
        batches = []
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]  # (B,)
            width = int(lengths[batch].max())
            inputs = {key: value[batch, :width] for key, value in encoded.items()}  # (B, width) each
            if self._copy_stream is not None:
                inputs = {key: value.pin_memory() for key, value in inputs.items()}
            batches.append((batch + lo, inputs))
        return batches

    @torch.inference_mode()
    def _encode_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) pruned SPLADE weights of one padded batch, on the encoder's device."""
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        with attention_without_plans(self.device):
            weights = self.sparse_model(**batch).float()  # (B, V), special tokens already zeroed
        return prune_weights(weights, self.top_k, self.prune_ratio)
