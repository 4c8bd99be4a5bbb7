"""Fused SPLADE head: the torch reference against brute force, the Triton kernel against the reference.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``) at small sizes, in float32 and float16 (the interpreter's bfloat16 dot is
wrong, so bfloat16 is tested on CUDA only). The CUDA tests draw fresh inputs at realistic sizes.
This file imports no Hydra or polars (the GPU machine has neither).
"""

from __future__ import annotations

import pytest
import torch

from retrieval.kernels.splade_head import (
    max_logits_triton,
    splade_head,
    splade_head_reference,
    splade_head_triton,
)
from retrieval.models.pooling import output_embedding_inputs, output_embedding_name
from tests.retrieval.helpers import splade_tiny
from tests.retrieval.models.test_pooling import saved_numels

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the kernel's device: CUDA, else the interpreter on CPU tensors
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def make_inputs(
    batch: int,
    length: int,
    hidden_size: int,
    vocab: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
    device: str = "cpu",
    empty_rows: int = 0,
):
    """Random hidden states, a projection scaled to unit-variance logits, a mask; the last rows empty."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    mask = torch.rand(batch, length, generator=gen) < 0.6
    mask[:, 0] = True
    mask[batch - empty_rows :] = False
    tensors = (hidden, weight, b)
    hidden, weight, b = (None if t is None else t.to(device=device, dtype=dtype) for t in tensors)
    return hidden, weight, b, mask.to(device)


def brute_force(hidden, weight, bias, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formula on the full (B, L, V) logits: (weights, masked logits, max logits)."""
    logits = hidden @ weight.T + (0 if bias is None else bias)  # (B, L, V)
    logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    best = logits.amax(dim=1)  # (B, V)
    return torch.log1p(torch.relu(best)), logits, best


def grads(out: torch.Tensor, params: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * upstream.to(out.dtype)).sum(), params)


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """Fresh leaf copies requiring grad (None skipped)."""
    return [t.detach().clone().requires_grad_() for t in tensors if t is not None]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("empty_rows", [0, 1])
def test_reference_equals_brute_force(chunk_size: int, seed: int, bias: bool, empty_rows: int) -> None:
    hidden, weight, b, mask = make_inputs(4, 9, 6, 50, seed, bias=bias, empty_rows=empty_rows)
    params = leaves(hidden, weight, b)
    expected, _, _ = brute_force(*params[:2], params[2] if bias else None, mask)
    got = splade_head_reference(*params[:2], params[2] if bias else None, mask, chunk_size=chunk_size)
    assert got.shape == (4, 50) and got.dtype == torch.float64 and (got >= 0).all()
    torch.testing.assert_close(got, expected)
    assert (got[4 - empty_rows :] == 0).all()
    upstream = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    # brute force's gradient through amax splits ties evenly; random float64 inputs have none
    for g_got, g_exp in zip(grads(got, params, upstream), grads(expected, params, upstream), strict=True):
        torch.testing.assert_close(g_got, g_exp)
    assert params[0].grad is None  # torch.autograd.grad leaves .grad alone


@pytest.mark.parametrize("shape", [(1, 1, 16, 1), (3, 70, 20, 150), (2, 5, 33, 300)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("empty_rows", [0, 1])
def test_triton_max_and_argmax_equal_brute_force(shape: tuple, bias: bool, empty_rows: int) -> None:
    batch, length, hidden_size, vocab = shape
    empty_rows = min(empty_rows, batch - 1)
    hidden, weight, b, mask = make_inputs(*shape, seed=3, dtype=torch.float32, bias=bias, device=DEVICE)
    mask[batch - empty_rows :] = False
    values, argmax = max_logits_triton(hidden, weight, b, mask)
    _, logits, best = brute_force(hidden.double(), weight.double(), None if b is None else b.double(), mask)
    assert values.dtype == torch.float32 and argmax.dtype == torch.int32 and argmax.shape == (batch, vocab)
    full = slice(0, batch - empty_rows)
    torch.testing.assert_close(values[full].double(), best[full], rtol=1e-4, atol=1e-4)
    assert torch.isneginf(values[batch - empty_rows :]).all()
    # argmax up to ties: a pooled position whose logit is the max
    at = argmax[full].long()
    assert mask[full].gather(1, at).all()
    picked = logits[full].gather(1, at.unsqueeze(1)).squeeze(1)  # (B', V)
    torch.testing.assert_close(picked, best[full], rtol=1e-4, atol=1e-4)


def test_triton_ties_take_the_earliest_position() -> None:
    hidden, weight, b, mask = make_inputs(2, 80, 16, 40, seed=4, dtype=torch.float32, device=DEVICE)
    hidden[:, 3] *= 4  # position 3 is the max of many terms
    hidden[:, 70] = hidden[:, 3]  # positions 3 and 70 (another tile) tie on every term
    hidden[:, 5] = hidden[:, 3]  # and 5 (same tile)
    mask[:, [3, 5, 70]] = True
    mask[1, 3] = False  # row 1: the tie is 5 vs 70
    values, argmax = max_logits_triton(hidden, weight, b, mask)
    _, logits, best = brute_force(hidden, weight, b, mask)
    at3 = (logits[0, 3] == best[0]).nonzero().flatten()
    assert len(at3) > 5 and (argmax[0, at3] == 3).all()
    at5 = (logits[1, 5] == best[1]).nonzero().flatten()
    assert len(at5) > 5 and (argmax[1, at5] == 5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_values_and_gradients_equal_reference(dtype: torch.dtype, bias: bool) -> None:
    """Against the float32 reference on the same (rounded) inputs: a float16 product is exact in
    float32, where the kernel accumulates; its float16 gradients are rounded once at the end."""
    batch, length, hidden_size, vocab = 3, 70, 20, 150
    hidden, weight, b, mask = make_inputs(
        batch, length, hidden_size, vocab, seed=5, dtype=dtype, bias=bias, device=DEVICE, empty_rows=1
    )
    upstream = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    fused_params = leaves(hidden, weight, b)
    ref_params = leaves(*(None if t is None else t.float() for t in (hidden, weight, b)))
    got = splade_head_triton(*fused_params[:2], fused_params[2] if bias else None, mask)
    expected = splade_head_reference(*ref_params[:2], ref_params[2] if bias else None, mask)
    assert got.dtype == torch.float32 and (got[-1] == 0).all() and (got > 0).any()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    for g_got, g_exp, p in zip(
        grads(got, fused_params, upstream), grads(expected, ref_params, upstream), fused_params, strict=True
    ):
        assert g_got.dtype == p.dtype and g_got.shape == p.shape
        torch.testing.assert_close(g_got.float(), g_exp, **tol)


def test_triton_gradients_only_at_pooled_positions() -> None:
    hidden, weight, b, mask = make_inputs(2, 20, 16, 30, seed=7, dtype=torch.float32, device=DEVICE)
    params = leaves(hidden, weight, b)
    (g_hidden, g_weight, g_bias) = grads(
        splade_head_triton(*params, mask), params, torch.ones(2, 30, device=DEVICE)
    )
    assert (g_hidden[~mask] == 0).all() and (g_hidden[mask].abs().sum(-1) > 0).any()
    assert g_weight.abs().sum() > 0 and g_bias.abs().sum() > 0
    hidden64, weight64, b64, _ = make_inputs(2, 20, 16, 30, seed=7, device=DEVICE)
    expected = brute_force(hidden64, weight64, b64, mask)[0]
    torch.testing.assert_close(
        splade_head_triton(hidden, weight, b, mask).double(), expected, rtol=1e-4, atol=1e-4
    )


def test_triton_saves_no_logits_tensor() -> None:
    batch, length, hidden_size, vocab = 3, 10, 16, 500
    hidden, weight, b, mask = make_inputs(batch, length, hidden_size, vocab, seed=8, dtype=torch.float32)
    hidden, weight = hidden.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
    sizes = saved_numels(lambda: splade_head_triton(hidden, weight, b.to(DEVICE), mask.to(DEVICE)))
    assert sizes and max(sizes) == max(batch * vocab, vocab * hidden_size, batch * length * hidden_size)


def test_dispatch_on_cpu_is_the_reference() -> None:
    hidden, weight, b, mask = make_inputs(2, 6, 5, 40, seed=9)  # float64: no kernel takes it
    torch.testing.assert_close(
        splade_head(hidden, weight, b, mask), splade_head_reference(hidden, weight, b, mask)
    )
    assert splade_head(hidden.float(), weight.float(), b.float(), mask).dtype == torch.float32


def test_bad_inputs() -> None:
    hidden, weight, b, mask = make_inputs(3, 4, 16, 9, seed=0, dtype=torch.float32, device=DEVICE)
    for fn in (splade_head_triton, splade_head_reference, splade_head):
        with pytest.raises(ValueError, match=r"weight must be \(V, 16\)"):
            fn(hidden, weight[:, :4], b, mask)
        with pytest.raises(ValueError, match="bias"):
            fn(hidden, weight, b[:3], mask)
        with pytest.raises(ValueError, match="pool_mask must be"):
            fn(hidden, weight, b, mask[:, :2])
        with pytest.raises(ValueError, match="hidden must be a floating-point"):
            fn(hidden.int(), weight, b, mask)
        with pytest.raises(ValueError, match="pool_mask must be bool"):
            fn(hidden, weight, b, mask.float())
        with pytest.raises(ValueError, match="weight contains NaN"):
            fn(hidden, weight.clone().fill_(float("nan")), b, mask)
    with pytest.raises(ValueError, match="CUDA tensors of a dtype in"):
        splade_head_triton(hidden.double(), weight.double(), b.double(), mask)
    with pytest.raises(ValueError, match="chunk_size"):
        splade_head_reference(hidden, weight, b, mask, chunk_size=0)


@needs_cuda
@pytest.mark.parametrize(
    "shape", [(4, 37, 128, 30522), (64, 256, 128, 30522), (8, 64, 768, 5000), (3, 16, 4096, 1000)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_reference(shape: tuple, dtype: torch.dtype) -> None:
    """Against the float32 reference on the same (rounded) inputs: a bfloat16 product is exact in
    float32, so the kernel's float32-accumulated logits match it and the argmax positions agree."""
    batch = shape[0]
    hidden, weight, b, mask = make_inputs(*shape, seed=sum(shape), dtype=dtype, device="cuda", empty_rows=1)
    upstream = torch.randn(batch, shape[3], device="cuda")
    fused_params, ref_params = leaves(hidden, weight, b), leaves(hidden.float(), weight.float(), b.float())
    got = splade_head_triton(*fused_params, mask)
    expected = splade_head_reference(*ref_params, mask)
    assert (got[-1] == 0).all() and (got > 0).any()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if dtype == torch.bfloat16:  # the reference's own bfloat16 path rounds its logits to bfloat16
        torch.testing.assert_close(got, splade_head_reference(hidden, weight, b, mask), rtol=2e-2, atol=2e-2)
    for g_got, g_exp, p in zip(
        grads(got, fused_params, upstream), grads(expected, ref_params, upstream), fused_params, strict=True
    ):
        assert g_got.dtype == p.dtype
        err = (g_got.float() - g_exp).norm() / g_exp.norm()
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


@needs_cuda
def test_cuda_peak_memory_is_far_below_the_logits() -> None:
    batch, length, hidden_size, vocab = 128, 256, 128, 30522
    hidden, weight, b, mask = make_inputs(
        batch, length, hidden_size, vocab, seed=1, dtype=torch.bfloat16, device="cuda"
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        splade_head_triton(hidden, weight, b, mask)
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * batch * vocab * 4  # a few (B, V) tensors, not the (B, L, V) logits


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_splade_tiny_vectors_equal_reference(autocast: bool) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = splade_tiny()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForMaskedLM.from_pretrained(model_dir).cuda().eval()
    texts = ["Insulin lowers blood glucose.", "A comet's tail points away from the sun. " * 30, "x"]
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to("cuda")
    head = model.get_output_embeddings()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = output_embedding_inputs(model, output_embedding_name(model), **inputs)  # (B, L, H)
        got = splade_head(hidden, head.weight, head.bias, inputs["attention_mask"])
        expected = splade_head_reference(hidden, head.weight, head.bias, inputs["attention_mask"])
        plain = torch.log1p(torch.relu(model(**inputs).logits.float()))  # (B, L, V)
        plain = plain.masked_fill(inputs["attention_mask"][..., None] == 0, 0).amax(dim=1)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(got, plain, **tol)
    assert ((got > 0).sum(dim=1) > 0).all()  # every text, even "x", has terms


@pytest.mark.parametrize("shape", [(3, 70, 20, 150), (2, 9, 140, 60)])  # W resident, and H > RESIDENT_H
@pytest.mark.parametrize("bias", [True, False])
def test_values_without_argmax_equal_values_with_argmax(shape: tuple, bias: bool) -> None:
    """Without a gradient the kernel skips the argmax and adds the bias after the max: the same
    values up to float32 rounding (max_i fl(x_i + b) = fl(max_i x_i + b) when both paths round the
    dot alike), 0 on a row without a pooled position."""
    hidden, weight, b, mask = make_inputs(*shape, seed=11, dtype=torch.float32, bias=bias, device=DEVICE)
    mask[-1] = False
    values, _ = max_logits_triton(hidden, weight, b, mask)
    with torch.no_grad():
        got = splade_head_triton(hidden, weight, b, mask)
    torch.testing.assert_close(got, values.relu().log1p(), rtol=1e-6, atol=1e-6)
    assert (got[-1] == 0).all() and (got[0] > 0).any()
