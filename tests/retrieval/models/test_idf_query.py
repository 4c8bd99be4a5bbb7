"""IdfQueryEncoder: the same vectors as InferenceFreeQueryEncoder.encode, a trainable table, idf.json I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from retrieval.encoders.inference_free import InferenceFreeQueryEncoder
from retrieval.models.idf_query import IdfQueryEncoder
from tests.retrieval.helpers import SPLADE_TINY, splade_tiny

CORPUS = [
    "the cat sat",
    "the dog barked at the cat",
    "a cat and a cat",
    "dogs bark",
    "zebras graze on plains",
]
QUERIES = [
    "cat cat dog",
    "the zebra",
    "",
    "unbelievably long query words " * 60,
    "[SEP] cat [MASK]",
    "\u2603",
]


@pytest.fixture(scope="module")
def reference() -> InferenceFreeQueryEncoder:
    return InferenceFreeQueryEncoder.fit(splade_tiny(), CORPUS)


def encode(module: IdfQueryEncoder, texts: list[str]) -> torch.Tensor:
    return module(**module.tokenize(texts))


@pytest.mark.parametrize("trainable", [False, True])
def test_same_vectors_as_inference_free_encoder(
    reference: InferenceFreeQueryEncoder, trainable: bool
) -> None:
    module = IdfQueryEncoder.fit(SPLADE_TINY, CORPUS, trainable=trainable)
    assert torch.equal(module.idf.detach(), reference.idf)
    vectors = encode(module, QUERIES)
    assert vectors.shape == (len(QUERIES), len(reference.vocab))
    assert module.tokenize(QUERIES)["input_ids"].shape[1] > 300  # long queries are not truncated
    expected = reference.encode(QUERIES).to_dense()
    assert torch.equal(vectors.detach(), expected)
    cat = reference.vocab.index("cat")
    assert vectors[0, cat] == reference.idf[cat] > 0  # a repeated piece counts once
    assert vectors[4, module.tokenizer.all_special_ids].eq(0).all() and vectors[4, cat] > 0


def test_from_file_and_save_round_trip(reference: InferenceFreeQueryEncoder, tmp_path: Path) -> None:
    path = reference.save(tmp_path / "idf.json")
    module = IdfQueryEncoder.from_file(SPLADE_TINY, path, trainable=True)
    assert torch.equal(module.idf.detach(), reference.idf)
    assert (module.num_docs, module.doc_max_length) == (len(CORPUS), 256)
    with torch.no_grad():
        module.idf[reference.vocab.index("cat")] = 7.5
        module.idf[reference.vocab.index("dog")] = -1.0  # saved clamped
    saved = module.save(tmp_path / "trained")
    assert saved == tmp_path / "trained" / "idf.json"
    back = InferenceFreeQueryEncoder.load(SPLADE_TINY, saved)
    assert back.idf[reference.vocab.index("cat")] == 7.5 and back.idf[reference.vocab.index("dog")] == 0
    assert back.num_docs == len(CORPUS)
    again = IdfQueryEncoder.from_file(SPLADE_TINY, saved)
    assert torch.equal(encode(again, QUERIES), back.encode(QUERIES).to_dense())


def test_gradient_reaches_idf_only_when_trainable() -> None:
    idf = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    ids = torch.tensor([[1, 2, 2, 3, 0], [4, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    trainable = IdfQueryEncoder(idf, special_ids=[0, 3], trainable=True)
    assert isinstance(trainable.idf, torch.nn.Parameter)
    out = trainable(ids, mask)
    assert out.tolist() == [[0.0, 1.0, 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 4.0, 0.0]]
    (out * torch.arange(1.0, 7.0)).sum().backward()
    assert trainable.idf.grad.tolist() == [0.0, 2.0, 3.0, 0.0, 5.0, 0.0]  # each present piece once
    with torch.no_grad():
        trainable.idf[1] = -3.0
    assert trainable(ids, mask)[0, 1] == 0  # clamped to >= 0
    frozen = IdfQueryEncoder(idf, special_ids=[0, 3])
    assert not frozen.idf.requires_grad and "idf" in dict(frozen.named_buffers())
    assert not frozen(ids, mask).requires_grad and not list(frozen.parameters())


def test_wrong_tokenizer_is_a_clear_error(reference: InferenceFreeQueryEncoder, tmp_path: Path) -> None:
    path = reference.save(tmp_path / "idf.json")
    other = AutoTokenizer.from_pretrained(SPLADE_TINY)
    other.add_tokens(["sparrowword"])
    other.save_pretrained(tmp_path / "other-tokenizer")
    with pytest.raises(ValueError, match="not this tokenizer's vocabulary"):
        IdfQueryEncoder.from_file(tmp_path / "other-tokenizer", path)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        IdfQueryEncoder(torch.tensor([1.0, -1.0]), special_ids=[])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IdfQueryEncoder(torch.ones(3), special_ids=[3])
    module = IdfQueryEncoder(torch.ones(3), special_ids=[0])
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 3\)"):
        module(torch.tensor([[1, 3]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="must be \\(B, L\\)"):
        module(torch.tensor([[1, 2]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="from_file or fit"):
        module.save("unused")
