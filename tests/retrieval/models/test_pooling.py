"""splade_pool: chunked values and gradients equal the naive (B, L, V) computation, without its memory."""

from __future__ import annotations

import pytest
import torch

from retrieval.models.pooling import splade_pool


def make_inputs(
    batch: int, length: int, hidden_size: int, vocab: int, seed: int, dtype=torch.float64, bias: bool = True
):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=dtype) / hidden_size**0.5
    b = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    mask = torch.rand(batch, length, generator=gen) < 0.6
    mask[:, 0] = True  # every row pools at least one position
    return hidden, weight, b, mask


def naive(hidden, weight, bias, mask) -> torch.Tensor:
    """The formula on the full (B, L, V) logits: masked max of log(1 + relu(logits))."""
    logits = hidden @ weight.T + (0 if bias is None else bias)  # (B, L, V)
    sat = torch.log(1 + torch.relu(logits))
    return sat.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, V)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 64, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_naive(chunk_size: int | None, seed: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    batch, length, hidden_size, vocab = (
        int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 5), (1, 9), (2, 12), (20, 80))
    )
    hidden, weight, b, mask = make_inputs(batch, length, hidden_size, vocab, seed, bias=bias)
    params = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    expected = naive(hidden, weight, b, mask)
    got = splade_pool(hidden, weight, b, mask, chunk_size=chunk_size)
    assert got.shape == (batch, vocab) and got.dtype == torch.float64
    assert (got >= 0).all() and (got > 0).any()
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(batch, vocab, dtype=torch.float64, generator=gen)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), params)
    grads_got = torch.autograd.grad((got * upstream).sum(), params)
    for g_got, g_exp in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(g_got, g_exp)
    assert any(g.abs().sum() > 0 for g in grads_got)


def test_masked_positions_get_no_gradient() -> None:
    hidden, weight, b, mask = make_inputs(3, 6, 4, 25, seed=5)
    hidden.requires_grad_()
    splade_pool(hidden, weight, b, mask, chunk_size=8).sum().backward()
    assert (hidden.grad[~mask] == 0).all()
    assert (hidden.grad[mask].abs().sum(-1) > 0).any()


def test_gradcheck_tiny() -> None:
    hidden, weight, b, mask = make_inputs(2, 3, 4, 11, seed=3)
    inputs = (hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda h, w, bb: splade_pool(h, w, bb, mask, chunk_size=4), inputs)


def saved_numels(fn) -> list[int]:
    """The element counts of every tensor autograd saves for backward while ``fn`` runs."""
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sizes


def test_chunked_saves_no_logits_tensor() -> None:
    batch, length, hidden_size, vocab = 3, 10, 8, 500
    hidden, weight, b, mask = make_inputs(batch, length, hidden_size, vocab, seed=7, dtype=torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    full = batch * length * vocab
    naive_sizes = saved_numels(lambda: splade_pool(hidden, weight, b, mask, chunk_size=None))
    chunked_sizes = saved_numels(lambda: splade_pool(hidden, weight, b, mask, chunk_size=64))
    assert max(naive_sizes) >= full
    assert chunked_sizes and max(chunked_sizes) < full
    assert max(chunked_sizes) == max(batch * vocab, vocab * hidden_size, batch * length * hidden_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hidden(dtype: torch.dtype) -> None:
    hidden, weight, b, mask = make_inputs(2, 5, 16, 40, seed=9, dtype=torch.float32)
    hidden, weight, b = hidden.to(dtype), weight.to(dtype), b.to(dtype)
    reference = naive(hidden.double(), weight.double(), b.double(), mask).float()
    chunked = splade_pool(hidden, weight, b, mask, chunk_size=16)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked, splade_pool(hidden, weight, b, mask, chunk_size=None))
    hidden.requires_grad_()
    splade_pool(hidden, weight, b, mask, chunk_size=16).sum().backward()
    assert hidden.grad.dtype == dtype and torch.isfinite(hidden.grad).all()


def test_mixed_dtypes_and_autocast() -> None:
    hidden, weight, b, mask = make_inputs(2, 5, 16, 40, seed=11, dtype=torch.float32)
    weight.requires_grad_()
    out = splade_pool(
        hidden.bfloat16().requires_grad_(), weight, b, mask, chunk_size=16
    )  # bf16 hidden, fp32 head
    torch.testing.assert_close(out, naive(hidden, weight, b, mask), rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = splade_pool(hidden, weight, b, mask, chunk_size=16)
    torch.testing.assert_close(auto, naive(hidden, weight, b, mask), rtol=2e-2, atol=2e-2)


def test_inference_mode() -> None:
    hidden, weight, b, mask = make_inputs(2, 5, 6, 30, seed=4, dtype=torch.float32)
    with torch.inference_mode():
        out = splade_pool(hidden, weight, b, mask, chunk_size=8)
    assert out.is_inference()
    torch.testing.assert_close(out, naive(hidden, weight, b, mask))


def test_bad_inputs() -> None:
    hidden, weight, b, mask = make_inputs(3, 4, 5, 9, seed=0)
    mask[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] of pool_mask have no pooled position"):
        splade_pool(hidden, weight, b, mask)
    mask[1] = True
    with pytest.raises(ValueError, match="chunk_size"):
        splade_pool(hidden, weight, b, mask, chunk_size=0)
    with pytest.raises(ValueError, match=r"weight must be \(V, 5\)"):
        splade_pool(hidden, weight[:, :4], b, mask)
    with pytest.raises(ValueError, match="bias"):
        splade_pool(hidden, weight, b[:3], mask)
    with pytest.raises(ValueError, match="pool_mask"):
        splade_pool(hidden, weight, b, mask[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    hidden, weight, b, mask = make_inputs(4, 12, 32, 300, seed=2, dtype=torch.float32)
    expected = naive(hidden, weight, b, mask)
    h, w = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
    out = splade_pool(h, w, b.cuda(), mask.cuda(), chunk_size=64)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    hc, wc = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    naive(hc, wc, b, mask).sum().backward()
    torch.testing.assert_close(h.grad.cpu(), hc.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.cpu(), wc.grad, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        half = splade_pool(hidden.cuda(), weight.cuda(), b.cuda(), mask.cuda(), chunk_size=64)
    torch.testing.assert_close(half.cpu(), expected, rtol=3e-2, atol=3e-2)
