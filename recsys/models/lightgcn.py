"""LightGCN: linear graph convolution over the user-item graph."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from retrieval.eval.topk import topk_with_id_ties


def normalized_adjacency(users: Tensor, items: Tensor, num_users: int, num_items: int) -> Tensor:
    r"""The symmetric-normalised adjacency of the bipartite user-item graph, as sparse CSR.

    .. math::
        \hat{A} = D^{-1/2} A D^{-1/2}, \qquad
        A = \begin{pmatrix} 0 & R \\ R^\top & 0 \end{pmatrix}

    with users as nodes ``0..U-1`` and items as nodes ``U..U+I-1``. Isolated nodes keep a
    zero row (their degree is treated as 1), as in LightGCN's released code.

    Args:
        users: (E,) int64 user of each training interaction (duplicates are dropped).
        items: (E,) int64 item of each training interaction.
        num_users: U.
        num_items: I.

    Returns:
        (U+I, U+I) float32 sparse CSR tensor, symmetric, on ``users``' device.
    """
    n = num_users + num_items
    keys = torch.unique(users.long() * num_items + items.long())  # drop duplicate edges
    u, i = keys // num_items, keys % num_items + num_users  # (E,), (E,)
    row = torch.cat([u, i])  # (2E,)
    col = torch.cat([i, u])  # (2E,)
    deg = torch.bincount(row, minlength=n).float().clamp(min=1)  # (N,)
    inv_sqrt = deg.rsqrt()
    values = inv_sqrt[row] * inv_sqrt[col]  # (2E,)
    order = torch.argsort(row * n + col)  # CSR order: by row, then column
    crow = torch.zeros(n + 1, dtype=torch.int64, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=n), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col[order], values[order], (n, n), check_invariants=False)


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 1-D or 2-D ``index``: ``(..., d)`` rows.

    ``index_select``'s backward is an atomic ``index_add``, much cheaper on a GPU than the
    sort-based backward of advanced indexing, but not bit-deterministic; under
    ``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic``) plain indexing
    is used instead.
    """
    if torch.are_deterministic_algorithms_enabled():
        return table[index]
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


def _version(t: Tensor) -> int:
    """In-place version counter of ``t``; -1 for inference tensors (read-only outside inference mode)."""
    return -1 if t.is_inference() else t._version


def parameter_versions(module: nn.Module) -> tuple[int, ...]:
    """The in-place versions of ``module``'s parameters: a cache key that changes with every update."""
    return tuple(_version(p) for p in module.parameters())


class _SymmetricSpmm(torch.autograd.Function):
    """``adj @ x`` for a constant symmetric sparse ``adj``: the backward pass is ``adj @ grad``."""

    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, ctx.adj @ grad


class LightGCN(nn.Module):
    r"""LightGCN (He et al., SIGIR 2020).

    He, Deng, Wang, Li, Zhang, Wang. "LightGCN: Simplifying and Powering Graph Convolution
    Network for Recommendation". SIGIR 2020. https://arxiv.org/abs/2002.02126

    Embeddings are propagated without transforms or non-linearities and averaged over layers:

    .. math::
        \mathbf{E}^{(k+1)} = \hat{A}\,\mathbf{E}^{(k)}, \qquad
        \mathbf{E} = \frac{1}{K+1} \sum_{k=0}^{K} \mathbf{E}^{(k)}, \qquad
        \hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i

    with :math:`\hat{A}` from :func:`normalized_adjacency` over the *training* interactions
    (set with :meth:`set_graph`). Training uses the BPR loss with L2 on the layer-0 ("ego")
    embeddings of the batch (paper eq. 15; :func:`recsys.losses.l2_penalty`).

    Propagation runs once per call over the whole graph (the paper's full-graph training).
    Without gradients (evaluation), the propagated table is cached and reused for as long as
    the embedding table is unchanged (its in-place version counter), so full-sort evaluation
    propagates once; with gradients it is always recomputed.

    Args:
        num_users (int): number of users U.
        num_items (int): number of items I.
        embedding_dim (int, default 64): size d of the embeddings.
        num_layers (int, default 3): propagation depth K.
        init_std (float, default 0.1): std of the normal initialisation (the released code's).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        num_layers: int = 3,
        init_std: float = 0.1,
    ):
        super().__init__()
        self.num_users, self.num_items, self.num_layers = num_users, num_items, num_layers
        self.embedding = nn.Embedding(num_users + num_items, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=init_std)
        self.adj: Tensor | None = None
        self._cache: tuple[int, Tensor] | None = None  # (weight version, propagated table)

    def set_graph(self, users: Tensor, items: Tensor) -> None:
        """Build :math:`\\hat{A}` from the training interactions (and drop any cache).

        Args:
            users: (E,) int64 user ids.
            items: (E,) int64 item ids.
        """
        device = self.embedding.weight.device
        self.adj = normalized_adjacency(users.to(device), items.to(device), self.num_users, self.num_items)
        self._cache = None

    def _apply(self, fn, recurse: bool = True):
        # keep the (non-parameter, non-buffer) sparse graph on the module's device
        super()._apply(fn, recurse)
        if self.adj is not None:
            self.adj = fn(self.adj)
        self._cache = None
        return self

    def propagate(self) -> tuple[Tensor, Tensor]:
        """Layer-mean embeddings of every user and item.

        Returns:
            ((U, d), (I, d)) user and item embeddings.
        """
        if self.adj is None:
            raise RuntimeError(
                f"{type(self).__name__} needs its training graph: call set_graph(users, items) first"
            )
        cacheable = not torch.is_grad_enabled()
        key = self._cache_key()
        if cacheable and self._cache is not None and self._cache[0] == key:
            out = self._cache[1]
        else:
            out = self._node_table()  # (N, d)
            self._cache = (key, out) if cacheable else None
        return out[: self.num_users], out[self.num_users :]

    def _node_table(self) -> Tensor:
        """(U + I, d) what :meth:`propagate` returns, users then items."""
        return self.layer_mean(self.embedding.weight)

    def _cache_key(self) -> tuple[int, ...]:
        """What :meth:`_node_table` depends on: the in-place versions of the parameters."""
        return parameter_versions(self)

    def layer_mean(self, x: Tensor) -> Tensor:
        r"""The mean of :math:`\hat{A}^k x` over :math:`k = 0..K`: (N, c) for an (N, c) ``x``."""
        total = x
        for _ in range(self.num_layers):
            x = _SymmetricSpmm.apply(self.adj, x)  # (N, c)
            total = total + x
        return total / (self.num_layers + 1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of users against items.

        Args:
            users: (B,) int64 user ids.
            items: (B,) or (B, n) int64 item ids.

        Returns:
            (B,) or (B, n) scores.
        """
        user_emb, item_emb = self.propagate()
        u = gather_rows(user_emb, users)  # (B, d)
        i = gather_rows(item_emb, items)  # (B, d) or (B, n, d)
        return (u.unsqueeze(-2) * i).sum(-1) if items.dim() == 2 else (u * i).sum(-1)

    def score_all(self, users: Tensor) -> Tensor:
        """Scores of a batch of users against every item.

        Args:
            users: (B,) int64 user ids.

        Returns:
            (B, num_items) scores.
        """
        user_emb, item_emb = self.propagate()
        return user_emb[users] @ item_emb.T

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """The propagated tables whose dot products are :meth:`score_all`'s scores.

        Returns:
            ((U, d), (I, d)) layer-mean user and item embeddings (:meth:`propagate`).
        """
        return self.propagate()

    @torch.no_grad()
    def recommend(self, users: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """The top-``k`` items for each user, best first, ties broken by lower item id.

        Args:
            users: (B,) int64 user ids.
            k: number of items.
            exclude: optional (B, num_items) bool mask of items never to recommend.

        Returns:
            (B, k) int64 item ids; ``-1`` pads a row with fewer than ``k`` candidates.
        """
        scores = self.score_all(users)  # (B, I)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return topk_with_id_ties(scores, k)[1]

    def ego_embeddings(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """Layer-0 embedding rows of a batch, for the L2 penalty.

        Args:
            users: (B,) user ids.
            items: (B,) or (B, n) item ids.

        Returns:
            ((B, d), (..., d)) user and item rows.
        """
        weight = self.embedding.weight
        return gather_rows(weight, users), gather_rows(weight, items + self.num_users)
