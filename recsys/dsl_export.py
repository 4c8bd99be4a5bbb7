"""Sparse export of embedding tables (DSL's deployment format): CSR files, a scorer that ranks from them."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from recsys.dsl import embedding_tables
from retrieval.eval.topk import topk_with_id_ties


@dataclass
class SparseTable:
    """One embedding table in compact CSR: row pointers, narrow column ids, float32 values.

    Args:
        crow: (R + 1,) int64 row pointers.
        col: (nnz,) column ids, uint8 when C <= 256, int16 when C <= 32768, else int32.
        values: (nnz,) float32.
        shape: (R, C).
    """

    crow: Tensor
    col: Tensor
    values: Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: Tensor) -> SparseTable:
        """The non-zero entries of a (R, C) table."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().float().cpu().to_sparse_csr()
        rows, cols = weight.shape
        col_dtype = torch.uint8 if cols <= 256 else torch.int16 if cols <= 32768 else torch.int32
        return cls(csr.crow_indices().long(), csr.col_indices().to(col_dtype), csr.values(), (rows, cols))

    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.values))

    def to_csr(self) -> Tensor:
        """(R, C) torch sparse CSR tensor (int64 indices) on the arrays' device."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow, self.col.long(), self.values, self.shape, check_invariants=False
            )

    def to_dense(self) -> Tensor:
        """(R, C) float32 dense table."""
        return self.rows(torch.arange(self.shape[0], device=self.crow.device))

    def rows(self, index: Tensor) -> Tensor:
        """Dense rows ``index`` (B,) of the table: (B, C)."""
        start, end = self.crow[index], self.crow[index + 1]  # (B,), (B,)
        lengths = end - start
        row = torch.repeat_interleave(torch.arange(len(index), device=index.device), lengths)  # (nnz_B,)
        first = torch.cumsum(lengths, 0) - lengths  # (B,) offset of each row's block in the output
        pos = torch.arange(int(lengths.sum()), device=index.device) - first[row] + start[row]  # (nnz_B,)
        out = torch.zeros(len(index), self.shape[1], dtype=self.values.dtype, device=self.values.device)
        out[row, self.col[pos].long()] = self.values[pos]
        return out

    def to(self, device: torch.device | str) -> SparseTable:
        return SparseTable(self.crow.to(device), self.col.to(device), self.values.to(device), self.shape)


@dataclass
class SparseEmbeddingTables:
    """The exported tables by module name (``user_embedding``, ``item_embedding``, ``embedding``...)."""

    tables: dict[str, SparseTable]

    def nbytes(self) -> int:
        """Bytes of every table's CSR arrays."""
        return sum(t.nbytes() for t in self.tables.values())

    def dense_nbytes(self) -> int:
        """Bytes of the same tables stored dense in float32."""
        return sum(4 * math.prod(t.shape) for t in self.tables.values())

    def __getitem__(self, name: str) -> SparseTable:
        return self.tables[name]

    @classmethod
    def load(cls, path: str | Path) -> SparseEmbeddingTables:
        """Read a file written by :func:`export_sparse`."""
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return cls(
            {n: SparseTable(t["crow"], t["col"], t["values"], tuple(t["shape"])) for n, t in raw.items()}
        )


def export_sparse(net: nn.Module | Mapping[str, Tensor], path: str | Path) -> SparseEmbeddingTables:
    """Write every embedding table of ``net`` (or a name -> weight mapping) as CSR, atomically.

    Only non-zero entries are stored (an active entry that is exactly 0 scores the same either
    way). The file is a ``torch.save`` dict (name -> crow, col, values, shape) that loads with
    ``weights_only=True``; it is written to a temporary file first, then renamed.

    Returns:
        the tables as written.
    """
    weights = net if isinstance(net, Mapping) else {n: m.weight for n, m in embedding_tables(net).items()}
    tables = SparseEmbeddingTables({n: SparseTable.from_dense(w) for n, w in weights.items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = {
        n: {"crow": t.crow, "col": t.col, "values": t.values, "shape": list(t.shape)}
        for n, t in tables.tables.items()
    }
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return tables


@torch.no_grad()
def load_sparse_into(net: nn.Module, path: str | Path) -> nn.Module:
    """Copy an export's tables into ``net``'s embeddings (dense), e.g. a LightGCN, and return it.

    LightGCN's propagation makes its final user/item vectors dense whatever the sparsity of its
    ego tables, so only the ego tables are stored sparse; the net scores from them as trained.
    """
    tables = SparseEmbeddingTables.load(path)
    own = embedding_tables(net)
    if set(tables.tables) != set(own):
        raise ValueError(
            f"{path} holds tables {sorted(tables.tables)}, but {type(net).__name__} has {sorted(own)}"
        )
    for name, module in own.items():
        if tuple(module.weight.shape) != tables[name].shape:
            raise ValueError(
                f"table {name!r}: {path} holds {tables[name].shape}, the net {tuple(module.weight.shape)}"
            )
        module.weight.copy_(tables[name].to_dense())
    if hasattr(net, "_cache"):
        net._cache = None
    return net


class SparseDotScorer(nn.Module):
    r"""Scores from exported CSR tables of a dot-product net (BPR-MF-like), without densifying.

    :math:`\hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i` with :meth:`score_all` computed as
    (item CSR) @ (dense user rows)ᵀ by ``torch.sparse``; follows Sparrow's recommender contract,
    so the shared evaluator can rank from the export.

    Args:
        tables: the export (:meth:`SparseEmbeddingTables.load`).
        user_table (str, default "user_embedding"): name of the user table.
        item_table (str, default "item_embedding"): name of the item table.
    """

    def __init__(
        self,
        tables: SparseEmbeddingTables,
        user_table: str = "user_embedding",
        item_table: str = "item_embedding",
    ):
        super().__init__()
        for role, name in (("user", user_table), ("item", item_table)):
            t = tables[name]
            self.register_buffer(f"{role}_crow", t.crow)
            self.register_buffer(f"{role}_col", t.col.long())
            self.register_buffer(f"{role}_values", t.values)
        self.num_users, self.num_items = tables[user_table].shape[0], tables[item_table].shape[0]
        self.dim = tables[user_table].shape[1]

    def _table(self, role: str) -> SparseTable:
        rows = self.num_users if role == "user" else self.num_items
        crow, col, values = (getattr(self, f"{role}_{k}") for k in ("crow", "col", "values"))
        return SparseTable(crow, col, values, (rows, self.dim))

    def score_all(self, users: Tensor) -> Tensor:
        """(B,) user ids -> (B, num_items) scores."""
        u = self._table("user").rows(users)  # (B, d)
        return (self._table("item").to_csr() @ u.T).T  # (B, I)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """(B,) users and (B,) or (B, n) items -> (B,) or (B, n) scores."""
        u = self._table("user").rows(users)  # (B, d)
        i = self._table("item").rows(items.reshape(-1)).view(*items.shape, self.dim)  # (B, d) or (B, n, d)
        return (u.unsqueeze(-2) * i).sum(-1) if items.dim() == 2 else (u * i).sum(-1)

    @torch.no_grad()
    def recommend(self, users: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """(B, k) top item ids, best first, ties broken by lower item id; ``-1`` pads short rows."""
        scores = self.score_all(users)  # (B, I)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return topk_with_id_ties(scores, k)[1]
