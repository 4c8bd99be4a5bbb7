r"""Multi-GPU helpers: in-batch negatives and FLOPS over the global batch, with gradients.

With :math:`W` data-parallel ranks, rank :math:`r` encodes its local queries :math:`q_r` and
documents :math:`d_r` (:math:`b` rows each). :func:`gather_with_grad` gives every rank the
global document batch :math:`D = [d_1; \dots; d_W]`, and every rank computes its loss on it:

.. math::
    L_r = \mathrm{rank}(q_r, D) + \lambda\, \ell_{\mathrm{FLOPS}}(D)

where :math:`\mathrm{rank}(q_r, D)` is the mean over rank :math:`r`'s queries (e.g.
:func:`retrieval.losses.info_nce` with all :math:`Wb` documents as candidates). In the backward
pass the gather sums, over ranks, the gradient that arrives at each slice of :math:`D`, and hands
rank :math:`r` the slice of :math:`d_r`: :math:`\partial (\sum_{r'} L_{r'}) / \partial d_r`, the
gradient of every rank's loss with respect to the documents only rank :math:`r` encoded. Each
rank then backpropagates it, together with the local query path, into its parameter copy, and
DDP averages the parameter gradients over the :math:`W` ranks. The result is the gradient of

.. math::
    \frac{1}{W} \sum_{r=1}^{W} L_r
        = \frac{1}{W} \sum_{r=1}^{W} \mathrm{rank}(q_r, D) + \lambda\, \ell_{\mathrm{FLOPS}}(D),

the mean ranking loss over all :math:`Wb` queries plus the FLOPS of the global batch (the same on
every rank, so averaging leaves it as is): exactly the single-process loss on the global batch.
FLOPS strength therefore does not change with the number of GPUs. Had each rank applied FLOPS
to its local :math:`d_r` instead, the objective would be the mean of per-shard squared means,
which is larger than the squared global mean (Jensen) and grows as the shards shrink, so
:math:`\lambda` would mean something different at every :math:`W`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather", "gather_with_grad", "world"]

_MAX_DIMS = 8  # rank of the tensors whose shapes are checked across ranks


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_shape(x: Tensor, world_size: int) -> None:
    """Raise ValueError unless every rank holds a tensor of ``x``'s shape (one small all_gather)."""
    if not 1 <= x.dim() <= _MAX_DIMS:
        raise ValueError(
            f"gather_with_grad: expected 1 to {_MAX_DIMS} dimensions, got shape {tuple(x.shape)}"
        )
    header = torch.full((1 + _MAX_DIMS,), -1, dtype=torch.int64, device=x.device)  # (1 + _MAX_DIMS,)
    header[0] = x.dim()
    header[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(headers, header)
    shapes = [tuple(h[1 : 1 + int(h[0])].tolist()) for h in headers]
    if len(set(shapes)) > 1:
        raise ValueError(
            "gather_with_grad: every rank must pass a tensor of the same shape (equal local batch "
            f"sizes; pad or drop the last incomplete batch), got per-rank shapes {shapes}"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward: all_reduce(SUM) of the gradient, then this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world_size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # (W * b, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]  # (b, ...)


def gather_with_grad(x: Tensor) -> Tensor:
    r"""Concatenate every rank's ``x`` along dim 0, keeping the autograd graph to the local part.

    Rank :math:`r`'s rows come at ``[r * b, (r + 1) * b)``. The backward pass all-reduces
    (sums) the incoming gradient over ranks and returns this rank's slice, so that each rank
    receives the gradient that every rank's loss sends to the rows it encoded (see the module
    docstring for why this makes DDP's averaged gradient the single-process one). Works on
    any backend with ``all_gather`` and ``all_reduce`` (gloo, nccl); all ranks must call it.

    Args:
        x: (b, ...) this rank's tensor; ``b`` and the trailing shape must be the same on every
            rank.

    Returns:
        (W * b, ...) the gathered tensor; ``x`` itself when torch.distributed is not
        initialised or the world has one rank.

    Raises:
        ValueError: the ranks' shapes differ (raised on every rank).
    """
    _, world_size = world()
    if world_size == 1:
        return x
    _check_same_shape(x, world_size)
    return _GatherWithGrad.apply(x)


def gather(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 without autograd (ids, labels); ``x`` alone
    when not distributed. Shapes must match across ranks, as for :func:`gather_with_grad`."""
    _, world_size = world()
    if world_size == 1:
        return x
    _check_same_shape(x, world_size)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)  # (W * b, ...)
