"""Feed-forward blocks for a generative recommender's decoder: a dense FFN and a sparse mixture of experts.

OneRec (Deng et al. 2025, https://arxiv.org/abs/2502.18965) scales its decoder with sparse
mixture-of-experts FFNs; :class:`SparseMoE` is that block and :class:`DenseFFN` its dense control, with
the same forward signature so that a decoder can swap one for the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.models.gates import GATES, Routing, make_router


class FeedForward(nn.Module):
    r"""Position-wise feed-forward network with a GELU.

    .. math::
        \mathrm{FFN}(x) = W_2\, \mathrm{Drop}(\mathrm{GELU}(W_1 x + b_1)) + b_2

    Args:
        dim (int): input and output width d.
        hidden (int): hidden width h.
        dropout (float, default 0.0): dropout on the hidden activations.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d)."""
        return self.net(x)


@dataclass
class RoutingStats:
    """What a routed feed-forward block did with one batch.

    Attributes:
        aux_loss: () differentiable load-balancing loss (:func:`load_balancing_loss`).
        z_loss: () router z-loss (:func:`router_z_loss`).
        tokens_per_expert: (E,) float32 number of (token, expert) assignments each expert processed
            (after capacity).
        dropped: () float32 number of assignments dropped because their expert was full.
        assignments: () float32 number of assignments made: real tokens × top_k, less those with a zero
            gate (COMET: fewer than k distinct experts reached).
        truncated: () float32 number of tokens whose gate spread mass over more than top_k experts and
            was cut to the top_k largest (COMET's soft trees); None for a block without a gate.
        gate_entropy: () mean entropy of COMET's per-tree leaf distributions (the paper's regulariser,
            for a caller to weight); 0 for the other gates, None for a block without a gate.
    """

    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped: Tensor
    assignments: Tensor
    truncated: Tensor | None = None
    gate_entropy: Tensor | None = None


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    r"""Slots per expert, Switch Transformer's capacity.

    Fedus, Zoph, Shazeer. "Switch Transformers". JMLR 2022. https://arxiv.org/abs/2101.03961

    .. math::
        C = \left\lceil \mathrm{cf} \cdot \frac{T \cdot k}{E} \right\rceil

    A tolerance of 1e-9 keeps float round-off (``1.1 * 10 == 11.000000000000002``) from adding a slot.

    Args:
        tokens: T, real tokens in the batch.
        top_k: k.
        num_experts: E.
        capacity_factor: cf; ``<= 0`` means unlimited (C = T: an expert can take every token).

    Returns:
        C.
    """
    if capacity_factor <= 0:
        return tokens
    return max(math.ceil(capacity_factor * tokens * top_k / num_experts - 1e-9), 0)


def positions_in_experts(experts: Tensor, num_experts: int, active: Tensor | None = None) -> Tensor:
    """The slot of each (token, choice) assignment in its expert's queue, in priority order.

    Priority goes first by choice rank (every token's first choice before any second choice), then by
    token order; an assignment is kept when its slot is below the expert's capacity.

    Args:
        experts: (T, k) int64 expert ids, column j the (j+1)-th choice.
        num_experts: E.
        active: (T, k) bool, the assignments that queue; None: all. Inactive ones take no slot (their
            own slot is meaningless).

    Returns:
        (T, k) int64 slot, 0 for the first assignment an expert receives.
    """
    T, k = experts.shape
    if active is not None:  # inactive assignments queue for a dummy expert E
        experts, num_experts = torch.where(active, experts, num_experts), num_experts + 1
    order = experts.T.reshape(-1)  # (k*T,) choice-major: all first choices, then all second ones, ...
    one_hot = F.one_hot(order, num_experts)  # (k*T, E)
    slots = one_hot.cumsum(0).gather(1, order[:, None]).squeeze(1) - 1  # (k*T,)
    return slots.view(k, T).T  # (T, k)


def load_balancing_loss(
    probs: Tensor, experts: Tensor, num_experts: int, active: Tensor | None = None
) -> Tensor:
    r"""Load-balancing auxiliary loss (Switch Transformer / GShard form), over top-k assignments.

    Fedus, Zoph, Shazeer. "Switch Transformers". JMLR 2022. https://arxiv.org/abs/2101.03961 (eq. 4);
    Lepikhin et al. "GShard". ICLR 2021. https://arxiv.org/abs/2006.16668

    .. math::
        \mathcal{L}_{aux} = E \sum_{e=1}^{E} f_e P_e, \qquad
        f_e = \frac{1}{T k} \sum_{t, j} \mathbb{1}[\mathrm{expert}_{t,j} = e], \qquad
        P_e = \frac{1}{T} \sum_t p_{t,e}

    f counts the router's choices before capacity drops and carries no gradient; P does. The loss is
    1 under uniform routing (its minimum when f = P) and E when every token goes to one expert.

    Args:
        probs: (T, E) router probabilities.
        experts: (T, k) int64 chosen experts.
        num_experts: E.
        active: (T, k) bool, the assignments that count in f (Tk replaced by their number); None: all.

    Returns:
        () loss; 0 (with a gradient path) when T = 0.
    """
    T, k = experts.shape
    if active is None:
        counts, made = F.one_hot(experts.reshape(-1), num_experts).sum(0), T * k  # (E,)
    else:
        counts, made = F.one_hot(experts[active], num_experts).sum(0), int(active.sum())  # (E,)
    f = counts.to(probs.dtype) / max(made, 1)  # (E,)
    P = probs.sum(0) / max(T, 1)  # (E,)
    return num_experts * (f * P).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    r"""Router z-loss, which keeps router logits small.

    Zoph et al. "ST-MoE: Designing Stable and Transferable Sparse Expert Models". 2022.
    https://arxiv.org/abs/2202.08906 (eq. 5)

    .. math::
        \mathcal{L}_z = \frac{1}{T} \sum_t \Big(\log \sum_e \exp(z_{t,e})\Big)^2

    Args:
        logits: (T, E) router logits z.

    Returns:
        () loss; 0 (with a gradient path) when T = 0.
    """
    return torch.logsumexp(logits, dim=-1).square().sum() / max(logits.shape[0], 1)


def dense_hidden_for(dim: int, hidden: int, top_k: int) -> int:
    """The dense control at equal active parameters: the hidden width of a :class:`FeedForward` whose
    weight matrices and hidden bias have as many parameters as the ``top_k`` experts a token uses.

    ``top_k`` experts of width h hold :math:`k(2dh + h + d)` parameters, a dense FFN of width kh
    :math:`2dkh + kh + d`: equal except that the dense FFN has one output bias (d) where the experts have
    k of them.

    Args:
        dim: d.
        hidden: h, each expert's hidden width.
        top_k: k, experts per token.

    Returns:
        k · h.
    """
    if dim < 1 or hidden < 1 or top_k < 1:
        raise ValueError(f"dim, hidden and top_k must be >= 1, got {dim}, {hidden}, {top_k}")
    return top_k * hidden


def expert_utilisation(tokens_per_expert: Tensor) -> Tensor:
    """Share of the processed assignments that each expert took.

    Args:
        tokens_per_expert: (E,) counts, as :attr:`RoutingStats.tokens_per_expert`.

    Returns:
        (E,) float shares summing to 1 (all 0 when nothing was processed).
    """
    counts = tokens_per_expert.float()
    return counts / counts.sum().clamp_min(1.0)


def starved_experts(tokens_per_expert: Tensor, threshold: float = 0.1) -> int:
    """Number of experts that took less than ``threshold`` × the uniform share 1/E of the assignments.

    Args:
        tokens_per_expert: (E,) counts.
        threshold: fraction of the uniform share below which an expert counts as starved.

    Returns:
        the number of starved experts.
    """
    share = expert_utilisation(tokens_per_expert)  # (E,)
    return int((share < threshold / share.numel()).sum())


def _stats_dtype(x: Tensor) -> torch.dtype:
    """Router arithmetic in at least float32 (bf16 inputs), float64 kept for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _real_rows(x: Tensor, mask: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
    """Flatten (..., d) inputs and find the rows of real tokens.

    Returns:
        (flat, real): (N, d) all tokens and (T,) int64 indices of the real ones.
    """
    if x.shape[-1] != dim:
        raise ValueError(f"expected inputs of width {dim} in the last dimension, got shape {tuple(x.shape)}")
    flat = x.reshape(-1, dim)  # (N, d)
    if mask is None:
        return flat, torch.arange(flat.shape[0], device=x.device)
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the input shape without its last "
            f"dimension, {tuple(x.shape[:-1])}"
        )
    return flat, mask.reshape(-1).to(torch.bool).nonzero().squeeze(1)  # (N, d), (T,)


def _real_keys(keys: Tensor | None, x: Tensor, real: Tensor) -> Tensor | None:
    """(...,) per-token keys -> (T,) the real tokens' keys (None stays None)."""
    if keys is None:
        return None
    if keys.shape != x.shape[:-1]:
        raise ValueError(
            f"keys shape {tuple(keys.shape)} must equal the input shape without its last "
            f"dimension, {tuple(x.shape[:-1])}"
        )
    return keys.reshape(-1).index_select(0, real)  # (T,)


class SparseMoE(nn.Module):
    r"""Sparse mixture-of-experts feed-forward block with a sparse gate and expert capacity.

    Shazeer et al. "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer".
    ICLR 2017. https://arxiv.org/abs/1701.06538 ; Lepikhin et al. "GShard". ICLR 2021.
    https://arxiv.org/abs/2006.16668 ; Fedus, Zoph, Shazeer. "Switch Transformers". JMLR 2022.
    https://arxiv.org/abs/2101.03961 ; used in OneRec's decoder (Deng et al. 2025,
    https://arxiv.org/abs/2502.18965).

    .. math::
        y = \sum_{j=1}^{k} \mathbb{1}[\text{kept}_j]\, g_j(x)\, \mathrm{FFN}_{e_j(x)}(x)

    with the gate weights :math:`g` and experts :math:`e` given by ``gate``
    (:mod:`recsys.models.gates`):

    * ``"topk"`` (:class:`~recsys.models.gates.TopKRouter`): :math:`p = \mathrm{softmax}(W_r x)`,
      the k most probable experts, :math:`g_j = p_{e_j} / \sum_{j'} p_{e_{j'}}`.
    * ``"hash"`` (:class:`~recsys.models.gates.HashRouter`, Roller et al. 2021): a fixed random map
      from the token's key to one expert (k = 1, g = 1); needs ``keys`` in :meth:`forward`.
    * ``"comet"`` (:class:`~recsys.models.gates.CometRouter`, Ibrahim et al. KDD 2023): k soft binary
      trees with smooth-step splits; at most k experts with non-zero weight.

    **Capacity.** Each expert processes at most :math:`C = \lceil \mathrm{cf} \cdot T k / E \rceil`
    assignments (T real tokens; see :func:`expert_capacity`). Assignments queue by choice rank first
    (all first choices before any second choice), then by token order; those past C are dropped: their
    term is left out of y and the renormalised gates are not recomputed, so a token whose every
    assignment is dropped gets y = 0 and only the caller's residual connection carries it.
    Assignments with a zero gate (COMET reaching fewer than k experts) are not routed and take no slot.
    Capacity applies in training mode only: at inference every assignment is processed, so a
    generated token never depends on which other beams share its batch.

    **Padding.** Tokens where ``mask`` is False are not routed, take no capacity, are not counted in any
    statistic and get y = 0.

    **Losses.** :class:`RoutingStats` carries the load-balancing loss (:func:`load_balancing_loss`; top-k
    and COMET, 0 for hash) and the router z-loss (:func:`router_z_loss`; top-k only, 0 otherwise); the
    caller weights them into the training loss. Router arithmetic (softmax, gates, losses) runs in at
    least float32.

    **Jitter.** In training mode with ``router_jitter`` = ε > 0, the router's input (not the experts')
    is multiplied elementwise by noise drawn from U(1-ε, 1+ε), as in the Switch Transformer.

    **Local search.** :func:`recsys.models.gates.local_search` permutes the gate's slot-to-expert
    assignment (``router.swap``) to lower a loss, the experts' weights staying in place.

    Args:
        dim (int): model width d.
        hidden (int): each expert's hidden width h.
        num_experts (int): E >= 2.
        top_k (int, default 2): experts per token k, 1 <= k <= E (1 for ``"hash"``; the number of trees
            for ``"comet"``).
        capacity_factor (float, default 1.25): cf; ``<= 0`` for unlimited capacity.
        dropout (float, default 0.0): dropout inside each expert.
        router_jitter (float, default 0.0): ε in [0, 1); 0 turns jitter off.
        gate (str, default "topk"): ``"topk"``, ``"hash"`` or ``"comet"``.
        num_keys (int, default 0): hash only: size of the key space (keys are reduced modulo it).
        gamma (float, default 1.0): comet only: width γ of the smooth-step's soft band.
        seed (int, default 0): hash only: seed of the random map.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        dropout: float = 0.0,
        router_jitter: float = 0.0,
        gate: str = "topk",
        num_keys: int = 0,
        gamma: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not 0.0 <= router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.dim, self.num_experts, self.top_k, self.gate = dim, num_experts, top_k, gate
        self.capacity_factor, self.router_jitter = capacity_factor, router_jitter
        self.router = make_router(gate, dim, num_experts, top_k, num_keys, gamma, seed)
        self.experts = nn.ModuleList(FeedForward(dim, hidden, dropout) for _ in range(num_experts))

    def active_parameters(self) -> int:
        """Parameters a token touches: the whole router and ``top_k`` experts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return sum(p.numel() for p in self.router.parameters()) + self.top_k * per_expert

    def _jitter(self, x: Tensor) -> Tensor:
        """Multiplicative U(1-ε, 1+ε) noise on the router input, in training mode only."""
        if not self.training or self.router_jitter == 0.0:
            return x
        eps = self.router_jitter
        return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)

    def _combine(self, tokens: Tensor, gates: Tensor, experts: Tensor, kept: Tensor) -> Tensor:
        """Run each expert on its kept assignments and sum their gated outputs per token.

        Args:
            tokens: (T, d) real tokens.
            gates: (T, k) renormalised gate weights.
            experts: (T, k) int64 chosen experts.
            kept: (T, k) bool, the assignments within capacity.

        Returns:
            (T, d) mixture; zero for a token whose assignments were all dropped.
        """
        out = torch.zeros_like(tokens)  # (T, d)
        weights = gates.to(tokens.dtype)  # (T, k)
        for e, expert in enumerate(self.experts):
            rows, choice = ((experts == e) & kept).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            y = expert(tokens.index_select(0, rows))  # (n_e, d)
            out.index_add_(0, rows, y * weights[rows, choice].unsqueeze(-1))
        return out

    def _stats(self, routing: Routing, kept: Tensor, like: Tensor) -> RoutingStats:
        """:class:`RoutingStats` of a routing whose assignments ``kept`` (T, k) were processed."""
        zero = torch.zeros((), dtype=_stats_dtype(like), device=like.device)
        active = routing.active
        probs = routing.probs
        aux = zero if probs is None else load_balancing_loss(probs, routing.experts, self.num_experts, active)
        return RoutingStats(
            aux_loss=aux,
            z_loss=zero.clone() if routing.logits is None else router_z_loss(routing.logits),
            tokens_per_expert=F.one_hot(routing.experts[kept], self.num_experts).sum(0).float(),  # (E,)
            dropped=(active & ~kept).sum().float(),
            assignments=active.sum().float(),
            truncated=routing.truncated,
            gate_entropy=routing.entropy,
        )

    def forward(
        self, x: Tensor, mask: Tensor | None = None, keys: Tensor | None = None
    ) -> tuple[Tensor, RoutingStats]:
        """Route the real tokens to their experts.

        Args:
            x: (..., d) inputs.
            mask: (...,) bool, True at real tokens; None when every token is real.
            keys: (...,) int64 per-token keys for ``gate="hash"`` (e.g. the token ids); ignored by the
                other gates.

        Returns:
            (y, stats): (..., d) outputs, zero at padding; :class:`RoutingStats` of the real tokens.
        """
        flat, real = _real_rows(x, mask, self.dim)  # (N, d), (T,)
        tokens = flat.index_select(0, real)  # (T, d)
        routing = self.router.route(self._jitter(tokens), _real_keys(keys, x, real), _stats_dtype(x))
        factor = self.capacity_factor if self.training else 0.0  # inference: no drops
        capacity = expert_capacity(tokens.shape[0], self.top_k, self.num_experts, factor)
        slots = positions_in_experts(routing.experts, self.num_experts, routing.active)  # (T, k)
        kept = routing.active & (slots < capacity)  # (T, k)
        mixed = self._combine(tokens, routing.gates, routing.experts, kept)  # (T, d)
        y = torch.zeros_like(flat).index_copy(0, real, mixed)  # (N, d)
        return y.view(x.shape), self._stats(routing, kept, x)


class DenseFFN(nn.Module):
    r"""A dense :class:`FeedForward` behind :class:`SparseMoE`'s forward signature: the dense control.

    .. math::
        y = \mathrm{FFN}(x) \text{ at real tokens}, \qquad y = 0 \text{ at padding}

    Use ``DenseFFN(dim, dense_hidden_for(dim, hidden, top_k))`` for the control at equal active
    parameters (:func:`dense_hidden_for`). Its :class:`RoutingStats` have zero losses, no drops and one
    "expert" that processed every real token.

    Args:
        dim (int): model width d.
        hidden (int): hidden width h.
        dropout (float, default 0.0): dropout on the hidden activations.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.ffn = FeedForward(dim, hidden, dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, keys: Tensor | None = None
    ) -> tuple[Tensor, RoutingStats]:
        """Apply the FFN to every token, zeroing padding.

        Args:
            x: (..., d) inputs.
            mask: (...,) bool, True at real tokens; None when every token is real.
            keys: ignored (the signature of :meth:`SparseMoE.forward`).

        Returns:
            (y, stats): (..., d) outputs, zero at padding; :class:`RoutingStats` with tokens_per_expert
            of shape (1,).
        """
        _, real = _real_rows(x, mask, self.dim)  # (T,)
        y = self.ffn(x)  # (..., d)
        if mask is not None:
            y = torch.where(mask.to(torch.bool).unsqueeze(-1), y, torch.zeros_like(y))
        zero = torch.zeros((), device=x.device)
        count = torch.tensor(float(real.numel()), device=x.device)
        stats = RoutingStats(zero, zero.clone(), count.view(1), zero.clone(), count.clone())
        return y, stats
