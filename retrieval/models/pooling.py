r"""SPLADE max pooling over the vocabulary projection, chunked over the vocabulary.

SPLADE (Formal, Lassance, Piwowarski, Clinchant. *SPLADE v2*. 2021.
https://arxiv.org/abs/2109.10086) weights vocabulary term :math:`j` of a text by

.. math::
    w_j = \log\Bigl(1 + \mathrm{ReLU}\bigl(\max_{i \in P} h_i \cdot W_j + b_j\bigr)\Bigr)

where :math:`h_i` is the hidden state fed to the output-embedding layer at position :math:`i`,
:math:`W, b` that layer's weight and bias and :math:`P` the pooled positions (the non-padding
tokens for an MLM, the second copy of the text for an echo LM). Since
:math:`\log(1 + \mathrm{ReLU}(x))` is non-decreasing it commutes with the max.

The naive computation materialises the ``(B, L, V)`` logits, the largest tensor of the whole
model (32 texts x 256 tokens x 30522 terms = 1 GB in float32), and autograd keeps it for the
backward pass. :func:`splade_pool` instead loops over chunks of ``C`` vocabulary rows and keeps,
per (text, term), only the max and its position (``(B, V)`` each); the backward pass routes the
gradient of each term to its argmax position only (the max's sub-gradient), again chunk by
chunk. At most one ``(B, L, C)`` tensor is alive at a time, in either pass. On CUDA,
:func:`splade_pool` runs the fused Triton kernel of :mod:`retrieval.kernels.splade_head` instead,
which never holds more than a tile of logits; the chunked loop here is its pure-torch reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half-precision inputs are pooled in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on, else the promoted input dtype."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lo: int,
    hi: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, L, hi - lo) logits of vocabulary rows ``lo..hi-1``, in ``dtype``."""
    logits = hidden.to(dtype) @ weight[lo:hi].to(dtype).T  # (B, L, C); no copy when already in dtype
    if bias is not None:
        logits += bias[lo:hi].to(dtype)
    return logits


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    allow_empty: bool = False,
) -> None:
    """Shapes, and (unless ``allow_empty``) at least one pooled position per row; ValueError otherwise."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (V, {hidden.shape[2]}), got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    if pool_mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool_mask must be {tuple(hidden.shape[:2])} (B, L), got {tuple(pool_mask.shape)}")
    if allow_empty:
        return
    empty = (~pool_mask.bool().any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"rows {empty.tolist()[:10]} of pool_mask have no pooled position")


def _max_pool_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    chunk_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, term) max logit over the pooled positions and its position, chunk by chunk.

    Returns:
        (values, argmax): (B, V) in the accumulation dtype, and (B, V) int64 positions.
    """
    batch, vocab = hidden.shape[0], weight.shape[0]
    values = torch.empty(batch, vocab, dtype=_accumulation_dtype(hidden.dtype), device=hidden.device)
    argmax = torch.empty(batch, vocab, dtype=torch.int64, device=hidden.device)
    outside = ~pool_mask.bool().unsqueeze(-1)  # (B, L, 1)
    hidden = hidden.to(dtype)  # converted once, not per chunk
    for lo in range(0, vocab, chunk_size):
        hi = min(lo + chunk_size, vocab)
        logits = _chunk_logits(hidden, weight, bias, lo, hi, dtype).masked_fill_(outside, float("-inf"))
        chunk_max, chunk_arg = logits.max(dim=1)  # (B, C) each
        values[:, lo:hi] = chunk_max
        argmax[:, lo:hi] = chunk_arg
    return values, argmax


def _log_saturation(values: torch.Tensor) -> torch.Tensor:
    """:math:`\\log(1 + \\mathrm{ReLU}(x))` of the pooled max logits."""
    return values.relu().log1p()


def _saturation_grad(grad_out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, V) gradient of the pooled max logits ``values`` from that of :func:`_log_saturation`'s output.

    :math:`\\frac{d}{dx}\\log(1 + \\mathrm{ReLU}(x)) = 1 / (1 + x)` for :math:`x > 0`, else 0 (ReLU's
    sub-gradient at 0), in ``values``' dtype.
    """
    return grad_out.to(values.dtype) * (values > 0) / (1 + values.clamp(min=0))


class _ChunkedSpladePool(torch.autograd.Function):
    """Chunked SPLADE pooling with an argmax-routed, chunked backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, pool_mask, chunk_size):
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            values, argmax = _max_pool_chunked(hidden, weight, bias, pool_mask, chunk_size, dtype)
        ctx.save_for_backward(hidden, weight, argmax, values)
        ctx.has_bias, ctx.chunk_size, ctx.dtype = bias is not None, chunk_size, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _log_saturation(values)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, argmax, values = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        (batch, length, _), vocab = hidden.shape, weight.shape[0]
        acc = values.dtype
        grad_max = _saturation_grad(grad_out, values)  # (B, V)
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = (
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
        )
        flat_hidden = hidden.reshape(batch * length, -1).to(ctx.dtype)  # (B*L, H)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, vocab, ctx.chunk_size):
                hi = min(lo + ctx.chunk_size, vocab)
                # gradient of the chunk's logits: grad_max at the argmax position, 0 elsewhere
                routed = torch.zeros(
                    batch, length, hi - lo, dtype=ctx.dtype, device=hidden.device
                )  # (B, L, C)
                routed.scatter_(1, argmax[:, None, lo:hi], grad_max[:, None, lo:hi].to(ctx.dtype))
                if need_hidden:
                    grad_hidden += routed @ weight[lo:hi].to(ctx.dtype)  # (B, L, H)
                if need_weight:
                    grad_weight[lo:hi] = routed.reshape(batch * length, -1).T @ flat_hidden  # (C, H)
        grad_bias = grad_max.sum(dim=0).to(ctx.bias_dtype) if ctx.has_bias and need_bias else None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _splade_pool_naive(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool_mask: torch.Tensor
) -> torch.Tensor:
    """The plain computation through the full (B, L, V) logits (reference, and ``chunk_size=None``)."""
    logits = _chunk_logits(
        hidden, weight, bias, 0, weight.shape[0], _compute_dtype(hidden, weight)
    )  # (B, L, V)
    logits = logits.masked_fill(~pool_mask.bool().unsqueeze(-1), float("-inf"))
    return _log_saturation(logits.amax(dim=1).to(_accumulation_dtype(hidden.dtype)))  # (B, V)


def splade_pool(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    r"""SPLADE weights :math:`w_j = \log(1 + \mathrm{ReLU}(\max_{i \in P} h_i \cdot W_j + b_j))`.

    Differentiable with respect to ``hidden``, ``weight`` and ``bias``; with ``chunk_size`` set,
    no ``(B, L, V)`` tensor is created or saved for backward (see the module docstring), and
    CUDA inputs of a dtype the fused kernel takes go through
    :func:`~retrieval.kernels.splade_head.splade_head_triton` (``chunk_size`` is then unused). The
    logits are computed in the inputs' dtype (the autocast dtype under autocast), the max and
    everything after it in float32 (float64 for float64 inputs). Works under
    ``torch.inference_mode``.

    Args:
        hidden: (B, L, H) the hidden states fed to the vocabulary projection.
        weight: (V, H) the projection's weight (the output embeddings).
        bias: (V,) or None, its bias.
        pool_mask: (B, L) bool or 0/1, the positions :math:`P` pooled over; each row needs one.
        chunk_size: (int | None, default 4096) vocabulary rows per chunk; ``None`` for the plain
            computation through the full logits.

    Returns:
        (B, V) float32 (float64 for float64 ``hidden``), >= 0.

    Raises:
        ValueError: wrong shapes, ``chunk_size < 1``, or a row of ``pool_mask`` without a pooled position.
    """
    _check(hidden, weight, bias, pool_mask)
    if chunk_size is None:
        return _splade_pool_naive(hidden, weight, bias, pool_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if hidden.is_cuda:
        from retrieval.kernels.splade_head import fused_supported, splade_head_triton

        if fused_supported(hidden, weight):
            return splade_head_triton(hidden, weight, bias, pool_mask)
    return splade_pool_chunked(hidden, weight, bias, pool_mask, chunk_size)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will track an operation on ``tensors`` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def splade_pool_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """:func:`splade_pool`'s vocabulary-chunked torch path on any device, inputs unchecked.

    A row without a pooled position gets weights 0 and no gradient.

    Returns:
        (B, V) float32 (float64 for float64 ``hidden``), >= 0.
    """
    if needs_grad(hidden, weight, bias):
        return _ChunkedSpladePool.apply(hidden, weight, bias, pool_mask, chunk_size)
    values, _ = _max_pool_chunked(hidden, weight, bias, pool_mask, chunk_size, _compute_dtype(hidden, weight))
    return _log_saturation(values)


@contextmanager
def _bypassed(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block, submodule ``name`` of ``model`` is an identity."""
    layer = model.get_submodule(name)
    model.set_submodule(name, nn.Identity())
    try:
        yield
    finally:
        model.set_submodule(name, layer)


def output_embedding_name(model: nn.Module) -> str:
    """The submodule path of a Hugging Face model's output embeddings (its vocabulary projection).

    Raises:
        ValueError: the model has no output-embedding layer, or it is not a submodule.
    """
    decoder = model.get_output_embeddings()
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no output-embedding layer (get_output_embeddings())")
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ValueError(f"{type(model).__name__}: its output-embedding layer is not one of its submodules")


def output_embedding_inputs(model: nn.Module, name: str, **inputs: torch.Tensor) -> torch.Tensor:
    """The hidden states a Hugging Face LM feeds to its output embeddings, without computing logits.

    The model runs with submodule ``name`` (:func:`output_embedding_name`) replaced by an
    identity, so its ``logits`` output is the ``(B, L, H)`` input of that layer. Whatever the
    model does to the logits after that layer (e.g. soft-capping) is not applied.

    Args:
        model: a Hugging Face ``*ForMaskedLM`` or ``*ForCausalLM`` model.
        name: the path of its output-embedding layer.
        inputs: the model's keyword inputs (``input_ids``, ``attention_mask``).

    Returns:
        (B, L, H) hidden states.
    """
    with _bypassed(model, name):
        return model(**inputs).logits  # (B, L, H)
