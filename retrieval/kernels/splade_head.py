r"""Fused SPLADE head: vocabulary projection, :math:`\log(1 + \mathrm{ReLU})` and masked max in one kernel.

SPLADE (Formal, Lassance, Piwowarski, Clinchant. *SPLADE v2*. 2021.
https://arxiv.org/abs/2109.10086) weights vocabulary term :math:`j` of a text by

.. math::
    w_j = \log\Bigl(1 + \mathrm{ReLU}\bigl(\max_{i \in P} h_i \cdot W_j + b_j\bigr)\Bigr)

(the saturation is non-decreasing, so it commutes with the max). Computed plainly, the
``(B, L, V)`` logits are the largest tensor of the whole encoder. Following Sparton (2026), the
kernel here tiles the vocabulary: one program per (text, block of ``BLOCK_V`` terms) walks the
text's pooled positions in blocks of ``BLOCK_L``, computes the ``(BLOCK_L, BLOCK_V)`` logits tile
with a tensor-core dot over the hidden size (in blocks of ``BLOCK_H``, float32 accumulation),
masks the positions outside :math:`P` with :math:`-\infty` and keeps a running max per element of
the tile (and, when the pass will be differentiated, the argmax), reduced over the positions once
at the end. Only ``(B, V)`` values (and int32 positions) reach memory; positions before a row's
first and after its last pooled position are never loaded (the padding of a right-padded batch).
For a small hidden size (``RESIDENT_H``) the program's tile of W is loaded once.

The backward pass keeps the argmax (the max's sub-gradient routes term :math:`j`'s gradient
:math:`g_{bj}` to position :math:`a_{bj}` only) and needs no ``(B, L, V)`` tensor either:

.. math::
    \frac{\partial}{\partial h_{bl}} = \sum_{j : a_{bj} = l} g_{bj} W_j, \qquad
    \frac{\partial}{\partial W_j} = \sum_b g_{bj} h_{b a_{bj}}, \qquad
    \frac{\partial}{\partial b_j} = \sum_b g_{bj}.

The first is a tiled dot of the routed gradient (built in registers from the argmax, one
``(BLOCK_L, BLOCK_V)`` tile at a time) with :math:`W`; the second gathers the argmax rows of the
hidden states per term block; the third is a column sum in torch.

The pure-torch reference is :func:`~retrieval.models.pooling.splade_pool`'s vocabulary-chunked
loop (:func:`splade_head_reference`); :func:`splade_head` runs the kernel on CUDA and the
reference elsewhere. Triton is imported here, so import this module only where a kernel may run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from retrieval.models.pooling import (
    _check,
    _compute_dtype,
    _log_saturation,
    _saturation_grad,
    needs_grad,
    splade_pool_chunked,
)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # matmul dtypes the kernels take


@dataclass(frozen=True)
class ForwardTile:
    """Launch configuration of the forward kernel.

    Args:
        block_l: (int) positions per tile.
        block_v: (int) vocabulary terms per program.
        num_warps: (int) warps per program.
        num_stages: (int) software-pipelining stages of the loads.
    """

    block_l: int
    block_v: int
    num_warps: int
    num_stages: int


# Swept on the H200 (B=512, L<=256, H=128, V=30522, bf16; 2026-11-29): values only, (64, 128, 4, 3)
# 2.56 ms (356 TFLOP/s) against 2.72 ms for 8 warps, 2.83 ms for 2 stages, 3.05 ms for (64, 64) or
# (32, 128) tiles, 4.47 ms for 128 positions; with the argmax, 4.16 ms against 5.20 ms for 8 warps.
INFERENCE_TILE = ForwardTile(64, 128, 4, 3)  # values only (encoding)
TRAINING_TILE = ForwardTile(64, 128, 4, 3)  # values and argmax (a pass that will be differentiated)
RESIDENT_H = 128  # hidden sizes up to this load the W tile once per program (2x faster at H = 128)
GRAD_BLOCK_L, GRAD_BLOCK_V = 64, 64  # grad_hidden tile: positions x terms (summed over)
GATHER_BLOCK_V = 64  # grad_weight: terms per program


@triton.jit
def _max_logits_kernel(
    hidden_ptr,  # (B, L, H) compute dtype
    weight_ptr,  # (V, H) compute dtype
    bias_ptr,  # (V,) or a dummy when HAS_BIAS is False
    mask_ptr,  # (B, L) uint8
    lo_ptr,  # (B,) int32 first pooled position
    hi_ptr,  # (B,) int32 last pooled position + 1
    values_ptr,  # (B, V) float32 out
    argmax_ptr,  # (B, V) int32 out, or a dummy when ARGMAX is False
    V,
    H,
    stride_hb,
    stride_hl,
    stride_wv,
    stride_mb,
    HAS_BIAS: tl.constexpr,
    ARGMAX: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (term block, text): running max (and argmax) over the text's pooled positions.

    The running max is kept per element of the ``(BLOCK_L, BLOCK_V)`` tile (no reduction across
    threads inside the loop) and reduced over positions once at the end. With ``W_RESIDENT``
    (``H <= BLOCK_H``) the tile of W is loaded once, before the loop over positions.
    """
    pid_v = tl.program_id(0)  # fastest: the programs of one text run together and share its hidden rows
    b = tl.program_id(1).to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = offs_v < V
    arange_l = tl.arange(0, BLOCK_L)
    arange_h = tl.arange(0, BLOCK_H)
    lo = tl.load(lo_ptr + b)
    hi = tl.load(hi_ptr + b)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_v, mask=in_v, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    if W_RESIDENT:
        w_all = tl.load(
            weight_ptr + offs_v[None, :] * stride_wv + arange_h[:, None],
            mask=in_v[None, :] & (arange_h[:, None] < H),
            other=0.0,
        )  # (BLOCK_H, BLOCK_V): the whole tile of W transposed
    best = tl.full((BLOCK_L, BLOCK_V), float("-inf"), dtype=tl.float32)
    best_at = tl.zeros((BLOCK_L, BLOCK_V), dtype=tl.int32)
    for l0 in range(lo, hi, BLOCK_L):
        offs_l = l0 + arange_l
        in_l = offs_l < hi
        if W_RESIDENT:
            x = tl.load(
                hidden_ptr + b * stride_hb + offs_l[:, None] * stride_hl + arange_h[None, :],
                mask=in_l[:, None] & (arange_h[None, :] < H),
                other=0.0,
            )  # (BLOCK_L, BLOCK_H)
            logits = tl.dot(x, w_all, input_precision=PRECISION)  # (BLOCK_L, BLOCK_V)
        else:
            logits = tl.zeros((BLOCK_L, BLOCK_V), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + arange_h
                in_h = offs_h < H
                x = tl.load(
                    hidden_ptr + b * stride_hb + offs_l[:, None] * stride_hl + offs_h[None, :],
                    mask=in_l[:, None] & in_h[None, :],
                    other=0.0,
                )  # (BLOCK_L, BLOCK_H)
                w = tl.load(
                    weight_ptr + offs_v[None, :] * stride_wv + offs_h[:, None],
                    mask=in_v[None, :] & in_h[:, None],
                    other=0.0,
                )  # (BLOCK_H, BLOCK_V): the tile of W transposed
                logits = tl.dot(x, w, logits, input_precision=PRECISION)
        pooled = tl.load(mask_ptr + b * stride_mb + offs_l, mask=in_l, other=0) != 0
        if ARGMAX:  # the bias inside: ties exactly as in the logits + bias of the reference
            # added to the masked tile, not to the dot's result, which Triton may fold into the
            # dot's initial accumulator (another rounding than the reference's)
            logits = tl.where(pooled[:, None], logits, float("-inf")) + bias[None, :]  # (BLOCK_L, BLOCK_V)
            better = logits > best  # strict: the earliest position wins a tie
            best = tl.where(better, logits, best)
            best_at = tl.where(better, offs_l[:, None], best_at)
        else:
            best = tl.maximum(best, tl.where(pooled[:, None], logits, float("-inf")))
    top = tl.max(best, axis=0)  # (BLOCK_V,)
    if ARGMAX:
        top_at = tl.min(tl.where(best == top[None, :], best_at, 2147483647), axis=0)  # earliest of the ties
        tl.store(argmax_ptr + b * V + offs_v, top_at, mask=in_v)
    else:
        top = top + bias  # max_i fl(x_i + b) = fl(max_i x_i + b): rounding is monotonic
    tl.store(values_ptr + b * V + offs_v, top, mask=in_v)


@triton.jit
def _grad_hidden_kernel(
    grad_max_ptr,  # (B, V) float32
    argmax_ptr,  # (B, V) int32
    weight_ptr,  # (V, H) compute dtype
    grad_hidden_ptr,  # (B, L, H) out, hidden's dtype
    L,
    V,
    H,
    stride_wv,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (position block, hidden block, text): the routed gradient tile by tile, dotted with W."""
    pid_l = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    acc = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_v = offs_v < V
        g = tl.load(grad_max_ptr + b * V + offs_v, mask=in_v, other=0.0)  # (BLOCK_V,)
        at = tl.load(argmax_ptr + b * V + offs_v, mask=in_v, other=-1)  # (BLOCK_V,)
        w = tl.load(
            weight_ptr + offs_v[:, None] * stride_wv + offs_h[None, :],
            mask=in_v[:, None] & in_h[None, :],
            other=0.0,
        )  # (BLOCK_V, BLOCK_H)
        routed = tl.where(at[None, :] == offs_l[:, None], g[None, :], 0.0).to(w.dtype)  # (BLOCK_L, BLOCK_V)
        acc = tl.dot(routed, w, acc, input_precision=PRECISION)
    tl.store(
        grad_hidden_ptr + b * L * H + offs_l[:, None] * H + offs_h[None, :],
        acc,
        mask=(offs_l[:, None] < L) & in_h[None, :],
    )


@triton.jit
def _grad_weight_kernel(
    grad_max_ptr,  # (B, V) float32
    argmax_ptr,  # (B, V) int32
    hidden_ptr,  # (B, L, H) compute dtype
    grad_weight_ptr,  # (V, H) out, weight's dtype
    B,
    V,
    H,
    stride_hb,
    stride_hl,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (term block, hidden block): sum over texts of the gradient times the argmax row."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_v = offs_v < V
    in_vh = in_v[:, None] & (offs_h[None, :] < H)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for _ in range(0, B):  # text by text, advancing the row pointers (64-bit offsets)
        g = tl.load(grad_max_ptr + offs_v, mask=in_v, other=0.0)  # (BLOCK_V,)
        at = tl.load(argmax_ptr + offs_v, mask=in_v, other=0).to(tl.int64)  # (BLOCK_V,)
        rows = tl.load(hidden_ptr + at[:, None] * stride_hl + offs_h[None, :], mask=in_vh, other=0.0).to(
            tl.float32
        )  # (BLOCK_V, BLOCK_H): hidden state at each term's argmax
        acc += g[:, None] * rows
        grad_max_ptr += V
        argmax_ptr += V
        hidden_ptr += stride_hb
    tl.store(grad_weight_ptr + offs_v[:, None] * H + offs_h[None, :], acc, mask=in_vh)


def _interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: IEEE float32 unless torch allows TF32 matmuls (no effect on half types)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _block_h(hidden_size: int) -> int:
    """Hidden-size chunk of the dots: a power of two in [16, 64]."""
    return min(64, max(16, triton.next_power_of_2(hidden_size)))


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool_mask: torch.Tensor
) -> None:
    """Shapes, dtypes, one device and no NaN; rows without a pooled position are allowed.

    Raises:
        ValueError: any of these fails.
    """
    _check(hidden, weight, bias, pool_mask, allow_empty=True)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if pool_mask.is_floating_point() or pool_mask.is_complex():
        raise ValueError(f"pool_mask must be bool or 0/1 integers, got {pool_mask.dtype}")
    devices = {t.device for t in (hidden, weight, bias, pool_mask) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"hidden, weight, bias and pool_mask must be on one device, got {sorted(map(str, devices))}"
        )
    for name, tensor in tensors.items():
        if tensor is not None and bool(tensor.isnan().any()):
            raise ValueError(f"{name} contains NaN")


def _pooled_span(pool_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int32 first pooled position and last pooled position + 1 of each row; (L, 0) if it has none."""
    pooled = pool_mask.bool()
    length = pooled.shape[1]
    positions = torch.arange(length, device=pooled.device)  # (L,)
    lo = torch.where(pooled, positions, length).amin(dim=1)  # (B,)
    hi = torch.where(pooled, positions + 1, 0).amax(dim=1)  # (B,)
    return lo.int(), hi.int()


def _max_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on inputs already in the compute dtype, rows contiguous.

    Returns:
        (values, argmax): (B, V) float32 max logits (``-inf`` on rows without a pooled position)
        and (B, V) int32 positions, or None without ``with_argmax``.
    """
    (batch, _, hidden_size), vocab = hidden.shape, weight.shape[0]
    values = torch.empty(batch, vocab, dtype=torch.float32, device=hidden.device)
    argmax = torch.empty(batch, vocab, dtype=torch.int32, device=hidden.device) if with_argmax else None
    if batch == 0 or vocab == 0:
        return values, argmax
    mask = pool_mask.to(torch.uint8).contiguous()  # (B, L)
    bias = None if bias is None else bias.contiguous()
    lo, hi = _pooled_span(pool_mask)
    tile = TRAINING_TILE if with_argmax else INFERENCE_TILE
    resident = hidden_size <= RESIDENT_H
    block_h = max(16, triton.next_power_of_2(hidden_size)) if resident else _block_h(hidden_size)
    _max_logits_kernel[(triton.cdiv(vocab, tile.block_v), batch)](
        hidden, weight, bias if bias is not None else values, mask, lo, hi, values,
        argmax if with_argmax else values,
        vocab, hidden_size, hidden.stride(0), hidden.stride(1), weight.stride(0), mask.stride(0),
        HAS_BIAS=bias is not None, ARGMAX=with_argmax, W_RESIDENT=resident,
        PRECISION=_precision(hidden.dtype), BLOCK_L=tile.block_l, BLOCK_V=tile.block_v, BLOCK_H=block_h,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return values, argmax


def _grad_hidden(
    grad_max: torch.Tensor, argmax: torch.Tensor, weight: torch.Tensor, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """(B, L, H) gradient of the hidden states, in ``dtype``."""
    (batch, vocab), hidden_size = grad_max.shape, weight.shape[1]
    out = torch.empty(batch, length, hidden_size, dtype=dtype, device=weight.device)
    block_h = _block_h(hidden_size)
    grid = (triton.cdiv(length, GRAD_BLOCK_L), triton.cdiv(hidden_size, block_h), batch)
    _grad_hidden_kernel[grid](
        grad_max, argmax, weight, out, length, vocab, hidden_size, weight.stride(0),
        PRECISION=_precision(weight.dtype), BLOCK_L=GRAD_BLOCK_L, BLOCK_V=GRAD_BLOCK_V, BLOCK_H=block_h,
        num_warps=4,
    )  # fmt: skip
    return out


def _grad_weight(
    grad_max: torch.Tensor, argmax: torch.Tensor, hidden: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(V, H) gradient of the projection's weight, in ``dtype``."""
    (batch, vocab), hidden_size = grad_max.shape, hidden.shape[2]
    out = torch.empty(vocab, hidden_size, dtype=dtype, device=hidden.device)
    block_h = _block_h(hidden_size)
    grid = (triton.cdiv(vocab, GATHER_BLOCK_V), triton.cdiv(hidden_size, block_h))
    _grad_weight_kernel[grid](
        grad_max, argmax, hidden, out, batch, vocab, hidden_size, hidden.stride(0), hidden.stride(1),
        BLOCK_V=GATHER_BLOCK_V, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out


def _kernel_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` and ``weight`` in the matmul dtype (:func:`_compute_dtype`), contiguous."""
    dtype = _compute_dtype(hidden, weight)
    return hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()


class SpladeHead(torch.autograd.Function):
    """Fused SPLADE head with the argmax-routed backward pass of the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, pool_mask):
        x, w = _kernel_inputs(hidden, weight)
        values, argmax = _max_logits(x, w, bias, pool_mask)
        ctx.save_for_backward(x, w, argmax, values)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return _log_saturation(values)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, argmax, values = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_max = _saturation_grad(grad_out, values).contiguous()  # (B, V) float32
        grad_hidden = _grad_hidden(grad_max, argmax, w, x.shape[1], hidden_dtype) if need_hidden else None
        grad_weight = _grad_weight(grad_max, argmax, x, weight_dtype) if need_weight else None
        grad_bias = grad_max.sum(dim=0).to(bias_dtype) if need_bias and bias_dtype is not None else None
        return grad_hidden, grad_weight, grad_bias, None


def fused_supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`splade_head_triton` takes these inputs: on CUDA (or in Triton's interpreter), of a
    kernel dtype."""
    on_device = hidden.is_cuda or (_interpreted() and hidden.device.type == "cpu")
    return on_device and _compute_dtype(hidden, weight) in KERNEL_DTYPES


def max_logits_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The pooled max logits :math:`\max_{i \in P} h_i \cdot W_j + b_j` and their positions (no gradient).

    Args:
        hidden: (B, L, H) hidden states (float32, bfloat16 or float16).
        weight: (V, H) the vocabulary projection's weight.
        bias: (V,) or None, its bias.
        pool_mask: (B, L) bool or 0/1, the positions :math:`P` pooled over.

    Returns:
        (values, argmax): (B, V) float32, ``-inf`` on a row without a pooled position, and (B, V)
        int32 positions (the earliest on ties; 0 on such a row).

    Raises:
        ValueError: see :func:`splade_head_triton`.
    """
    _check_inputs(hidden, weight, bias, pool_mask)
    if not fused_supported(hidden, weight):
        raise ValueError(f"the fused SPLADE head needs CUDA tensors of a dtype in {KERNEL_DTYPES}")
    with torch.no_grad():
        return _max_logits(*_kernel_inputs(hidden, weight), bias, pool_mask)


def splade_head_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool_mask: torch.Tensor
) -> torch.Tensor:
    r"""SPLADE weights :math:`w_j = \log(1 + \mathrm{ReLU}(\max_{i \in P} h_i \cdot W_j + b_j))`, fused.

    The logits are computed tile by tile in the matmul dtype of
    :func:`~retrieval.models.pooling.splade_pool` (the autocast dtype under autocast, else the
    promoted input dtype; TF32 for float32 only where ``torch.backends.cuda.matmul.allow_tf32``)
    with float32 accumulation; the max and the saturation run in float32. Differentiable with
    respect to ``hidden``, ``weight`` and ``bias`` (:class:`SpladeHead`); no ``(B, L, V)``
    tensor is created in either pass.

    Args:
        hidden: (B, L, H) hidden states fed to the vocabulary projection.
        weight: (V, H) the projection's weight.
        bias: (V,) or None, its bias.
        pool_mask: (B, L) bool or 0/1, the positions :math:`P` pooled over; a row without one
            gets weights 0.

    Returns:
        (B, V) float32, >= 0.

    Raises:
        ValueError: wrong shapes, non-float inputs, tensors on several devices, NaN in the inputs,
            a matmul dtype other than float32, bfloat16, float16, or tensors not on CUDA (outside
            Triton's interpreter).
    """
    _check_inputs(hidden, weight, bias, pool_mask)
    if not fused_supported(hidden, weight):
        raise ValueError(f"the fused SPLADE head needs CUDA tensors of a dtype in {KERNEL_DTYPES}")
    if needs_grad(hidden, weight, bias):
        return SpladeHead.apply(hidden, weight, bias, pool_mask)
    values, _ = _max_logits(*_kernel_inputs(hidden, weight), bias, pool_mask, with_argmax=False)
    return _log_saturation(values)


def splade_head_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """The pure-torch reference of :func:`splade_head_triton`: the vocabulary-chunked loop of
    :func:`~retrieval.models.pooling.splade_pool`, on any device and dtype (float64 too).

    Args:
        chunk_size: (int, default 4096) vocabulary rows per chunk.

    Returns:
        (B, V) float32 (float64 for float64 ``hidden``), >= 0; 0 on a row without a pooled position.

    Raises:
        ValueError: wrong shapes, non-float inputs, several devices, NaN, or ``chunk_size < 1``.
    """
    _check_inputs(hidden, weight, bias, pool_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return splade_pool_chunked(hidden, weight, bias, pool_mask, chunk_size)


def splade_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """SPLADE weights by the fused kernel on CUDA (:func:`splade_head_triton`), else the reference.

    Float64 CUDA inputs, and every CPU input, take :func:`splade_head_reference` (with ``chunk_size``).

    Returns:
        (B, V) float32 (float64 on the reference path for float64 ``hidden``), >= 0.
    """
    if hidden.is_cuda and fused_supported(hidden, weight):
        return splade_head_triton(hidden, weight, bias, pool_mask)
    return splade_head_reference(hidden, weight, bias, pool_mask, chunk_size)
