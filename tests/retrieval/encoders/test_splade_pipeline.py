"""SpladeEncoder's encoding pipeline on the real splade-tiny model: tokenizing threads, length-sorted
batches, read-back order, autocast, and errors raised from the tokenizing threads.

Runs on the default device (CUDA where present: pinned batches, the side stream and the fused
head). Imports no Hydra or polars (the GPU machine has neither).
"""

from __future__ import annotations

import threading

import pytest
import torch

from retrieval.encoders import splade
from retrieval.encoders.splade import RustBatchTokenizer, SpladeEncoder, batch_tokenizer
from tests.retrieval.helpers import splade_tiny

TOL = {"rtol": 1e-4, "atol": 1e-4} if torch.cuda.is_available() else {"rtol": 1e-5, "atol": 1e-5}


WORDS = "insulin glucose tumour gene expression comet tail volcano magma wheat flour glacier ice".split()


def texts(n: int) -> list[str]:
    """``n`` texts of 0 to 40 words in a scrambled length order (so that sorting moves them)."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range((i * 7) % 41)) for i in range(n)]


TEXTS = texts(24)


@pytest.fixture(scope="module")
def encoder() -> SpladeEncoder:
    return SpladeEncoder(splade_tiny(), max_length=32, batch_size=4)


@pytest.fixture(scope="module")
def straight(encoder: SpladeEncoder) -> torch.Tensor:
    """(n, V) each text alone through the model: no batching, no padding, no sorting, no threads."""
    rows = []
    for text in TEXTS:
        inputs = encoder.sparse_model.tokenize([text], encoder.max_length)
        with torch.no_grad():
            rows.append(encoder.sparse_model(**{k: v.to(encoder.device) for k, v in inputs.items()})[0])
    return torch.stack(rows).cpu()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splade, "_SORT_CHUNK", 10)  # 24 texts: three chunks, so threads work ahead


def tokenizing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("splade-tokenize")]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_rows_in_input_order_equal_each_text_alone(
    encoder: SpladeEncoder, straight: torch.Tensor, workers: int
) -> None:
    encoder.tokenize_workers = workers
    got = encoder.encode(TEXTS).to_dense()
    assert got.shape == (len(TEXTS), 30522)
    assert (got[1:].count_nonzero(dim=1) > 0).all()  # text 0 is empty: only special tokens
    torch.testing.assert_close(got, straight, **TOL)
    assert not tokenizing_threads()


def test_threads_give_the_same_batches_bit_for_bit(encoder: SpladeEncoder) -> None:
    encoder.tokenize_workers = 0
    inline = encoder.encode(TEXTS).to_dense()
    encoder.tokenize_workers = 2
    ahead = encoder.encode(TEXTS).to_dense()
    assert torch.equal(inline, ahead)
    shuffled = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(0))
    again = encoder.encode([TEXTS[i] for i in shuffled.tolist()]).to_dense()
    torch.testing.assert_close(again, inline[shuffled], **TOL)


def test_length_sorted_batches_cut_the_padding(encoder: SpladeEncoder) -> None:
    widths = [inputs["input_ids"].shape[1] for _, inputs in encoder._batches(TEXTS)]
    positions = torch.cat([rows for rows, _ in encoder._batches(TEXTS)])
    assert sorted(positions.tolist()) == list(range(len(TEXTS)))  # every text once
    longest = max(len(encoder.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert longest > encoder.max_length
    assert max(widths) == encoder.max_length and min(widths) < longest // 2  # short batches stay short


def run_with_deadline(fn, seconds: float = 60.0) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised (None if none). Fails if it is still running."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 -- handed to the test
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "encode hung"
    return outcome[0]


@pytest.mark.parametrize("workers", [1, 3])
def test_tokenizer_error_in_a_thread_is_raised_without_hanging(
    encoder: SpladeEncoder, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    tokenize = encoder.tokenize
    calls = []

    def failing(batch: list[str]) -> dict[str, torch.Tensor]:
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("tokenizer broke on chunk 3")
        return tokenize(batch)

    monkeypatch.setattr(encoder, "tokenize", failing)
    encoder.tokenize_workers = workers
    err = run_with_deadline(lambda: encoder.encode(TEXTS))
    assert isinstance(err, RuntimeError) and "chunk 3" in str(err)
    assert not tokenizing_threads()


def test_model_error_stops_the_tokenizing_threads(
    encoder: SpladeEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(encoder, "_encode_batch", failing)
    encoder.tokenize_workers = 2
    err = run_with_deadline(lambda: encoder.encode(TEXTS))
    assert isinstance(err, RuntimeError) and "out of memory" in str(err)
    assert not tokenizing_threads()


def test_bfloat16_weights_stay_within_bfloat16_tolerance(encoder: SpladeEncoder) -> None:
    half = SpladeEncoder(splade_tiny(), max_length=32, batch_size=4, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and encoder.dtype is None
    assert half.model.get_output_embeddings().weight.dtype == torch.bfloat16
    encoder.tokenize_workers = 0
    full, low = encoder.encode(TEXTS[:8]).to_dense(), half.encode(TEXTS[:8]).to_dense()
    diff = (full - low).abs().max().item()
    assert 0 < diff < 0.25  # bfloat16 took effect, and stays within bfloat16 rounding of the logits


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="tokenize_workers must be >= 0"):
        SpladeEncoder(splade_tiny(), tokenize_workers=-1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        SpladeEncoder(splade_tiny(), dtype="int8")
    assert splade.reduced_dtype("float32") is None and splade.reduced_dtype(torch.float16) is torch.float16


MIXED = [
    *TEXTS,
    "",
    "[CLS] [MASK] hidden [SEP] tokens [PAD] and [UNK]",
    "Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u4e2d\u6587 \U0001f600 \u2603\ufdfd\ttab\nnewline  two  spaces",
    "p53-mediated apoptosis (IC50 = 3.2 \u00b5M) vs. controls, 95% CI [1.1-2.3]; " * 20,
]


@pytest.mark.parametrize("max_length", [2, 3, 17, 512])
def test_rust_batch_tokenizer_equals_the_model_tokenize(encoder: SpladeEncoder, max_length: int) -> None:
    fast = RustBatchTokenizer(encoder.tokenizer, max_length)
    got, expected = fast(MIXED), encoder.sparse_model.tokenize(MIXED, max_length)
    assert got.keys() == expected.keys() == {"input_ids", "attention_mask"}
    for key in got:
        assert got[key].dtype == expected[key].dtype == torch.int64
        assert torch.equal(got[key], expected[key]), key
    assert got["input_ids"].shape[1] == min(max_length, got["attention_mask"].sum(1).max())
    assert fast([])["input_ids"].shape == (0, 0)


def test_batch_tokenizer_is_rust_only_where_it_agrees(
    encoder: SpladeEncoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(encoder._tokenize, RustBatchTokenizer)
    original = RustBatchTokenizer.__call__

    def off_by_one(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = original(self, texts)
        out["input_ids"][:, 0] += 1
        return out

    monkeypatch.setattr(RustBatchTokenizer, "__call__", off_by_one)
    slow = batch_tokenizer(encoder.sparse_model, 32)
    assert not isinstance(slow, RustBatchTokenizer) and "disagrees" in caplog.text
    assert torch.equal(slow(MIXED)["input_ids"], encoder.sparse_model.tokenize(MIXED, 32)["input_ids"])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.compile is checked on a GPU (CPU needs a C++ toolchain)"
)
def test_compiled_encoder_gives_the_same_vectors() -> None:
    plain = SpladeEncoder(splade_tiny(), max_length=32, batch_size=4, dtype="bfloat16")
    compiled = SpladeEncoder(splade_tiny(), max_length=32, batch_size=4, dtype="bfloat16", compile=True)
    a, b = plain.encode(TEXTS[:8]).to_dense(), compiled.encode(TEXTS[:8]).to_dense()
    assert (a - b).abs().max().item() < 0.1  # bfloat16 rounding of differently fused kernels
    assert ((a > 0) == (b > 0)).float().mean().item() > 0.99
