"""Sparse vector utilities: FLOPS by hand, CSR helpers, and the resumable sharded encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retrieval.encoders.sparse import (
    check_texts,
    csr_from_coo,
    encode_in_shards,
    load_csr,
    save_csr,
    sparsity_stats,
    vstack_csr,
)
from retrieval.encoders.splade import SpladeEncoder
from retrieval.index.manifest import IndexFormatError
from tests.retrieval.helpers import splade_tiny

TEXTS = [
    f"query number {i} about {topic}" for i, topic in enumerate(["cells", "genes", "vitamin d", "cancer"] * 3)
]


def csr(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).to_sparse_csr()


@pytest.fixture(scope="module")
def encoder() -> SpladeEncoder:
    return SpladeEncoder(splade_tiny(), max_length=16, batch_size=4)


def test_sparsity_stats_by_hand() -> None:
    docs = csr([[1, 0, 2, 0], [0, 0, 3, 0], [4, 5, 6, 0]])  # p_d = (2/3, 1/3, 1, 0)
    queries = csr([[1, 1, 0, 0], [0, 0, 1, 1]])  # p_q = (1/2, 1/2, 1/2, 1/2)
    stats = sparsity_stats(docs, queries)
    assert stats["doc_nnz"] == pytest.approx(6 / 3)
    assert stats["query_nnz"] == pytest.approx(2.0)
    assert stats["flops"] == pytest.approx(0.5 * (2 / 3 + 1 / 3 + 1 + 0))
    assert stats["doc_flops"] == pytest.approx((2 / 3) ** 2 + (1 / 3) ** 2 + 1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        sparsity_stats(docs, csr([[1, 0]]))


def test_csr_helpers_round_trip(tmp_path: Path) -> None:
    a = csr_from_coo(torch.tensor([1, 0, 1]), torch.tensor([3, 2, 0]), torch.tensor([1.0, 2.0, 3.0]), (2, 5))
    assert a.to_dense().tolist() == [[0, 0, 2, 0, 0], [3, 0, 0, 1, 0]]
    b = csr([[0, 7, 0, 0, 0]])
    stacked = vstack_csr([a, b], 5)
    assert stacked.to_dense().tolist() == [[0, 0, 2, 0, 0], [3, 0, 0, 1, 0], [0, 7, 0, 0, 0]]
    assert vstack_csr([], 5).shape == (0, 5)
    save_csr(tmp_path / "m.pt", stacked)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["shape"] == [3, 5]
    assert torch.equal(load_csr(tmp_path / "m.pt").to_dense(), stacked.to_dense())


def test_check_texts() -> None:
    assert check_texts(("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        check_texts(["a", b"b"])
    with pytest.raises(TypeError, match="sequence of strings"):
        check_texts("ab")
    with pytest.raises(TypeError, match="sequence of strings"):
        check_texts(t for t in ["a"])


class Interrupted(RuntimeError):
    pass


def test_encode_in_shards_resumes_after_an_interruption(encoder: SpladeEncoder, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def failing_at_third(texts: list[str]) -> torch.Tensor:
        if len(calls) == 2:
            raise Interrupted("simulated crash in the 3rd shard")
        calls.append(texts)
        return encoder.encode(texts)

    work = tmp_path / "shards"
    with pytest.raises(Interrupted):
        encode_in_shards(failing_at_third, TEXTS, work, shard_size=3, progress=False)
    assert sorted(p.name for p in work.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]

    resumed_calls: list[list[str]] = []

    def counting(texts: list[str]) -> torch.Tensor:
        resumed_calls.append(texts)
        return encoder.encode(texts)

    resumed = encode_in_shards(counting, TEXTS, work, shard_size=3, progress=False)
    assert resumed_calls == [TEXTS[6:9], TEXTS[9:12]]  # only the shards not yet saved
    uninterrupted = encode_in_shards(encoder.encode, TEXTS, tmp_path / "fresh", shard_size=3, progress=False)
    assert resumed.layout == torch.sparse_csr and resumed.shape == (len(TEXTS), 30522)
    assert torch.equal(resumed.to_dense(), uninterrupted.to_dense())
    torch.testing.assert_close(resumed.to_dense(), encoder.encode(TEXTS).to_dense(), rtol=1e-5, atol=1e-5)

    again: list[list[str]] = []
    encode_in_shards(
        lambda t: again.append(t) or encoder.encode(t), TEXTS, work, shard_size=3, progress=False
    )
    assert again == []  # everything is on disk


def test_encode_in_shards_refuses_another_corpus(encoder: SpladeEncoder, tmp_path: Path) -> None:
    work = tmp_path / "shards"
    encode_in_shards(encoder.encode, TEXTS[:4], work, shard_size=2, progress=False)
    info = json.loads((work / "shards.json").read_text())
    assert info["num_texts"] == 4 and info["shard_size"] == 2
    for texts, size, key in [(TEXTS[1:5], 2, ""), (TEXTS[:4], 3, ""), (TEXTS[:4], 2, "another encoder")]:
        with pytest.raises(IndexFormatError, match="other texts"):
            encode_in_shards(encoder.encode, texts, work, shard_size=size, progress=False, key=key)


def test_encode_in_shards_empty(encoder: SpladeEncoder, tmp_path: Path) -> None:
    assert encode_in_shards(encoder.encode, [], tmp_path / "w", progress=False).shape == (0, 30522)
