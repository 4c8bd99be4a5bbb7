"""Prefix trie over items' token tuples: per-step masks of valid next tokens for constrained beam search.

Generation over semantic IDs (:mod:`recsys.semantic_ids`) must only produce real items, and a list
must not repeat one: the trie gives, for every beam's prefix, the tokens that continue at least one
allowed item that is not excluded. Rajput et al., "Recommender Systems with Generative Retrieval"
(TIGER), NeurIPS 2023; Deng et al., "OneRec", 2025.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor


class CodeTrie:
    r"""Prefix trie over the items' token tuples, for constrained (batched) beam search.

    Nodes are integers per level: the root is node 0 of level 0, and after l tokens a beam sits on a
    node of level l, one per distinct prefix of length l. ``children[l]`` is a dense
    (num_nodes[l], V_l) int64 table, -1 for "no item below this token"; the nodes of level D (after
    the last token) are leaves, one per item, and ``leaf_item`` maps them to items. An "item" is a row
    of ``codes`` (map it through :attr:`SemanticIds.item_ids` for dataset ids).

    Items sorted by code tuple fill a contiguous range under every node, and leaf j is the j-th item in
    that order; :meth:`allowed` with ``excluded`` uses this to forbid a token when every item below it
    is excluded, by counting the excluded items under each child:

    .. math::
        \text{allowed}(u, t) = [\text{child}(u, t) \ne -1] \wedge
            |\{i \in \text{range}(\text{child}(u, t)) : i \notin E\}| > 0

    Args:
        codes: (I, D) int64 non-negative tokens, rows unique among the allowed items
            (:func:`disambiguate` makes them so).
        allowed_items: (I,) bool, only these items are in the trie; None for all.
        vocab_sizes: V_l per position (e.g. :attr:`SemanticIds.vocab_sizes`, so masks match the
            decoder's logits); None for the largest code + 1 of each column.
    """

    def __init__(
        self, codes: Tensor, allowed_items: Tensor | None = None, vocab_sizes: tuple[int, ...] | None = None
    ):
        if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes must be a non-empty (I, D) tensor, got shape {tuple(codes.shape)}")
        if codes.dtype != torch.int64 or (codes < 0).any():
            raise ValueError(
                f"codes must be non-negative int64, got {codes.dtype} with min {int(codes.min())}"
            )
        num_items, depth = codes.shape
        largest = codes.max(0).values.tolist()  # (D,)
        if vocab_sizes is None:
            vocab_sizes = tuple(m + 1 for m in largest)
        if len(vocab_sizes) != depth or any(int(v) <= m for v, m in zip(vocab_sizes, largest, strict=True)):
            raise ValueError(
                f"vocab_sizes {tuple(vocab_sizes)} must have {depth} entries, each above its column's "
                f"largest code {largest}"
            )
        if allowed_items is None:
            allowed_items = torch.ones(num_items, dtype=torch.bool, device=codes.device)
        if allowed_items.shape != (num_items,) or allowed_items.dtype != torch.bool:
            raise ValueError(
                f"allowed_items must be ({num_items},) bool, "
                f"got {tuple(allowed_items.shape)} {allowed_items.dtype}"
            )
        self.item_codes = codes  # (I, D)
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        kept = allowed_items.nonzero().squeeze(1)  # (N,)
        order = kept
        for level in reversed(range(depth)):  # lexicographic sort by stable sorts, last column first
            order = order[torch.argsort(codes[order, level], stable=True)]
        self.leaf_item = order  # (N,) item of each leaf, in code order
        self._sorted_codes = codes[order]  # (N, D)
        self._build_levels()
        self.leaf_of_items = torch.full((num_items,), -1, dtype=torch.int64, device=codes.device)
        self.leaf_of_items[order] = torch.arange(order.numel(), device=codes.device)

    def _build_levels(self) -> None:
        """``children[l]``, ``node_at[l]`` (node of level l above each sorted item) and ``sizes[l]``."""
        sorted_codes = self._sorted_codes  # (N, D)
        n, depth = sorted_codes.shape
        device = sorted_codes.device
        starts = torch.zeros(n, dtype=torch.bool, device=device)  # a new prefix begins at this position
        starts[:1] = True
        self._node_at = [torch.zeros(n, dtype=torch.int64, device=device)]
        self._sizes = [torch.tensor([n], device=device)]
        self.children: list[Tensor] = []
        for level in range(depth):
            starts[1:] |= sorted_codes[1:, level] != sorted_codes[:-1, level]
            node = torch.cumsum(starts, 0) - 1  # (N,) node of level + 1 above each sorted item
            first = starts.nonzero().squeeze(1)  # (num_nodes[level + 1],) first item of each child
            table = torch.full(
                (self._sizes[level].numel(), self.vocab_sizes[level]), -1, dtype=torch.int64, device=device
            )  # (num_nodes[level], V_level)
            table[self._node_at[level][first], sorted_codes[first, level]] = node[first]
            self.children.append(table)
            self._node_at.append(node)
            self._sizes.append(torch.bincount(node, minlength=first.numel()))
        if not bool(starts.all()):
            raise ValueError(
                f"{n - int(starts.sum())} allowed items repeat another's code tuple; "
                "append a suffix with disambiguate() first"
            )

    @property
    def depth(self) -> int:
        """D, tokens per item."""
        return self.item_codes.shape[1]

    @property
    def num_valid_items(self) -> int:
        """Items in the trie (leaves)."""
        return self.leaf_item.numel()

    @property
    def num_nodes(self) -> tuple[int, ...]:
        """Nodes per level 0..D (level 0 the root, level D the leaves)."""
        return tuple(s.numel() for s in self._sizes)

    def root(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """(batch,) int64 root node ids (all zero)."""
        return torch.zeros(batch, dtype=torch.int64, device=device or self.item_codes.device)

    def _check_nodes(self, level: int, nodes: Tensor) -> None:
        if not 0 <= level < self.depth:
            raise ValueError(f"level must be in [0, {self.depth}), got {level}")
        if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= self.num_nodes[level]):
            raise ValueError(f"node ids at level {level} must be in [0, {self.num_nodes[level]})")

    def allowed(self, level: int, nodes: Tensor, excluded: Tensor | None = None) -> Tensor:
        """Valid next tokens of beams sitting on ``nodes`` after ``level`` tokens.

        With ``excluded``, the excluded items below each beam's node are counted per child token (one
        ``bincount`` over the true entries of ``excluded``, O(nnz + n V) memory) and a token stays
        allowed while that count is below the child's item count (the length of its range).

        Args:
            level: tokens generated so far, in [0, D).
            nodes: (n,) int64 node ids of that level.
            excluded: (n, I) bool items each beam must not reach (e.g. already in its list), or None.

        Returns:
            (n, V_level) bool, True where a token leads to at least one allowed, non-excluded item.
        """
        self._check_nodes(level, nodes)
        child = self.children[level][nodes]  # (n, V)
        mask = child >= 0
        if excluded is None or not self.num_valid_items:
            return mask
        n, vocab = child.shape
        if excluded.shape != (n, self.item_codes.shape[0]):
            raise ValueError(
                f"excluded must be ({n}, {self.item_codes.shape[0]}), got {tuple(excluded.shape)}"
            )
        rows, items = excluded.nonzero(as_tuple=True)  # (E,), (E,)
        pos = self.leaf_of_items[items]  # (E,) sorted position, -1 when not in the trie
        below = (pos >= 0) & (self._node_at[level][pos.clamp(min=0)] == nodes[rows])  # under the beam's node
        rows, pos = rows[below], pos[below]
        tokens = self._sorted_codes[pos, level]  # (E',) the child each excluded item lies under
        hits = torch.bincount(rows * vocab + tokens, minlength=n * vocab).view(n, vocab)  # (n, V)
        size = self._sizes[level + 1][child.clamp(min=0)]  # (n, V) items under each child
        return mask & (hits < size)

    def step(self, level: int, nodes: Tensor, tokens: Tensor) -> Tensor:
        """Follow one token from each node.

        Args:
            level: tokens generated so far, in [0, D).
            nodes: (n,) int64 node ids of that level; tokens: (n,) int64 next tokens.

        Returns:
            (n,) int64 node ids of level + 1 (leaf ids after the last token).

        Raises:
            ValueError: a token out of range or with no item below it.
        """
        self._check_nodes(level, nodes)
        if tokens.shape != nodes.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} must match nodes {tuple(nodes.shape)}")
        vocab = self.vocab_sizes[level]
        in_range = (tokens >= 0) & (tokens < vocab)
        child = torch.where(in_range, self.children[level][nodes, tokens.clamp(0, vocab - 1)], -1)  # (n,)
        bad = (child < 0).nonzero().squeeze(1)
        if bad.numel():
            first = int(bad[0])
            raise ValueError(
                f"{bad.numel()} tokens at level {level} lead to no item, e.g. token {int(tokens[first])} "
                f"from node {int(nodes[first])}"
            )
        return child

    def items(self, nodes: Tensor) -> Tensor:
        """(n,) int64 items (rows of ``codes``) of leaf nodes, reached after D steps."""
        if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= self.num_valid_items):
            raise ValueError(f"leaf ids must be in [0, {self.num_valid_items})")
        return self.leaf_item[nodes]

    def to(self, device: torch.device | str) -> CodeTrie:
        """A copy with every table on ``device``."""
        trie = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(trie, name, value.to(device))
            elif isinstance(value, list):
                setattr(trie, name, [v.to(device) for v in value])
        return trie
