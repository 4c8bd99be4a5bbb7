"""Dynamic sparse training of embedding tables (DSL) and static magnitude pruning (its baseline).

The sparse export of the trained tables is in :mod:`recsys.dsl_export`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

ALLOCATIONS = ("uniform", "erdos_renyi")
REGROWTHS = ("gradient", "momentum")


def embedding_tables(net: nn.Module) -> dict[str, nn.Embedding]:
    """Every ``nn.Embedding`` of ``net`` by module name (BPR-MF: user/item tables; LightGCN: one)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.Embedding)}


def cosine_fraction(step: int, end: float, alpha: float) -> float:
    r"""The fraction of active entries replaced at ``step``.

    .. math::
        f(t) = \frac{\alpha}{2}\Big(1 + \cos\frac{\pi t}{T_{end}}\Big)
    """
    return alpha / 2 * (1 + math.cos(math.pi * min(step / end, 1.0)))


def _apportion(targets: list[float], caps: list[int], budget: int) -> list[int]:
    """Integer counts near ``targets`` (each <= its cap) summing to ``budget``: floors, then the
    largest remainders get one more (Hamilton's method)."""
    counts = [min(int(math.floor(t)), c) for t, c in zip(targets, caps, strict=True)]
    order = sorted(range(len(targets)), key=lambda i: (counts[i] - targets[i], i))  # largest remainder first
    left = budget - sum(counts)
    for i in order:
        if left <= 0:
            break
        if counts[i] < caps[i]:
            counts[i], left = counts[i] + 1, left - 1
    if left != 0:
        raise ValueError(f"cannot place {budget} active entries in tables of sizes {caps}")
    return counts


def allocate(
    shapes: Mapping[str, tuple[int, int]], density: float, allocation: str = "uniform"
) -> dict[str, int]:
    r"""Active entries per table for a global ``density``.

    ``uniform``: every table at ``density``. ``erdos_renyi`` (Evci et al., RigL, after Mocanu et
    al.): table :math:`i` of shape :math:`r_i \times c_i` gets density
    :math:`\epsilon (r_i + c_i) / (r_i c_i)`, :math:`\epsilon` chosen so that the counts sum to the
    budget; a table that would exceed density 1 is kept dense and :math:`\epsilon` is solved again
    for the others. Either way the counts sum to exactly ``round(density * total entries)``.

    Args:
        shapes: table name -> (rows, cols).
        density: fraction of all entries kept active, in (0, 1].
        allocation: ``uniform`` or ``erdos_renyi``.

    Returns:
        table name -> number of active entries.

    Raises:
        ValueError: unknown allocation, or a table left with no active entry.
    """
    names = list(shapes)
    sizes = [r * c for r, c in shapes.values()]
    budget = round(density * sum(sizes))
    if allocation == "uniform":
        targets = [density * n for n in sizes]
    elif allocation == "erdos_renyi":
        targets = _erdos_renyi_targets([shapes[n] for n in names], budget)
    else:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    counts = dict(zip(names, _apportion(targets, sizes, budget), strict=True))
    empty = [n for n, k in counts.items() if k == 0]
    if empty:
        raise ValueError(f"density={density} leaves table(s) {empty} with no active entry; raise density")
    return counts


def _erdos_renyi_targets(shapes: list[tuple[int, int]], budget: int) -> list[float]:
    """Real-valued ER counts: tables whose density would pass 1 are capped at 1, the rest rescaled."""
    dense: set[int] = set()
    while True:
        rest = budget - sum(shapes[i][0] * shapes[i][1] for i in dense)
        scale = sum(r + c for i, (r, c) in enumerate(shapes) if i not in dense)
        eps = rest / scale if scale else 0.0
        over = {i for i, (r, c) in enumerate(shapes) if i not in dense and eps * (r + c) > r * c}
        if not over:
            return [r * c if i in dense else eps * (r + c) for i, (r, c) in enumerate(shapes)]
        dense |= over


class DynamicSparsity:
    r"""Dynamic sparse training of a net's embedding tables (DSL).

    Wang, Chen, Liu, Wang, Chen, Xiong. "Dynamic Sparse Learning: A Novel Paradigm for
    Efficient Recommendation". WSDM 2024. https://arxiv.org/abs/2402.02855
    Drop-and-grow after RigL (Evci et al., ICML 2020, https://arxiv.org/abs/1911.11134) and
    SNFS (Dettmers & Zettlemoyer 2019, https://arxiv.org/abs/1907.04840).

    Every ``nn.Embedding`` weight of the net trains under a fixed budget of
    ``round(density * total entries)`` active entries, split by ``allocation``. Masks start at
    random (a generator seeded with ``seed``) and live on the tables as ``weight_mask`` bool
    buffers, so checkpoints carry them (attach before ``load_state_dict``). Each step the
    gradients of inactive entries are zeroed before the optimizer step and their weights after
    it. Every ``update_interval`` steps while :math:`t < T_{end}` = ``stop_fraction`` x total
    steps, each table with :math:`A` active entries replaces

    .. math::
        n_t = \operatorname{round}\big(f(t)\,A\big), \qquad
        f(t) = \frac{\alpha}{2}\Big(1 + \cos\frac{\pi t}{T_{end}}\Big)

    of them (:math:`\alpha` = ``update_fraction``): the :math:`n_t` active entries of smallest
    :math:`|w|` are dropped and the :math:`n_t` inactive ones (not just dropped) with the largest
    :math:`|g|` grow, :math:`g` the step's dense gradient (``regrow=gradient``, RigL) or its
    exponential moving average (``regrow=momentum``, SNFS; costs one dense float buffer
    ``grad_momentum`` per table). Grown weights start at 0 and the optimizer state (every state
    tensor shaped like the table: Adam's moments) of dropped and grown entries is reset to 0.
    The per-table counts are checked after every update (``RuntimeError`` if ever off).

    Args:
        density (float): fraction of embedding entries kept active, in (0, 1].
        allocation (str, default "uniform"): ``uniform`` or ``erdos_renyi`` (:func:`allocate`).
        regrow (str, default "gradient"): ``gradient`` (RigL) or ``momentum`` (SNFS).
        update_interval (int, default 100): optimizer steps between mask updates, >= 1.
        update_fraction (float, default 0.3): :math:`\alpha`, in [0, 1).
        stop_fraction (float, default 0.75): updates stop after this fraction of training, in (0, 1].
        momentum (float, default 0.9): EMA coefficient of ``regrow=momentum``, in [0, 1).
        seed (int, default 0): seed of the initial masks.
    """

    def __init__(
        self,
        density: float,
        allocation: str = "uniform",
        regrow: str = "gradient",
        update_interval: int = 100,
        update_fraction: float = 0.3,
        stop_fraction: float = 0.75,
        momentum: float = 0.9,
        seed: int = 0,
    ):
        _check(isinstance(density, int | float) and 0 < density <= 1, "density", "in (0, 1]", density)
        _check(allocation in ALLOCATIONS, "allocation", f"one of {ALLOCATIONS}", allocation)
        _check(regrow in REGROWTHS, "regrow", f"one of {REGROWTHS}", regrow)
        _check(
            isinstance(update_interval, int) and update_interval >= 1,
            "update_interval",
            ">= 1",
            update_interval,
        )
        _check(0 <= update_fraction < 1, "update_fraction", "in [0, 1)", update_fraction)
        _check(0 < stop_fraction <= 1, "stop_fraction", "in (0, 1]", stop_fraction)
        _check(0 <= momentum < 1, "momentum", "in [0, 1)", momentum)
        if allocation == "uniform" and update_fraction * density > 1 - density:
            raise ValueError(
                f"update_fraction={update_fraction} with density={density}: the first update would regrow "
                f"{update_fraction * density:.3g} of each table but only {1 - density:.3g} is inactive; "
                "lower update_fraction or density"
            )
        self.density, self.allocation, self.regrow = float(density), allocation, regrow
        self.update_interval, self.update_fraction = update_interval, update_fraction
        self.stop_fraction, self.momentum, self.seed = stop_fraction, momentum, seed
        self.tables: dict[str, nn.Embedding] = {}
        self.allocated: dict[str, int] = {}
        self.budget = 0
        self.total_steps: int | None = None
        self.last_changed: dict[str, int] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list = []
        self._scores: dict[str, Tensor] | None = None  # dense |grad| of the pending update step

    # --- setting up -------------------------------------------------------------------------

    def plan(self, net: nn.Module) -> dict[str, int]:
        """Active entries per embedding table of ``net``; only shapes are read (a meta net works).

        Raises:
            ValueError: no table, or the schedule's largest update does not fit a table.
        """
        tables = embedding_tables(net)
        if not tables:
            raise ValueError(f"{type(net).__name__} has no nn.Embedding table to sparsify")
        shapes = {n: tuple(m.weight.shape) for n, m in tables.items()}
        counts = allocate(shapes, self.density, self.allocation)
        for name, active in counts.items():
            grow, inactive = round(self.update_fraction * active), math.prod(shapes[name]) - active
            if grow > inactive:
                raise ValueError(
                    f"table {name!r} {shapes[name]} keeps {active} active entries: the first update "
                    f"(update_fraction={self.update_fraction}) would regrow {grow}, but only {inactive} "
                    "are inactive; lower update_fraction or density"
                )
        return counts

    @torch.no_grad()
    def attach(self, net: nn.Module) -> None:
        """Register random masks (and momentum buffers) on ``net``'s tables; zero inactive weights."""
        self.allocated = self.plan(net)
        self.tables = embedding_tables(net)
        self.budget = round(self.density * sum(m.weight.numel() for m in self.tables.values()))
        gen = torch.Generator().manual_seed(self.seed)
        for name, module in self.tables.items():
            w = module.weight
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[torch.randperm(w.numel(), generator=gen)[: self.allocated[name]]] = True
            module.register_buffer("weight_mask", mask.view(w.shape).to(w.device))
            if self.regrow == "momentum":
                module.register_buffer("grad_momentum", torch.zeros_like(w))
            w.mul_(module.weight_mask)
        self.last_changed = dict.fromkeys(self.tables, 0)
        self.check()

    def start(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Hook into training: gradient masking after backward, weight masking after each step.

        Both run as hooks (a gradient hook on each table, a step post-hook on ``optimizer``), so a
        training step captured as a CUDA graph records them too.

        Args:
            optimizer: the (raw) optimizer of the net's parameters.
            total_steps: the run's optimizer steps (the schedule ends at ``stop_fraction`` of it).
        """
        if not self.tables:
            raise RuntimeError("DynamicSparsity.start before attach(net)")
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ValueError(f"dynamic sparsity needs a finite number of training steps, got {total_steps}")
        self.stop()
        self._optimizer, self.total_steps = optimizer, int(total_steps)
        for name, module in self.tables.items():
            self._handles.append(module.weight.register_post_accumulate_grad_hook(self._grad_hook(name)))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.mask_weights()))
        self.check()

    def stop(self) -> None:
        """Remove the training hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _grad_hook(self, name: str):
        module = self.tables[name]

        def hook(weight: Tensor) -> None:
            grad = weight.grad
            if self._scores is not None:
                self._scores[name] = grad.abs()
            if self.regrow == "momentum":
                module.grad_momentum.mul_(self.momentum).add_(grad, alpha=1 - self.momentum)
            grad.mul_(module.weight_mask)

        return hook

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Set every inactive weight to exactly 0 (in place)."""
        for module in self.tables.values():
            module.weight.mul_(module.weight_mask)

    # --- the schedule -----------------------------------------------------------------------

    def fraction(self, step: int) -> float:
        """:math:`f(t)` of the class docstring (0 once updates have stopped)."""
        if self.total_steps is None:
            raise RuntimeError("DynamicSparsity.fraction before start(optimizer, total_steps)")
        end = self.stop_fraction * self.total_steps
        return cosine_fraction(step, end, self.update_fraction) if step < end else 0.0

    def update_due(self, step: int) -> bool:
        """Whether the step of index ``step`` (0-based) ends with a mask update."""
        if self.total_steps is None or step == 0 or step % self.update_interval:
            return False
        return step < self.stop_fraction * self.total_steps and self.update_fraction > 0

    def keep_dense_gradients(self) -> None:
        """Record the next backward's dense gradient (before masking) for :meth:`update`."""
        self._scores = {} if self.regrow == "gradient" else None

    @torch.no_grad()
    def update(self, step: int) -> dict[str, int]:
        """Drop and grow in every table (after the optimizer step); returns table -> entries changed."""
        scores, self._scores = self._scores, None
        for name, module in self.tables.items():
            score = module.grad_momentum if self.regrow == "momentum" else (scores or {}).get(name)
            if score is None:
                raise RuntimeError(f"no dense gradient for table {name!r}: call keep_dense_gradients() first")
            n = round(self.fraction(step) * self.allocated[name])
            self.last_changed[name] = 2 * n
            if n:
                changed = drop_and_grow(module.weight, module.weight_mask, score, n)
                self._reset_optimizer_state(module.weight, changed)
        self.check()
        return dict(self.last_changed)

    def _reset_optimizer_state(self, weight: Tensor, flat_index: Tensor) -> None:
        state = self._optimizer.state.get(weight, {}) if self._optimizer is not None else {}
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == weight.shape:
                value.view(-1).index_fill_(0, flat_index, 0)

    # --- the contract -----------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``RuntimeError`` unless every table holds its allocated count and the total fits."""
        active = {n: int(m.weight_mask.sum()) for n, m in self.tables.items()}
        off = {n: (k, self.allocated[n]) for n, k in active.items() if k != self.allocated[n]}
        if off or sum(active.values()) > self.budget:
            raise RuntimeError(
                f"sparsity budget broken: (active, allocated) per table {off}, total "
                f"{sum(active.values())} vs budget {self.budget} (masks from another density?)"
            )

    def stats(self) -> dict[str, float]:
        """Flat numbers for logging: ``density/<table>``, ``density`` (overall), ``active`` (entries),
        ``budget`` and ``changed`` (entries dropped + grown by the last update, 2n per table)."""
        out: dict[str, float] = {}
        for name, m in self.tables.items():
            out[f"density/{name}"] = m.weight_mask.sum().item() / m.weight_mask.numel()
        total = sum(m.weight_mask.numel() for m in self.tables.values())
        active = sum(int(m.weight_mask.sum()) for m in self.tables.values())
        return out | {
            "density": active / total,
            "active": float(active),
            "budget": float(self.budget),
            "changed": float(sum(self.last_changed.values())),
        }


def _check(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def drop_and_grow(weight: Tensor, mask: Tensor, grow_score: Tensor, n: int) -> Tensor:
    """Drop the ``n`` active entries of smallest ``|weight|``, grow the ``n`` inactive ones of
    largest ``grow_score`` (those active before, the dropped ones too, are never grown); in place.

    Dropped and grown weights are set to 0.

    Args:
        weight: (R, C) table.
        mask: (R, C) bool, updated in place.
        grow_score: (R, C) non-negative scores, e.g. ``|gradient|``.
        n: entries to replace; at most the active and the inactive counts.

    Returns:
        (2n,) int64 flat indices of the dropped then grown entries.
    """
    flat_mask, flat_w = mask.view(-1), weight.view(-1)
    drop = flat_w.abs().masked_fill(~flat_mask, math.inf).topk(n, largest=False).indices  # (n,)
    grow = grow_score.reshape(-1).abs().masked_fill(flat_mask, -math.inf).topk(n).indices  # (n,)
    flat_mask[drop] = False
    flat_mask[grow] = True
    changed = torch.cat([drop, grow])  # (2n,)
    flat_w.index_fill_(0, changed, 0)
    return changed


@torch.no_grad()
def prune_by_magnitude(net: nn.Module, density: float, allocation: str = "uniform") -> dict[str, Tensor]:
    """Static magnitude pruning of a trained dense net (the DSL baseline), in place.

    Each embedding table keeps its largest-``|w|`` entries (counts from :func:`allocate`); the
    others are set to 0.

    Returns:
        table name -> (R, C) bool mask of the kept entries.
    """
    tables = embedding_tables(net)
    counts = allocate({n: tuple(m.weight.shape) for n, m in tables.items()}, density, allocation)
    masks = {}
    for name, module in tables.items():
        w = module.weight
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[w.abs().view(-1).topk(counts[name]).indices] = True
        masks[name] = mask.view(w.shape)
        w.mul_(masks[name])
    return masks
