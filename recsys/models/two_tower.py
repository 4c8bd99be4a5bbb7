"""Two-tower retrieval over categorical and multi-valued features, with sampling-bias-corrected losses.

The towers and the main loss follow Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
Corpus Item Recommendations", RecSys 2019 (https://doi.org/10.1145/3298689.3346996); the
self-supervised auxiliary loss follows Yao et al., "Self-supervised Learning for Large-scale Item
Recommendations", CIKM 2021 (https://arxiv.org/abs/2007.12865). The augmentations that produce
the two views live in :mod:`recsys.feature_masking`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.models.lightgcn import parameter_versions


def _mlp(in_dim: int, hidden_dims: list[int], output_dim: int) -> nn.Sequential:
    """Linear layers with ReLU between them and none after the last."""
    dims = [in_dim, *hidden_dims, output_dim]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Tower(nn.Module):
    r"""One tower: a mean-pooled embedding bag per feature field, concatenated, an MLP, L2-normalised.

    .. math::
        \mathbf{x} = \big[\, m_1 \bar{\mathbf{e}}_1 \,;\, \dots \,;\, m_F \bar{\mathbf{e}}_F \,\big],
        \qquad \mathbf{z} = \frac{\mathrm{MLP}(\mathbf{x})}{\lVert \mathrm{MLP}(\mathbf{x}) \rVert_2}

    where :math:`\bar{\mathbf{e}}_f` is the mean of field :math:`f`'s value embeddings (padding
    excluded; an all-padding row gives the zero vector) and :math:`m_f \in \{0, 1\}` is the field's
    keep flag. **Masking is applied by zeroing a dropped field's pooled embedding**, so a dropped
    field contributes the zero vector to the MLP input, exactly like a field with no values
    (Yao et al., CIKM 2021, sec. 3.2, feature masking).

    Each field is a (B, L_f) int64 tensor of value ids padded with 0; id 0 is padding for every
    field and ids must be below the field's vocabulary size. Reserving an out-of-vocabulary id
    (and an ID field that can be switched off) is the caller's business.

    Args:
        vocab_sizes (list[int]): vocabulary size of each of the F fields, padding id 0 included.
        embedding_dim (int, default 32): size d of each field's value embeddings.
        hidden_dims (list[int], default [64]): widths of the MLP's hidden layers (ReLU).
        output_dim (int, default 32): size of the output embedding.
    """

    def __init__(
        self,
        vocab_sizes: list[int],
        embedding_dim: int = 32,
        hidden_dims: list[int] | tuple[int, ...] = (64,),
        output_dim: int = 32,
    ):
        super().__init__()
        if not vocab_sizes or min(vocab_sizes) < 2:
            raise ValueError(
                f"vocab_sizes must list >= 1 field, each with >= 2 ids (0 is padding), got {vocab_sizes}"
            )
        self.vocab_sizes = list(vocab_sizes)
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(v, embedding_dim, mode="mean", padding_idx=0) for v in self.vocab_sizes
        )
        self.mlp = _mlp(len(self.vocab_sizes) * embedding_dim, list(hidden_dims), output_dim)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def _check(self, fields: list[Tensor], keep: Tensor | None) -> None:
        if len(fields) != self.num_fields:
            raise ValueError(f"expected {self.num_fields} feature fields, got {len(fields)}")
        batch = fields[0].shape[0] if fields[0].dim() == 2 else None
        for f, (ids, vocab) in enumerate(zip(fields, self.vocab_sizes, strict=True)):
            if ids.dim() != 2 or ids.shape[0] != batch or ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"field {f}: expected a (B={batch}, L) integer tensor of ids, "
                    f"got shape {tuple(ids.shape)} {ids.dtype}"
                )
            # on a GPU this check would stall every step: ids there come from set_features' checked tables
            if not ids.is_cuda and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(
                    f"field {f}: ids must be in [0, {vocab}), got [{ids.min().item()}, {ids.max().item()}]"
                )
        if keep is not None and (
            keep.dtype != torch.bool or keep.shape not in ((self.num_fields,), (batch, self.num_fields))
        ):
            raise ValueError(
                f"keep must be a bool tensor of shape ({self.num_fields},) or ({batch}, {self.num_fields}), "
                f"got {tuple(keep.shape)} {keep.dtype}"
            )

    def forward(self, fields: list[Tensor], keep: Tensor | None = None) -> Tensor:
        """Embed a batch.

        Args:
            fields: F tensors, field f of shape (B, L_f), int64 ids padded with 0.
            keep: optional bool mask of the fields to keep, (F,) for the whole batch or (B, F)
                per example; a dropped field contributes the zero vector. ``None`` keeps all.

        Returns:
            (B, output_dim) L2-normalised embeddings.
        """
        self._check(fields, keep)
        x = torch.stack([bag(ids) for bag, ids in zip(self.bags, fields, strict=True)], dim=1)  # (B, F, d)
        if keep is not None:
            x = x * keep.to(x.dtype).unsqueeze(-1)  # (F, 1) or (B, F, 1) broadcast over (B, F, d)
        return F.normalize(self.mlp(x.flatten(1)), dim=-1)  # (B, F*d) -> (B, output_dim)


class TwoTower(nn.Module):
    r"""A query (user) tower and an item tower scored by inner product of unit vectors.

    Yi, Yang, Hong, Cheng, Heldt, Kumthekar, Zhao, Wei, Chi. "Sampling-Bias-Corrected Neural
    Modeling for Large Corpus Item Recommendations". RecSys 2019.
    https://doi.org/10.1145/3298689.3346996

    .. math::
        s(q, i) = \langle u(q), v(i) \rangle, \qquad \lVert u(q) \rVert = \lVert v(i) \rVert = 1

    Train with :func:`in_batch_softmax_loss` (plus, for Yao et al.'s SSL, :func:`info_nce`
    between two masked views of the item tower).

    Args:
        query_vocab_sizes (list[int]): vocabulary size of each query field (0 is padding).
        item_vocab_sizes (list[int]): vocabulary size of each item field (0 is padding).
        embedding_dim (int, default 32): size of each field's value embeddings, both towers.
        hidden_dims (list[int], default [64]): MLP hidden widths, both towers.
        output_dim (int, default 32): size of the shared embedding space.
    """

    def __init__(
        self,
        query_vocab_sizes: list[int],
        item_vocab_sizes: list[int],
        embedding_dim: int = 32,
        hidden_dims: list[int] | tuple[int, ...] = (64,),
        output_dim: int = 32,
    ):
        super().__init__()
        self.query_tower = Tower(query_vocab_sizes, embedding_dim, hidden_dims, output_dim)
        self.item_tower = Tower(item_vocab_sizes, embedding_dim, hidden_dims, output_dim)
        self._tables: dict[str, tuple[tuple[int, ...], Tensor]] = {}  # kind -> (parameter versions, table)

    def encode_queries(self, fields: list[Tensor], keep: Tensor | None = None) -> Tensor:
        """(B, output_dim) unit query embeddings; see :meth:`Tower.forward`."""
        return self.query_tower(fields, keep)

    def encode_items(self, fields: list[Tensor], keep: Tensor | None = None) -> Tensor:
        """(N, output_dim) unit item embeddings; see :meth:`Tower.forward`."""
        return self.item_tower(fields, keep)

    @staticmethod
    def score(query: Tensor, item: Tensor) -> Tensor:
        """All-pairs scores of query and item embeddings.

        Args:
            query: (B, d) query embeddings.
            item: (N, d) item embeddings.

        Returns:
            (B, N) inner products (cosine similarities for tower outputs).
        """
        return query @ item.T

    def forward(self, query_fields: list[Tensor], item_fields: list[Tensor]) -> Tensor:
        """(B,) scores of paired queries and items (row b of each)."""
        return (self.encode_queries(query_fields) * self.encode_items(item_fields)).sum(-1)

    def set_features(self, user_fields: list[Tensor], item_fields: list[Tensor]) -> None:
        """Every user's and item's feature ids, for full ranking (kept as buffers, not in checkpoints).

        Args:
            user_fields: one (U, L_f) int64 tensor per query field.
            item_fields: one (I, L_f) int64 tensor per item field.
        """
        for prefix, fields, tower in (
            ("user", user_fields, self.query_tower),
            ("item", item_fields, self.item_tower),
        ):
            tower._check([ids.cpu() for ids in fields], None)  # ranges checked once, on the host
            for f, ids in enumerate(fields):
                self.register_buffer(f"{prefix}_field_{f}", ids, persistent=False)
        self._counts = (len(user_fields), len(item_fields))
        self._tables.clear()

    def features(self, kind: str, rows: Tensor | None = None) -> list[Tensor]:
        """The stored fields of ``kind`` (``"user"`` or ``"item"``), all rows or ``rows`` (B,)."""
        if not hasattr(self, "_counts"):
            raise RuntimeError("TwoTower needs every user's and item's features: call set_features first")
        n = self._counts[0 if kind == "user" else 1]
        fields = [getattr(self, f"{kind}_field_{f}") for f in range(n)]
        return fields if rows is None else [ids[rows] for ids in fields]

    def encode_all(self, kind: str, chunk: int = 8192) -> Tensor:
        """(N, d) embeddings of every stored user (``kind="user"``) or item, ``chunk`` rows at a time.

        Without gradients (evaluation) the table is kept and reused until a parameter changes in
        place (an optimizer step), so ranking user batch after user batch encodes the items once.
        """
        key = parameter_versions(self)
        cacheable = not torch.is_grad_enabled()
        if cacheable and kind in self._tables and self._tables[kind][0] == key:
            return self._tables[kind][1]
        tower = self.query_tower if kind == "user" else self.item_tower
        fields = self.features(kind)
        n = fields[0].shape[0]
        table = torch.cat([tower([f[lo : lo + chunk] for f in fields]) for lo in range(0, n, chunk)])
        if cacheable:
            self._tables[kind] = (key, table)
        return table

    def _apply(self, fn, recurse: bool = True):
        self._tables.clear()  # cached tables stay on the old device otherwise
        return super()._apply(fn, recurse)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """((U, d), (I, d)) embeddings of every user and item; their dot products are the scores."""
        return self.encode_all("user"), self.encode_all("item")

    def score_all(self, users: Tensor) -> Tensor:
        """(B, I) scores of users ``users`` (B,) against every item."""
        return self.encode_queries(self.features("user", users)) @ self.encode_all("item").T


def in_batch_softmax_loss(
    query: Tensor,
    item: Tensor,
    log_q: Tensor | None = None,
    temperature: float = 0.05,
    item_ids: Tensor | None = None,
) -> Tensor:
    r"""In-batch sampled softmax with the logQ correction (Yi et al., RecSys 2019, eqs. 3-4).

    Yi et al. "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations".
    RecSys 2019. https://doi.org/10.1145/3298689.3346996

    Row b's positive is item b and the batch's other items are its negatives. Since in-batch
    negatives are drawn with the items' (popularity-skewed) batch probability :math:`p_j`, each
    logit is corrected by :math:`\log p_j`, the positive's included:

    .. math::
        s^c_{bj} = \frac{\langle q_b, v_j \rangle}{\tau} - \log p_j, \qquad
        \mathcal{L} = -\frac{1}{B} \sum_b \log
            \frac{e^{s^c_{bb}}}{\sum_{j \notin D_b} e^{s^c_{bj}}}

    where :math:`D_b` are the columns :math:`j \ne b` holding the same item id as row b's
    positive: those duplicates are masked out (logit :math:`-\infty`) so the positive is never
    its own negative.

    Args:
        query: (B, d) query embeddings.
        item: (B, d) embeddings of each query's positive item.
        log_q: (B,) log sampling probability of each batch item (e.g.
            :meth:`StreamingFrequency.log_probability`); ``None`` for no correction.
        temperature: softmax temperature :math:`\tau > 0`.
        item_ids: (B,) item ids, to mask duplicate positives; ``None`` treats all items as distinct.

    Returns:
        () mean loss.
    """
    batch = query.shape[0]
    logits = _similarities(query, item, temperature, "query and item")  # (B, B)
    if log_q is not None:
        if log_q.shape != (batch,):
            raise ValueError(f"log_q must be ({batch},), got {tuple(log_q.shape)}")
        logits = logits - log_q[None, :]
    if item_ids is not None:
        if item_ids.shape != (batch,):
            raise ValueError(f"item_ids must be ({batch},), got {tuple(item_ids.shape)}")
        duplicate = item_ids[:, None] == item_ids[None, :]  # (B, B)
        duplicate.fill_diagonal_(False)
        logits = logits.masked_fill(duplicate, float("-inf"))
    labels = torch.arange(batch, device=logits.device)
    return F.cross_entropy(logits, labels)


def _similarities(a: Tensor, b: Tensor, temperature: float, names: str) -> Tensor:
    """``a @ b.T / temperature`` for two (N, d) tensors: (N, N); clear errors on bad shapes or temperature."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must both be (N, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return a @ b.T / temperature


def info_nce(view_a: Tensor, view_b: Tensor, temperature: float = 0.1) -> Tensor:
    r"""The self-supervised contrastive loss between two views of the same items (Yao et al., eq. 1).

    Yao, Yi, Hong, Cheng, Chen, Chen, Wei, Wang, Kang, Chi, Hong. "Self-supervised Learning for
    Large-scale Item Recommendations". CIKM 2021. https://arxiv.org/abs/2007.12865

    As in the paper, the loss is **one-directional**: each item's first view must pick out its own
    second view among the batch's second views,

    .. math::
        \mathcal{L}_{self} = -\frac{1}{N} \sum_i \log
            \frac{\exp(\langle z_i, z'_i \rangle / \tau)}{\sum_j \exp(\langle z_i, z'_j \rangle / \tau)}

    with :math:`z_i, z'_i` the item tower's unit embeddings of two augmentations of item i (for
    complementary masks, :func:`recsys.feature_masking.correlated_feature_masking`).

    Args:
        view_a: (N, d) embeddings of the first views :math:`z`, L2-normalised.
        view_b: (N, d) embeddings of the second views :math:`z'`, same item order.
        temperature: :math:`\tau > 0`.

    Returns:
        () mean loss.
    """
    logits = _similarities(view_a, view_b, temperature, "view_a and view_b")  # (N, N)
    return F.cross_entropy(logits, torch.arange(view_a.shape[0], device=logits.device))


_PRIME = 2_147_483_647  # 2**31 - 1, modulus of the universal hash


class StreamingFrequency(nn.Module):
    r"""Streaming estimate of each item's per-step sampling probability (Yi et al., RecSys 2019, Alg. 2).

    Yi et al. "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations".
    RecSys 2019, sec. 4. https://doi.org/10.1145/3298689.3346996

    Two hashed arrays track, per bucket, the last step :math:`A` at which the item was seen and
    an exponential moving average :math:`B` of the gap between its occurrences; its probability of
    appearing in a batch is the inverse average gap:

    .. math::
        B[h(y)] \leftarrow (1 - \alpha) B[h(y)] + \alpha \,(t - A[h(y)]), \qquad
        A[h(y)] \leftarrow t, \qquad \hat{p}_y = 1 / B[h(y)]

    An item's first sighting initialises :math:`B` with the gap since step 0 instead of averaging it
    with the empty array's zero. Duplicates of an item within one step count once. With
    ``num_hashes`` > 1 each array is kept per hash function and the largest gap is used (the
    paper's multiple hashing: collisions only shorten gaps, i.e. overestimate frequency). A
    bucket never seen has probability 1 (log-probability 0). Both arrays are buffers, so the estimate is saved
    with the model's state dict.

    Args:
        num_buckets (int, default 2**20): size H of each hashed array.
        alpha (float, default 0.01): learning rate :math:`\alpha \in (0, 1]` of the moving average.
        num_hashes (int, default 1): number of independent hash functions.
        seed (int, default 0): seed of the hash functions' coefficients.
    """

    def __init__(self, num_buckets: int = 1 << 20, alpha: float = 0.01, num_hashes: int = 1, seed: int = 0):
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if num_buckets < 1 or num_hashes < 1:
            raise ValueError(f"num_buckets and num_hashes must be >= 1, got {num_buckets}, {num_hashes}")
        self.num_buckets, self.alpha = num_buckets, alpha
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("hash_a", torch.randint(1, _PRIME, (num_hashes, 1), generator=g))
        self.register_buffer("hash_b", torch.randint(0, _PRIME, (num_hashes, 1), generator=g))
        self.register_buffer("last_seen", torch.zeros(num_hashes, num_buckets, dtype=torch.int64))  # A
        self.register_buffer("gap", torch.zeros(num_hashes, num_buckets, dtype=torch.float64))  # B
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self._host_step: int | None = 0  # the step buffer's value, kept on the host

    def _buckets(self, item_ids: Tensor) -> Tensor:
        """(K, N) bucket of each id under each of the K hash functions."""
        ids = item_ids.reshape(1, -1).long() % _PRIME  # (1, N)
        return (self.hash_a * ids + self.hash_b) % _PRIME % self.num_buckets  # (K, N)

    @torch.no_grad()
    def update(self, item_ids: Tensor, step: int) -> None:
        """Record that ``item_ids`` were sampled at training step ``step``.

        Args:
            item_ids: (N,) int64 ids of the items in the batch (duplicates count once).
            step: the training step, >= 1 and strictly increasing from call to call.
        """
        if self._host_step is None:
            self._host_step = int(self.step)  # one read after construction or loading, not per step
        if step <= self._host_step:
            raise ValueError(f"step must increase from call to call: got {step} after {self._host_step}")
        self._host_step = step
        self.step.fill_(step)
        for k, b in enumerate(self._buckets(item_ids)):  # b: (N,) buckets, duplicates included
            interval = (step - self.last_seen[k, b]).double()  # (N,)
            old = self.gap[k, b]
            # a duplicate writes the same value twice (both computed from the same old state)
            self.gap[k, b] = torch.where(old > 0, (1 - self.alpha) * old + self.alpha * interval, interval)
            self.last_seen[k, b] = step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None  # re-read the loaded step

    def log_probability(self, item_ids: Tensor) -> Tensor:
        """(N,) float32 estimated log probability that each item appears in a batch (<= 0)."""
        buckets = self._buckets(item_ids)  # (K, N)
        gaps = torch.gather(self.gap, 1, buckets).amax(0)  # (N,)
        return -torch.log(gaps.clamp(min=1.0)).float().reshape(item_ids.shape)
