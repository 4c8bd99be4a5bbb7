"""SpladeEncoder on the real splade-tiny model: the formula, batching, special tokens, pruning."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from retrieval.encoders import splade
from retrieval.encoders.splade import SpladeEncoder, prune_weights
from retrieval.models import SpladeEcho
from tests.retrieval.helpers import SPLADE_TINY, splade_tiny, tiny_llama

TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "cat",
    "The gene expression of p53 was measured in 40 tumour samples and compared to controls; "
    "patients with high expression had shorter survival and more frequent relapse.",
    "ALDH1 expression marks breast cancer stem cells",
    "a b c",
    "Statins reduce LDL cholesterol.",
    "\U0001f600 \u2603 \ufdfd",
    "",
]


@pytest.fixture(scope="module")
def encoder() -> SpladeEncoder:
    return SpladeEncoder(splade_tiny(), max_length=64, batch_size=3)


@pytest.fixture(scope="module")
def vectors(encoder: SpladeEncoder) -> torch.Tensor:
    return encoder.encode(TEXTS)


def reference_weights(encoder: SpladeEncoder, text: str, zero_special: bool = True) -> torch.Tensor:
    """(V,) SPLADE-max straight from the formula: max over positions of log(1 + relu(logits))."""
    batch = encoder.tokenizer([text], truncation=True, max_length=encoder.max_length, return_tensors="pt")
    with torch.no_grad():
        logits = encoder.model(**batch.to(encoder.device)).logits[0].cpu()  # (L, V), no padding
    weights = torch.log(1 + torch.relu(logits)).max(dim=0).values  # (V,)
    if zero_special:
        weights[encoder.tokenizer.all_special_ids] = 0
    return weights


def test_output_type_shape_and_range(encoder: SpladeEncoder, vectors: torch.Tensor) -> None:
    assert vectors.layout == torch.sparse_csr
    assert vectors.dtype == torch.float32
    assert vectors.shape == (len(TEXTS), encoder.model.config.vocab_size) == (len(TEXTS), 30522)
    assert (vectors.values() > 0).all()  # only non-zeros are stored
    nnz = vectors.crow_indices().diff()
    assert (nnz[:-1] > 0).all()


def test_weights_equal_direct_computation_from_logits(encoder: SpladeEncoder, vectors: torch.Tensor) -> None:
    for i in (0, 2):  # the pooled batch has padding for these texts (sorted with longer/shorter ones)
        expected = reference_weights(encoder, TEXTS[i])
        torch.testing.assert_close(vectors[i].to_dense(), expected, rtol=1e-5, atol=1e-5)


def test_length_sorted_batches_keep_input_order_and_match_batch_size_one(
    encoder: SpladeEncoder, vectors: torch.Tensor
) -> None:
    encoder.batch_size = 1
    try:
        one_by_one = encoder.encode(TEXTS)
    finally:
        encoder.batch_size = 3
    torch.testing.assert_close(vectors.to_dense(), one_by_one.to_dense(), rtol=1e-5, atol=1e-5)
    reversed_ = encoder.encode(TEXTS[::-1])
    torch.testing.assert_close(reversed_.to_dense().flip(0), vectors.to_dense(), rtol=1e-5, atol=1e-5)


def test_zero_special_tokens(encoder: SpladeEncoder, vectors: torch.Tensor) -> None:
    special = [encoder.vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")]
    assert sorted(special) == sorted(encoder.tokenizer.all_special_ids)
    assert (vectors.to_dense()[:, special] == 0).all()
    raw = SpladeEncoder(SPLADE_TINY, max_length=64, zero_special_tokens=False).encode(TEXTS).to_dense()
    assert raw[6, encoder.vocab.index("[UNK]")] > 0  # unknown characters: the model weights [UNK]
    raw[:, special] = 0
    torch.testing.assert_close(raw, vectors.to_dense(), rtol=1e-5, atol=1e-5)


def test_zero_special_tokens_when_the_model_favours_them() -> None:
    """Raise the output bias of every special token so that each gets weight, then zero them."""
    zeroed, raw = (
        SpladeEncoder(SPLADE_TINY, max_length=16),
        SpladeEncoder(SPLADE_TINY, max_length=16, zero_special_tokens=False),
    )
    special = zeroed.tokenizer.all_special_ids
    for enc in (zeroed, raw):
        with torch.no_grad():
            enc.model.get_output_embeddings().bias[special] += 50.0
    assert (raw.encode(TEXTS[:2]).to_dense()[:, special] > 0).all()
    assert (zeroed.encode(TEXTS[:2]).to_dense()[:, special] == 0).all()


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_top_k_keeps_the_k_largest(vectors: torch.Tensor, top_k: int) -> None:
    pruned = SpladeEncoder(SPLADE_TINY, max_length=64, top_k=top_k).encode(TEXTS).to_dense()
    full = vectors.to_dense()
    for row_full, row in zip(full, pruned, strict=True):
        n = min(top_k, int((row_full > 0).sum()))
        assert int((row > 0).sum()) == n
        kept = torch.sort(row_full, descending=True, stable=True).indices[:n]
        torch.testing.assert_close(row[kept], row_full[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_prune_ratio_keeps_weights_at_least_ratio_times_max(vectors: torch.Tensor, ratio: float) -> None:
    pruned = SpladeEncoder(SPLADE_TINY, max_length=64, prune_ratio=ratio).encode(TEXTS[:4]).to_dense()
    full = vectors.to_dense()[:4]
    expected = full * (full >= ratio * full.amax(dim=1, keepdim=True))
    assert torch.equal(pruned > 0, expected > 0)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


def test_prune_weights_ties_and_combination() -> None:
    w = torch.tensor([[0.0, 2.0, 1.0, 2.0, 0.5, 1.0], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    top2 = prune_weights(w, top_k=2)
    assert top2.tolist() == [[0.0, 2.0, 0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    top3 = prune_weights(w, top_k=3)  # tie at 1.0 across the cut: the lower id (2) wins
    assert top3[0].tolist() == [0.0, 2.0, 1.0, 2.0, 0.0, 0.0]
    half = prune_weights(w, prune_ratio=0.5)  # keep >= 1.0
    assert half[0].tolist() == [0.0, 2.0, 1.0, 2.0, 0.0, 1.0]
    both = prune_weights(w, top_k=4, prune_ratio=0.5)
    assert both[0].tolist() == [0.0, 2.0, 1.0, 2.0, 0.0, 1.0]
    assert prune_weights(w, top_k=1)[0].tolist() == [0.0, 2.0, 0.0, 0.0, 0.0, 0.0]


def test_attributes(encoder: SpladeEncoder) -> None:
    assert encoder.name == SPLADE_TINY.resolve().as_posix() == encoder.tokenizer_name
    digest = hashlib.sha256((SPLADE_TINY / "model.safetensors").read_bytes()).hexdigest()
    assert encoder.checksum == digest
    assert len(encoder.vocab) == 30522
    assert encoder.vocab[encoder.tokenizer.convert_tokens_to_ids("cancer")] == "cancer"
    assert encoder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_input_validation(encoder: SpladeEncoder) -> None:
    empty = encoder.encode([])
    assert empty.layout == torch.sparse_csr and empty.shape == (0, 30522)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        encoder.encode(["fine", 3])
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.encode("a single string")
    with pytest.raises(ValueError, match="prune_ratio"):
        SpladeEncoder(SPLADE_TINY, prune_ratio=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SpladeEncoder(SPLADE_TINY, top_k=0)


def test_chunked_pooling_and_sort_chunks_do_not_change_vectors(
    vectors: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = SpladeEncoder(SPLADE_TINY, max_length=64, batch_size=3, chunk_size=None)
    assert plain.sparse_model.chunk_size is None
    torch.testing.assert_close(plain.encode(TEXTS).to_dense(), vectors.to_dense(), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(splade, "_SORT_CHUNK", 3)  # tokenized, sorted and batched 3 texts at a time
    small = SpladeEncoder(SPLADE_TINY, max_length=64, batch_size=2, chunk_size=1000)
    torch.testing.assert_close(small.encode(TEXTS).to_dense(), vectors.to_dense(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        SpladeEncoder(SPLADE_TINY, chunk_size=0)


def test_echo_model_directory_indexes_like_its_module(tmp_path: Path) -> None:
    """A causal LM saved by SpladeEcho opens as an echo model: each row is the module's vector."""
    llama, tokenizer = tiny_llama()
    echo = SpladeEcho(llama, tokenizer).eval()
    echo.save_pretrained(tmp_path / "echo")
    encoder = SpladeEncoder(tmp_path / "echo", max_length=15, batch_size=3)
    assert isinstance(encoder.sparse_model, SpladeEcho)
    assert (
        encoder.checksum == hashlib.sha256((tmp_path / "echo" / "model.safetensors").read_bytes()).hexdigest()
    )
    vectors = encoder.encode(TEXTS).to_dense()
    assert vectors.shape == (len(TEXTS), len(tokenizer))
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            expected = echo(**echo.tokenize([text], max_length=15))[0]
            torch.testing.assert_close(vectors[i], expected, rtol=1e-5, atol=1e-5)
