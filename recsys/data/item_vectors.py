r"""Item vectors computed from a sequence datamodule, for semantic IDs (:mod:`recsys.semantic_ids`).

- :func:`cooccurrence_vectors`: collaborative vectors from the training rows only. Two items
  co-occur when they are at most ``window`` positions apart in a row; the counts become positive
  pointwise mutual information (Levy & Goldberg, NeurIPS 2014),

  .. math::
      \mathrm{PPMI}_{ij} = \max\Big(0, \log \frac{C_{ij} \sum_{kl} C_{kl}}{C_{i\cdot} C_{\cdot j}}\Big),

  and a truncated SVD :math:`\mathrm{PPMI} \approx U \Sigma V^\top` gives :math:`U \Sigma^{1/2}`,
  rows scaled to unit length. An item with no training co-occurrence gets a zero row.
- :func:`metadata_vectors`: one-hot categorical fields and multi-hot bags (slot 0, unknown, left
  out), rows scaled to unit length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recsys.data.sequences import PAD, ItemMetadata


def cooccurrence_vectors(rows: Tensor, num_items: int, dim: int, window: int = 3, seed: int = 0) -> Tensor:
    """(I, dim) unit (or zero) collaborative vectors from (R, W) left-padded training rows."""
    if dim < 1 or window < 1:
        raise ValueError(f"dim and window must be >= 1, got {dim} and {window}")
    left, right = [], []
    for gap in range(1, window + 1):
        a, b = rows[:, :-gap].reshape(-1), rows[:, gap:].reshape(-1)
        real = (a != PAD) & (b != PAD) & (a != b)
        left += [a[real], b[real]]
        right += [b[real], a[real]]  # symmetric
    i, j = torch.cat(left), torch.cat(right)
    if i.numel() == 0:
        return torch.zeros(num_items, dim)
    counts = torch.sparse_coo_tensor(
        torch.stack([i, j]), torch.ones(i.numel()), (num_items, num_items)
    ).coalesce()
    (ii, jj), c = counts.indices(), counts.values()
    row_sum = torch.zeros(num_items).index_add_(0, ii, c)
    pmi = torch.log(c * c.sum() / (row_sum[ii] * row_sum[jj]))
    keep = pmi > 0
    ppmi = torch.sparse_coo_tensor(torch.stack([ii[keep], jj[keep]]), pmi[keep], (num_items, num_items))
    q = min(dim, num_items)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its projection from the global generator
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(ppmi.coalesce(), q=q, niter=4)
    vectors = torch.zeros(num_items, dim)
    vectors[:, :q] = u * s.sqrt()
    return torch.nn.functional.normalize(vectors, dim=1)


def metadata_vectors(metadata: ItemMetadata) -> Tensor:
    """(I, sum of vocabularies) unit (or zero) one-hot fields + multi-hot bags; unknown (0) left out."""
    parts = []
    for f, size in enumerate(metadata.vocab_sizes):
        one_hot = torch.nn.functional.one_hot(metadata.fields[:, f], size).float()
        parts.append(one_hot[:, 1:])
    if metadata.bags.shape[1]:
        multi = torch.zeros(metadata.bags.shape[0], metadata.bag_vocab).scatter_(1, metadata.bags, 1.0)
        parts.append(multi[:, 1:])
    return torch.nn.functional.normalize(torch.cat(parts, 1), dim=1)
