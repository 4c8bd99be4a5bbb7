"""A whole training step (forward, backward, optimizer step) replayed as one CUDA graph."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Switch an optimizer to its graph-safe form, in place.

    Optimizers with a ``capturable`` option (Adam, AdamW, ...) keep their step counters on
    the parameters' device and update without host syncs when it is set. State restored
    from a checkpoint holds the counters on the host; they are moved to the device too.
    """
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(p.device, torch.float32)


class GraphedStep:
    """Runs ``loss_fn``, its backward and ``optimizer.step()``; on CUDA, as one replayed graph.

    A LightGCN step on a GPU is a few dozen small kernels whose launches cost more host time
    than the GPU needs to run them. Captured once as a CUDA graph ("whole-network capture",
    PyTorch's CUDA-graphs notes), a step is three input copies and one launch.

    Each distinct set of input shapes (the full batches, the last short one) gets its own
    graph: its first ``warmup`` steps run eagerly on a side stream (they are real training
    steps: they create the optimizer's state and the library handles), the next one is
    captured and then replayed. Inputs are copied into the graph's static tensors; the
    returned loss is the graph's static output, overwritten by the next replay of that shape.

    The optimizer's hyper-parameters (the learning rate too) are baked into the graph: a
    learning-rate scheduler would have no effect, so callers must refuse one. After each
    replay the parameters' in-place version counters are bumped (the graph updates them
    behind autograd's back), so caches keyed on them (LightGCN's propagated table) see the
    change.

    On a non-CUDA device every step runs eagerly and the result is the same as without this.

    Args:
        loss_fn: maps the step's input tensors to a () loss; must not sync with the host.
        optimizer: the optimizer of ``params``.
        params: the trained parameters.
        warmup: eager steps per input shape before capture.
    """

    def __init__(
        self,
        loss_fn: Callable[..., Tensor],
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        warmup: int = 3,
    ):
        self.loss_fn, self.optimizer, self.params, self.warmup = loss_fn, optimizer, list(params), warmup
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor, list[Tensor]]] = {}
        self._capturable = False

    def __call__(self, *inputs: Tensor) -> Tensor:
        """One training step on ``inputs``; returns the () loss (detached)."""
        if inputs[0].device.type != "cuda":
            return self._eager(inputs)
        if not self._capturable:
            make_capturable(self.optimizer)
            self._capturable = True
        key = tuple((t.shape, t.dtype) for t in inputs)
        graph = self._graphs.get(key)
        if graph is not None:
            return self._replay(graph, inputs)
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] <= self.warmup:
            return self._on_side_stream(inputs)
        self._graphs[key] = graph = self._capture(inputs)
        log.debug("captured a CUDA graph of the training step for inputs %s", key)
        return self._replay(graph, inputs, copy=False)

    def _step(self, inputs: Sequence[Tensor]) -> Tensor:
        loss = self.loss_fn(*inputs)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _eager(self, inputs: Sequence[Tensor]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self._step(inputs)

    def _on_side_stream(self, inputs: Sequence[Tensor]) -> Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._eager(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, inputs: Sequence[Tensor]):
        static = [t.clone() for t in inputs]
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the graph's own grads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self._step(static)
        grads = [p.grad for p in self.params]  # keep the graph's grad buffers alive
        self.optimizer.zero_grad(set_to_none=True)  # eager steps of other shapes use their own
        return graph, static, loss, grads

    def _replay(self, graph, inputs: Sequence[Tensor], copy: bool = True) -> Tensor:
        cuda_graph, static, loss, _ = graph
        if copy:
            for dst, src in zip(static, inputs, strict=True):
                dst.copy_(src, non_blocking=True)
        cuda_graph.replay()
        torch.autograd.graph.increment_version(self.params)
        return loss
