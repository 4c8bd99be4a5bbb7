"""InferenceFreeQueryEncoder: IDF by hand on a toy corpus, query vectors, idf.json round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from retrieval.encoders.inference_free import InferenceFreeQueryEncoder
from tests.retrieval.helpers import SPLADE_TINY, splade_tiny

# every word below is a single word-piece of the BERT-uncased vocabulary
CORPUS = ["the cat sat", "the dog barked at the cat", "a cat and a cat", "dogs bark"]


@pytest.fixture(scope="module")
def encoder() -> InferenceFreeQueryEncoder:
    return InferenceFreeQueryEncoder.fit(splade_tiny(), CORPUS)


def idf(df: int, n: int = len(CORPUS)) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def token_id(encoder: InferenceFreeQueryEncoder, token: str) -> int:
    return encoder.vocab.index(token)


@pytest.mark.parametrize(
    ("token", "df"), [("the", 2), ("cat", 3), ("dog", 1), ("dogs", 1), ("a", 1), ("sat", 1), ("zebra", 0)]
)
def test_idf_matches_hand_computation(encoder: InferenceFreeQueryEncoder, token: str, df: int) -> None:
    assert encoder.idf[token_id(encoder, token)].item() == pytest.approx(idf(df), rel=1e-6)


def test_fit_counts_only_the_first_max_length_pieces() -> None:
    corpus = ["cat " * 10 + "zebra", "dog"]
    full = InferenceFreeQueryEncoder.fit(SPLADE_TINY, corpus, max_length=None)
    cut = InferenceFreeQueryEncoder.fit(SPLADE_TINY, corpus, max_length=8)  # [CLS] + 6 x cat + [SEP]
    zebra = token_id(full, "zebra")
    assert full.idf[zebra].item() == pytest.approx(idf(1, 2), rel=1e-6)
    assert cut.idf[zebra].item() == pytest.approx(idf(0, 2), rel=1e-6)


def test_query_weights_are_each_distinct_piece_idf_once(encoder: InferenceFreeQueryEncoder) -> None:
    vectors = encoder.encode(["cat cat the [SEP] zebra", "", "dog"])
    assert vectors.layout == torch.sparse_csr and vectors.dtype == torch.float32
    assert vectors.shape == (3, len(encoder.vocab)) == (3, 30522)
    dense = vectors.to_dense()
    expected = {token_id(encoder, t): idf(df) for t, df in (("cat", 3), ("the", 2), ("zebra", 0))}
    assert set(dense[0].nonzero().flatten().tolist()) == set(expected)  # [SEP] and [CLS] dropped
    for j, value in expected.items():
        assert dense[0, j].item() == pytest.approx(value, rel=1e-6)  # once, not twice for "cat cat"
    assert dense[1].count_nonzero() == 0
    assert dense[2].nonzero().flatten().tolist() == [token_id(encoder, "dog")]


def test_save_load_round_trip(encoder: InferenceFreeQueryEncoder, tmp_path: Path) -> None:
    path = encoder.save(tmp_path / "idf.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idf.json"]  # no temp file left
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "sparrow-idf-1" and data["num_docs"] == len(CORPUS)
    assert data["idf"]["cat"] == pytest.approx(idf(3), rel=1e-6)
    loaded = InferenceFreeQueryEncoder.load(SPLADE_TINY, path)
    assert torch.equal(loaded.idf, encoder.idf)
    assert loaded.checksum == encoder.checksum
    assert loaded.name == encoder.name == "idf:" + SPLADE_TINY.resolve().as_posix()


def test_load_refuses_other_files(encoder: InferenceFreeQueryEncoder, tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"cat": 1.0}))
    with pytest.raises(ValueError, match="not a Sparrow IDF table"):
        InferenceFreeQueryEncoder.load(SPLADE_TINY, bad)
    data = json.loads(encoder.save(tmp_path / "idf.json").read_text())
    data["idf"] = dict(list(data["idf"].items())[:100])
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not this tokenizer's vocabulary"):
        InferenceFreeQueryEncoder.load(SPLADE_TINY, bad)


def test_checksum_depends_on_values(encoder: InferenceFreeQueryEncoder) -> None:
    other = InferenceFreeQueryEncoder(SPLADE_TINY, encoder.idf * 2)
    assert other.checksum != encoder.checksum and len(other.checksum) == 64


def test_input_validation(encoder: InferenceFreeQueryEncoder) -> None:
    assert encoder.encode([]).shape == (0, 30522)
    with pytest.raises(TypeError, match=r"texts\[2\] is NoneType"):
        encoder.encode(["a", "b", None])
    with pytest.raises(ValueError, match="empty corpus"):
        InferenceFreeQueryEncoder.fit(SPLADE_TINY, [])
    with pytest.raises(ValueError, match="shape"):
        InferenceFreeQueryEncoder(SPLADE_TINY, torch.ones(10))
