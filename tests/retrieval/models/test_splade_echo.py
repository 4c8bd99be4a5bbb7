"""SpladeEcho on tiny random Llama/Mistral models: echo inputs, second-copy pooling, training, saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from retrieval.models import load_sparse_model
from retrieval.models.splade_echo import SpladeEcho
from tests.retrieval.helpers import SPLADE_TINY, splade_tiny

TEXTS = ["the cat sat on the mat and looked at the dog", "cat", "", "breast cancer stem cells"]
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM saved with splade-tiny's BERT tokenizer (which has no bos/eos)."""
    tokenizer = AutoTokenizer.from_pretrained(splade_tiny())
    torch.manual_seed(0)
    if request.param == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **SIZES))
    else:
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **SIZES))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def echo(model_dir: Path) -> SpladeEcho:
    model = load_sparse_model(model_dir, chunk_size=5000)
    assert isinstance(model, SpladeEcho)
    return model.eval()


def naive(echo: SpladeEcho, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, V) from the full LM logits: max over the pool mask of log(1 + relu), specials zeroed."""
    with torch.no_grad():
        logits = echo.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.masked_fill(~batch["pool_mask"].unsqueeze(-1), float("-inf"))  # (B, L, V)
    weights = torch.log1p(torch.relu(logits.amax(dim=1)))  # (B, V)
    weights[:, echo.tokenizer.all_special_ids] = 0
    return weights


def test_tokenize_repeats_the_text_and_pools_the_second_copy(echo: SpladeEcho) -> None:
    max_length = 9  # each copy at most 4 pieces
    batch = echo.tokenize(TEXTS, max_length=max_length)
    assert set(batch) == {"input_ids", "attention_mask", "pool_mask"}
    ids, attention, pool = batch["input_ids"], batch["attention_mask"], batch["pool_mask"]
    assert ids.shape == attention.shape == pool.shape == (len(TEXTS), max_length)
    assert pool.dtype == torch.bool
    start = echo.tokenizer.cls_token_id  # the BERT tokenizer has no bos: [CLS] opens the input
    for row, text in enumerate(TEXTS):
        pieces = echo.tokenizer(text, add_special_tokens=False)["input_ids"][:4]
        n = len(pieces)
        assert ids[row, : 1 + 2 * n].tolist() == [start, *pieces, *pieces]
        assert attention[row].tolist() == [1] * (1 + 2 * n) + [0] * (max_length - 1 - 2 * n)  # right padding
        assert (ids[row, 1 + 2 * n :] == echo.tokenizer.pad_token_id).all()
        expected_pool = [False] * (1 + n) + [True] * n + [False] * (max_length - 1 - 2 * n)
        assert pool[row].tolist() == (expected_pool if n else [True] + [False] * (max_length - 1))
    assert echo.tokenize(["a b"], max_length=100)["input_ids"].shape == (1, 5)  # padded to the longest
    with pytest.raises(ValueError, match="max_length"):
        echo.tokenize(TEXTS, max_length=2)


@pytest.mark.parametrize("chunk_size", [None, 777, 5000])
def test_forward_equals_naive(echo: SpladeEcho, chunk_size: int | None) -> None:
    batch = echo.tokenize(TEXTS, max_length=21)
    echo.chunk_size = chunk_size
    try:
        with torch.no_grad():
            weights = echo(**batch)
    finally:
        echo.chunk_size = 5000
    assert weights.shape == (len(TEXTS), len(echo.tokenizer)) == (len(TEXTS), echo.vocab_size)
    assert (weights >= 0).all() and ((weights > 0).sum(dim=1) > 0).all()
    assert (weights[:, echo.special_ids] == 0).all()
    torch.testing.assert_close(weights, naive(echo, batch), rtol=1e-5, atol=1e-5)


def test_first_copy_does_not_count(echo: SpladeEcho) -> None:
    """Pooling only the second copy differs from pooling the whole input."""
    batch = echo.tokenize(TEXTS[:1], max_length=21)
    everything = dict(batch, pool_mask=batch["attention_mask"].bool())
    with torch.no_grad():
        second, whole = echo(**batch), echo(**everything)
    assert (whole >= second).all() and (whole > second).any()


def test_gradients_flow(echo: SpladeEcho) -> None:
    batch = echo.tokenize(TEXTS, max_length=15)
    echo.zero_grad()
    echo(**batch).sum().backward()
    head = echo.model.get_output_embeddings().weight
    first_layer = echo.model.model.layers[0].self_attn.q_proj.weight
    assert head.grad.abs().sum() > 0 and first_layer.grad.abs().sum() > 0
    assert echo.model.get_input_embeddings().weight.grad.abs().sum() > 0
    echo.zero_grad()


def test_save_and_load_round_trip(echo: SpladeEcho, tmp_path: Path) -> None:
    out = tmp_path / "echo"
    echo.save_pretrained(out)
    assert json.loads((out / "sparrow.json").read_text())["kind"] == "splade_echo"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in echo.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = load_sparse_model(out)
    assert isinstance(again, SpladeEcho)
    batch = echo.tokenize(TEXTS, max_length=15)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch), echo(**batch))


def test_tokenizer_without_pad_token_pads_with_eos(echo: SpladeEcho) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SPLADE_TINY)
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    model = SpladeEcho(echo.model, tokenizer)
    assert model.pad_id == tokenizer.sep_token_id == tokenizer.pad_token_id
    batch = model.tokenize(["a b c", "a"], max_length=9)
    assert batch["input_ids"][1, -1] == tokenizer.sep_token_id
