r"""Gates of a sparse mixture of experts: top-k softmax, hash routing and COMET's trees, and COMET's
permutation local search over the gate's slot-to-expert assignment.

Every gate (the ``router`` of :class:`~recsys.models.moe.SparseMoE`) maps the T real tokens of a batch to
a :class:`Routing`: (T, k) gate weights, (T, k) expert ids and which of those k assignments are active
(gate > 0), plus what the losses need. Each gate also holds an *assignment*: which expert each of its
slots feeds (top-k: the router's rows; hash: the hash buckets; COMET: every tree's leaves), which
:func:`local_search` permutes in place with :meth:`swap` moves while the experts' weights stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from recsys.models.moe import SparseMoE

log = logging.getLogger(__name__)

GATES = ("topk", "hash", "comet")


@dataclass
class Routing:
    """What a gate decided for T real tokens.

    Attributes:
        gates: (T, k) gate weights (at least float32), summing to 1 over the active assignments.
        experts: (T, k) int64 expert ids; column j holds each token's (j+1)-th largest gate.
        active: (T, k) bool, the assignments with a non-zero gate (the others are not routed at all).
        probs: (T, E) distribution over experts for the load-balancing loss; None: no balancing loss.
        logits: (T, E) logits for the router z-loss; None: no z-loss.
        truncated: () float32 number of tokens whose gate put mass on more than k experts and was cut to
            the k largest (COMET's soft trees; 0 for the other gates).
        entropy: () mean entropy of each tree's leaf distribution (COMET; 0 for the other gates).
    """

    gates: Tensor
    experts: Tensor
    active: Tensor
    probs: Tensor | None
    logits: Tensor | None
    truncated: Tensor
    entropy: Tensor


def top_k_routing(probs: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    r"""Top-k experts of each token and their gate weights, renormalised over the k chosen.

    Shazeer et al. "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer".
    ICLR 2017. https://arxiv.org/abs/1701.06538 ; Lepikhin et al. "GShard". ICLR 2021.
    https://arxiv.org/abs/2006.16668

    .. math::
        p = \mathrm{softmax}(W_r x), \qquad
        g_{e} = \frac{p_e}{\sum_{e' \in \mathrm{TopK}(p)} p_{e'}} \quad (e \in \mathrm{TopK}(p))

    With ``top_k == 1`` the gate is always 1, so the router learns from the auxiliary losses only.

    Args:
        probs: (T, E) router probabilities p.
        top_k: k.

    Returns:
        (gates, experts): (T, k) gate weights summing to 1 per token, and (T, k) int64 expert ids,
        column j holding each token's (j+1)-th choice (descending probability).
    """
    weights, experts = probs.topk(top_k, dim=-1)  # (T, k), (T, k)
    return weights / weights.sum(-1, keepdim=True), experts


def transpose_values(assignment: Tensor, a: int, b: int) -> Tensor:
    """``assignment`` with its entries ``a`` set to ``b`` and vice versa (the transposition (a b))."""
    return torch.where(assignment == a, b, torch.where(assignment == b, a, assignment))


def _check_swap(group: int, a: int, b: int, groups: int, num_experts: int) -> None:
    if not 0 <= group < groups:
        raise ValueError(f"group must be in [0, {groups}), got {group}")
    if not (0 <= a < num_experts and 0 <= b < num_experts):
        raise ValueError(f"experts to swap must be in [0, {num_experts}), got {a} and {b}")


def _zero(like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros((), dtype=dtype, device=like.device)


class TopKRouter(nn.Linear):
    r"""Top-k softmax gate: a linear router, :func:`top_k_routing` over its softmax.

    .. math::
        p = \mathrm{softmax}(W_r x), \qquad \text{experts} = \mathrm{TopK}(p), \qquad
        g_e = p_e / \textstyle\sum_{e' \in \mathrm{TopK}(p)} p_{e'}

    It is an ``nn.Linear`` (``router(x)`` gives the (T, E) logits, ``router.weight`` is :math:`W_r`),
    so that state dicts keep the key ``router.weight``. Its assignment is row e ↔ expert e:
    :meth:`swap` exchanges two rows of :math:`W_r`, so the tokens that picked one expert go to the
    other while the experts keep their weights.

    Args:
        dim (int): model width d.
        num_experts (int): E.
        top_k (int): k.
    """

    groups = 1

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__(dim, num_experts, bias=False)
        self.top_k = top_k

    def route(self, tokens: Tensor, keys: Tensor | None, dtype: torch.dtype) -> Routing:
        """tokens (T, d) -> :class:`Routing` (``keys`` unused); router arithmetic in ``dtype``."""
        logits = self(tokens).to(dtype)  # (T, E)
        probs = logits.softmax(dim=-1)  # (T, E)
        gates, experts = top_k_routing(probs, self.top_k)  # (T, k), (T, k)
        active = torch.ones_like(experts, dtype=torch.bool)
        zero = _zero(tokens, torch.float32)
        return Routing(gates, experts, active, probs, logits, zero, zero.clone())

    @torch.no_grad()
    def swap(self, group: int, a: int, b: int) -> None:
        """Exchange router rows ``a`` and ``b`` (``group`` must be 0)."""
        _check_swap(group, a, b, 1, self.out_features)
        self.weight[[a, b]] = self.weight[[b, a]]


class HashRouter(nn.Module):
    r"""Hash routing: a fixed random map from each token's key to one expert, no router parameters.

    Roller, Sukhbaatar, Szlam, Weston. "Hash Layers For Large Sparse Models". NeurIPS 2021.
    https://arxiv.org/abs/2106.04426

    .. math::
        \text{expert}(x_t) = h(\kappa_t \bmod K), \qquad g = 1

    with :math:`\kappa_t` the token's key (in OneRec's decoder, the input token id at that position) and
    h a balanced random map of the K keys (a seeded random permutation of 0..K-1, modulo E, so every
    expert gets :math:`\lfloor K/E \rfloor` or :math:`\lceil K/E \rceil` keys: Roller et al.'s "balanced"
    assignment, here random rather than frequency-based). The map is the buffer ``table`` (saved in the
    state dict); k = 1; no balancing loss or z-loss. :meth:`swap` exchanges two experts' key sets.

    Args:
        num_experts (int): E.
        num_keys (int): K, the size of the key space (keys are reduced modulo K).
        seed (int, default 0): seed of the map.
    """

    groups = 1
    top_k = 1

    def __init__(self, num_experts: int, num_keys: int, seed: int = 0):
        super().__init__()
        if num_keys < 1:
            raise ValueError(f"num_keys must be >= 1 for gate='hash', got {num_keys}")
        self.num_experts, self.num_keys = num_experts, num_keys
        perm = torch.randperm(num_keys, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("table", perm % num_experts)  # (K,)

    def route(self, tokens: Tensor, keys: Tensor | None, dtype: torch.dtype) -> Routing:
        """keys (T,) int64 -> :class:`Routing` with one expert per token, gate 1 (``tokens`` unused)."""
        if keys is None:
            raise ValueError("gate='hash' routes by key: pass keys (e.g. the token ids) to SparseMoE.forward")
        if keys.shape != tokens.shape[:1]:
            raise ValueError(f"expected one key per token ({tokens.shape[0]}), got shape {tuple(keys.shape)}")
        experts = self.table[keys.long().remainder(self.num_keys)].unsqueeze(1)  # (T, 1)
        gates = torch.ones(experts.shape, dtype=dtype, device=tokens.device)  # (T, 1)
        active = torch.ones_like(experts, dtype=torch.bool)
        zero = _zero(tokens, torch.float32)
        return Routing(gates, experts, active, None, None, zero, zero.clone())

    @torch.no_grad()
    def swap(self, group: int, a: int, b: int) -> None:
        """Send the keys of expert ``a`` to ``b`` and those of ``b`` to ``a`` (``group`` must be 0)."""
        _check_swap(group, a, b, 1, self.num_experts)
        self.table.copy_(transpose_values(self.table, a, b))


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    r"""Smooth-step activation: a cubic between two flat pieces, exactly 0 or 1 outside the band.

    Hazimeh et al. "The Tree Ensemble Layer: Differentiability meets Conditional Computation".
    ICML 2020. https://arxiv.org/abs/2002.07772

    .. math::
        S(t) = \begin{cases} 0 & t \le -\gamma/2 \\
            -\frac{2}{\gamma^3} t^3 + \frac{3}{2\gamma} t + \frac12 & -\gamma/2 < t < \gamma/2 \\
            1 & t \ge \gamma/2 \end{cases}

    Continuously differentiable; its derivative is 0 outside the band, so a split whose input has left
    the band routes hard and gets no gradient.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    upper = torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), upper)


def leaf_probabilities(splits: Tensor) -> Tensor:
    """Probability of reaching each leaf of complete binary trees stored as heaps.

    A tree with E leaves has internal nodes 0..E-2 and leaves E-1..2E-2; node q's children are 2q+1
    (reached with probability S_q) and 2q+2 (1 - S_q). For E a power of two every leaf sits at depth
    log2 E, otherwise at depth ⌈log2 E⌉ or one less.

    Args:
        splits: (..., E-1) split activations S_q in [0, 1].

    Returns:
        (..., E) leaf probabilities, summing to 1.
    """
    inner = splits.shape[-1]
    nodes = [torch.ones_like(splits[..., 0])] + [None] * (2 * inner)
    for q in range(inner):
        nodes[2 * q + 1] = nodes[q] * splits[..., q]
        nodes[2 * q + 2] = nodes[q] * (1.0 - splits[..., q])
    return torch.stack(nodes[inner:], dim=-1)


class CometRouter(nn.Module):
    r"""COMET's tree gate: k soft binary trees whose reached leaves point to experts.

    Ibrahim, Chen, Hazimeh, Ponomareva, Zhao, Mazumder. "COMET: Learning Cardinality Constrained
    Mixture of Experts with Trees and Local Search". KDD 2023. https://arxiv.org/abs/2306.02824

    Tree j (of k) has E leaves (depth ⌈log2 E⌉, :func:`leaf_probabilities`) and at internal node q the
    split :math:`S(w_{jq} \cdot x)` (:func:`smooth_step`, band γ). Leaf l is reached with probability
    :math:`P_j(l \mid x)`, the product of the splits on its path, carries a score
    :math:`a_{jl}(x) = u_{jl} \cdot x + c_{jl}` and points to expert :math:`\pi_j(l)` (the buffer
    ``leaf_expert``, identity at start). The gate is

    .. math::
        \omega_{jl} = \frac{P_j(l \mid x)\, e^{a_{jl}(x)}}{\sum_{j'l'} P_{j'}(l' \mid x)\, e^{a_{j'l'}(x)}},
        \qquad g_e(x) = \sum_{j=1}^{k} \sum_{l} \omega_{jl}\, \mathbb{1}[\pi_j(l) = e]

    i.e. a softmax over every tree's leaves in log space (:math:`\log P + a`), so a leaf with P = 0 gets
    no weight. Once each tree routes hard (every split input outside [-γ/2, γ/2]) a token reaches one
    leaf per tree, hence at most k experts: the cardinality constraint, exact and conditional.

    Differences from the paper (and its reference code):

    * **Truncation.** While trees are still soft a token can spread mass over more than k experts; the
      paper then computes them all (partially conditional training). Here the k largest :math:`g_e`
      are kept and renormalised, so the block stays k-sparse (and shares top-k's capacity logic); such
      tokens are counted in :attr:`Routing.truncated`. With k = 1 the renormalised gate is 1, so the
      trees then learn only from the balancing loss (as top-1 does).
    * **Regularisers.** The paper's entropy regulariser on :math:`P_j`, which drives the trees to hard
      routing, is not added to the loss; its value is reported as :attr:`Routing.entropy` for a caller
      to weight. The load-balancing loss is computed on g as for top-k (the paper uses none); no z-loss.
    * **Permutations.** The paper learns the leaf-to-expert maps :math:`\pi_j` with a Gumbel-Sinkhorn
      relaxation early in training; here they are discrete and set by :func:`local_search` swaps.

    Args:
        dim (int): model width d.
        num_experts (int): E >= 2, also the leaves per tree.
        top_k (int): k, the number of trees.
        gamma (float, default 1.0): γ, the width of the smooth-step's soft band.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, gamma: float = 1.0):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.num_experts, self.top_k, self.gamma = num_experts, top_k, gamma
        self.splits = nn.Linear(dim, top_k * (num_experts - 1), bias=False)  # w_{jq}
        self.leaves = nn.Linear(dim, top_k * num_experts)  # u_{jl}, c_{jl}
        nn.init.uniform_(self.splits.weight, -gamma / 100, gamma / 100)  # start soft: S ≈ 1/2
        nn.init.uniform_(self.leaves.weight, -0.05, 0.05)
        nn.init.zeros_(self.leaves.bias)
        self.register_buffer("leaf_expert", torch.arange(num_experts).repeat(top_k, 1))  # (k, E)

    @property
    def groups(self) -> int:
        return self.top_k

    def leaf_distribution(self, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        r"""tokens (T, d) -> (T, k, E) leaf probabilities :math:`P_j(l \mid x)`."""
        t, k, e = tokens.shape[0], self.top_k, self.num_experts
        s = smooth_step(self.splits(tokens).to(dtype), self.gamma).view(t, k, e - 1)
        return leaf_probabilities(s)  # (T, k, E)

    def expert_weights(self, tokens: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """tokens (T, d) -> (g (T, E) expert weights summing to 1, P (T, k, E) leaf probabilities)."""
        t, k, e = tokens.shape[0], self.top_k, self.num_experts
        p = self.leaf_distribution(tokens, dtype)  # (T, k, E)
        a = self.leaves(tokens).to(dtype).view(t, k, e)  # (T, k, E)
        log_p = torch.where(p > 0, p.clamp_min(torch.finfo(dtype).tiny).log(), float("-inf"))
        omega = (a + log_p).view(t, k * e).softmax(-1)  # (T, k*E)
        index = self.leaf_expert.view(1, k * e).expand(t, -1)  # (T, k*E)
        g = torch.zeros(t, e, dtype=dtype, device=tokens.device).scatter_add(1, index, omega)  # (T, E)
        return g, p

    def route(self, tokens: Tensor, keys: Tensor | None, dtype: torch.dtype) -> Routing:
        """tokens (T, d) -> :class:`Routing`: the k largest expert weights, renormalised (``keys`` unused)."""
        g, p = self.expert_weights(tokens, dtype)  # (T, E), (T, k, E)
        weights, experts = g.topk(self.top_k, dim=-1)  # (T, k), (T, k)
        active = weights > 0
        gates = weights / weights.sum(-1, keepdim=True)  # (T, k)
        truncated = ((g > 0).sum(-1) > self.top_k).sum().float()
        plogp = torch.where(p > 0, p * p.clamp_min(torch.finfo(dtype).tiny).log(), torch.zeros_like(p))
        entropy = -plogp.sum() / max(p.shape[0] * p.shape[1], 1)
        return Routing(gates, experts, active, g, None, truncated, entropy)

    @torch.no_grad()
    def swap(self, group: int, a: int, b: int) -> None:
        """In tree ``group``, the leaves pointing to experts ``a`` and ``b`` exchange their experts."""
        _check_swap(group, a, b, self.top_k, self.num_experts)
        self.leaf_expert[group] = transpose_values(self.leaf_expert[group], a, b)


def make_router(
    gate: str, dim: int, num_experts: int, top_k: int, num_keys: int = 0, gamma: float = 1.0, seed: int = 0
) -> nn.Module:
    """The router of one of :data:`GATES` (``num_keys`` and ``seed``: hash only; ``gamma``: comet only)."""
    if gate == "topk":
        return TopKRouter(dim, num_experts, top_k)
    if gate == "hash":
        if top_k != 1:
            raise ValueError(f"gate='hash' routes each token to one expert: top_k must be 1, got {top_k}")
        return HashRouter(num_experts, num_keys, seed)
    if gate == "comet":
        return CometRouter(dim, num_experts, top_k, gamma)
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


@torch.no_grad()
def local_search(moe: SparseMoE, loss_fn: Callable[[], Tensor], max_moves: int, seed: int = 0) -> dict:
    r"""COMET's permutation local search: greedy swaps of the gate's slot-to-expert assignment.

    Ibrahim et al. "COMET". KDD 2023. https://arxiv.org/abs/2306.02824 (permutation-based local search,
    applicable to any gate). With :math:`\pi` the assignment (top-k: router row → expert; hash:
    bucket → expert; COMET: per tree, leaf → expert) and the experts' weights fixed, it looks for

    .. math::
        \pi^\star \approx \arg\min_{\pi} \mathcal{L}(\pi)

    by first-improvement hill climbing over transpositions: the candidate moves (tree j, experts a < b)
    are tried in a seeded random order; a move is kept when the loss strictly decreases, and the pass
    restarts; the search stops at a local optimum (a full pass without improvement) or after
    ``max_moves`` evaluated moves. Rejected moves are undone, so the module ends in the best
    assignment found. The paper learns the permutation by a Gumbel-Sinkhorn relaxation during training;
    this discrete search needs only loss evaluations and can be run on a trained model.

    ``loss_fn`` is called without gradients and should be deterministic (e.g. the model in ``eval()``
    mode on fixed batches); for top-k the swapped router rows keep their optimiser state, so rebuild the
    optimiser (or its state) before training on.

    Args:
        moe: a :class:`~recsys.models.moe.SparseMoE`, changed in place.
        loss_fn: () -> () loss of the model containing ``moe`` on fixed data.
        max_moves: most candidate swaps to evaluate (each costs one ``loss_fn`` call).
        seed: order of the candidate moves.

    Returns:
        ``{"loss_before", "loss_after": float, "moves_tried", "moves_accepted": int, "converged": bool,
        "permutation": (groups, E) int64}``, where ``permutation[j, s]`` is the expert that slot s of
        group j (before the search) now feeds.
    """
    router = getattr(moe, "router", None)
    if not hasattr(router, "swap"):
        raise TypeError(f"local_search needs a SparseMoE with a gate router, got {type(moe).__name__}")
    if max_moves < 0:
        raise ValueError(f"max_moves must be >= 0, got {max_moves}")
    groups, num_experts = router.groups, moe.num_experts
    moves = [(j, a, b) for j in range(groups) for a in range(num_experts) for b in range(a + 1, num_experts)]
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.arange(num_experts).repeat(groups, 1)  # (groups, E)
    before = best = float(loss_fn())
    tried = accepted = 0
    converged = False
    while not converged and tried < max_moves:
        for i in torch.randperm(len(moves), generator=generator).tolist():
            if tried >= max_moves:
                break
            j, a, b = moves[i]
            router.swap(j, a, b)
            tried += 1
            loss = float(loss_fn())
            if loss < best:
                best, accepted = loss, accepted + 1
                permutation[j] = transpose_values(permutation[j], a, b)
                break  # first improvement: start a new pass
            router.swap(j, a, b)  # undo
        else:
            converged = True  # a full pass without improvement: a local optimum
    log.info("local search: loss %.6g -> %.6g, %d of %d moves accepted", before, best, accepted, tried)
    return {
        "loss_before": before,
        "loss_after": best,
        "moves_tried": tried,
        "moves_accepted": accepted,
        "converged": converged,
        "permutation": permutation,
    }
