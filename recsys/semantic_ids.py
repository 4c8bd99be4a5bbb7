r"""Semantic IDs for generative recommendation: residual k-means codes per item and a prefix trie over them.

Every item gets a tuple of codes :math:`(c^1, \dots, c^L)` from residual k-means (RQ-k-means) over its
embedding, plus one suffix token that numbers the items sharing a tuple, so that every item has a
unique tuple of ``L + 1`` tokens a decoder can generate. :class:`SemanticIds` keeps them (with the
dataset item ids of its rows, where they came from and their collision statistics) in one file,
written atomically; :class:`~recsys.code_trie.CodeTrie` turns them into per-step masks of valid next
tokens for constrained beam search, optionally forbidding items (those already in a generated list).

Deng et al. "OneRec: Unifying Retrieve and Rank with Generative Recommender and Iterative Preference
Alignment". 2025. https://arxiv.org/abs/2502.18965 (residual k-means semantic IDs; OneRec balances its
clusters, this module runs plain Lloyd iterations); Kong et al. "MiniOneRec". 2025.
https://arxiv.org/abs/2510.24431 (RQ-k-means as an open baseline); Rajput et al. "Recommender Systems
with Generative Retrieval" (TIGER). NeurIPS 2023. https://arxiv.org/abs/2305.05065 (the extra token
that makes colliding tuples unique; constrained decoding over valid IDs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_FILE_KEYS = ("codes", "codebook_size", "suffix_size", "levels", "source", "item_ids", "stats")
_STATS_KEYS = ("collision_rate", "max_collisions", "utilisation", "suffix_size")


# ---------------------------------------------------------------------------------------------------------
# residual k-means
# ---------------------------------------------------------------------------------------------------------


def _sq_distances(x: Tensor, x_sq: Tensor, centroids: Tensor) -> Tensor:
    r"""(I, K) squared distances :math:`\lVert x_i \rVert^2 - 2 x_i^\top C_k + \lVert C_k \rVert^2` (>= 0).

    Args:
        x: (I, d) points; x_sq: (I,) their squared norms; centroids: (K, d).
    """
    d = x_sq.unsqueeze(1) - 2 * x @ centroids.T + (centroids * centroids).sum(1)  # (I, K)
    return d.clamp_(min=0)


def _assign(x: Tensor, x_sq: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every point (lowest index on ties).

    Returns:
        (codes, dist): (I,) int64 and (I,) float32 squared distance to that centroid.
    """
    dist, codes = _sq_distances(x, x_sq, centroids).min(1)  # (I,), (I,)
    return codes, dist


def _kmeans_pp_init(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator) -> Tensor:
    r"""k-means++ seeding: the first centre uniformly, each next one with probability :math:`\propto D(x)^2`.

    Arthur, Vassilvitskii. "k-means++: The Advantages of Careful Seeding". SODA 2007.

    Args:
        x: (I, d) float32 points with at least ``k`` distinct rows; x_sq: (I,) their squared norms.
        k: number of centres.
        gen: the CPU generator every draw comes from.

    Returns:
        (k, d) centres, rows of ``x``.
    """
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = _sq_distances(x, x_sq, x[chosen]).squeeze(1)  # (I,) squared distance to the nearest chosen centre
    for _ in range(k - 1):
        weights = d2.cpu().double()
        if weights.sum() > 0:
            nxt = int(torch.multinomial(weights, 1, generator=gen))
        else:  # numerically no point is left uncovered: fall back to a uniform draw
            nxt = int(torch.randint(n, (1,), generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, _sq_distances(x, x_sq, x[[nxt]]).squeeze(1))
    return x[chosen].clone()  # (k, d)


def _balanced_assign(x: Tensor, x_sq: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Equal-size assignment (OneRec's balanced k-means): cluster k, in turn, takes the nearest of the
    points still free, ``ceil(free / clusters left)`` of them, so sizes differ by at most one.

    Returns:
        (codes, dist): (I,) int64 and (I,) squared distance to the assigned centroid.
    """
    d = _sq_distances(x, x_sq, centroids)  # (I, K)
    n, k = d.shape
    codes = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    free = torch.ones(n, dtype=torch.bool, device=x.device)
    for c in range(k):
        take = -(-int(free.sum()) // (k - c))
        nearest = d[:, c].masked_fill(~free, float("inf")).topk(take, largest=False).indices
        codes[nearest] = c
        free[nearest] = False
    return codes, d.gather(1, codes.unsqueeze(1)).squeeze(1)


def _update_centroids(x: Tensor, codes: Tensor, dist: Tensor, k: int) -> Tensor:
    """One Lloyd update: each centroid moves to the mean of its points.

    An empty cluster is re-seeded on the point farthest from its own centroid (the next farthest for a
    second empty cluster, and so on), so no centroid is left stranded.

    Args:
        x: (I, d) points; codes: (I,) their clusters; dist: (I,) squared distance to their centroid.
        k: number of clusters.

    Returns:
        (k, d) new centroids.
    """
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, codes, x)  # (k, d)
    counts = torch.bincount(codes, minlength=k)  # (k,)
    centroids = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)  # (k, d)
    empty = (counts == 0).nonzero().squeeze(1)  # (E,)
    if empty.numel():
        farthest = dist.topk(min(empty.numel(), x.shape[0])).indices  # (E,)
        centroids[empty[: farthest.numel()]] = x[farthest]
    return centroids


def _kmeans(
    x: Tensor, k: int, iters: int, gen: torch.Generator, balanced: bool = False
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from a k-means++ seeding, stopping early once no assignment changes.

    Args:
        x: (I, d) float32 points with at least ``k`` distinct rows.
        balanced: assign by :func:`_balanced_assign` (equal cluster sizes) instead of the nearest centroid.

    Returns:
        (codes, centroids): (I,) int64 cluster of each point (nearest centroid, or balanced) and the
        (k, d) centroids.
    """
    assign = _balanced_assign if balanced else _assign
    x_sq = (x * x).sum(1)  # (I,)
    centroids = _kmeans_pp_init(x, x_sq, k, gen)  # (k, d)
    previous = None
    for _ in range(iters):
        codes, dist = assign(x, x_sq, centroids)
        if previous is not None and torch.equal(codes, previous):
            break
        previous = codes
        centroids = _update_centroids(x, codes, dist, k)
    codes, _ = assign(x, x_sq, centroids)
    return codes, centroids


def residual_kmeans(
    x: Tensor, levels: int, codebook_size: int, iters: int = 20, seed: int = 0, balanced: bool = False
) -> tuple[Tensor, list[Tensor]]:
    r"""Residual k-means (RQ-k-means): k-means on the embeddings, then on what each level leaves over.

    OneRec (Deng et al. 2025, https://arxiv.org/abs/2502.18965); MiniOneRec (Kong et al. 2025,
    https://arxiv.org/abs/2510.24431).

    .. math::
        r_i^{1} = x_i, \qquad
        c_i^{l} = \arg\min_k \lVert r_i^{l} - C^{l}_k \rVert^2, \qquad
        r_i^{l+1} = r_i^{l} - C^{l}_{c_i^{l}}

    with :math:`C^l` the centroids of Lloyd's k-means on :math:`\{r_i^l\}` (k-means++ seeding, empty
    clusters re-seeded on the point farthest from its centroid, at most ``iters`` iterations). A level
    whose residuals have fewer than ``codebook_size`` distinct rows runs with k = that number; its unused
    centroid rows are zero and no item gets their codes.

    Args:
        x: (I, d) float item embeddings, finite (computed in float32).
        levels: L >= 1 code levels.
        codebook_size: K >= 2 codes per level.
        iters: Lloyd iterations per level (>= 1).
        seed: seeds the one ``torch.Generator`` every random draw comes from (the same seed, the same codes).
        balanced: equal-size clusters at every level (OneRec's balanced k-means, :func:`_balanced_assign`):
            plain k-means on near-isotropic residuals tends to one large cluster and many tiny ones, and
            the tuples collide.

    Returns:
        (codes, centroids): (I, L) int64 codes and L centroid tensors of shape (K, d), float32.
    """
    if x.dim() != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a non-empty (I, d) float tensor, got {tuple(x.shape)} {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x has NaN or infinite entries")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(seed)
    residual = x.float()  # (I, d)
    codes, codebooks = [], []
    for _ in range(levels):
        k = min(codebook_size, torch.unique(residual, dim=0).shape[0])
        level_codes, centroids = _kmeans(residual, k, iters, gen, balanced)  # (I,), (k, d)
        centroids = torch.cat([centroids, centroids.new_zeros(codebook_size - k, x.shape[1])])  # (K, d)
        residual = residual - centroids[level_codes]
        codes.append(level_codes)
        codebooks.append(centroids)
    return torch.stack(codes, dim=1), codebooks  # (I, L), L x (K, d)


# ---------------------------------------------------------------------------------------------------------
# collisions
# ---------------------------------------------------------------------------------------------------------


def _groups(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Group rows with equal tuples.

    Returns:
        (group, sizes): (I,) int64 group of each row and (G,) int64 size of each group.
    """
    _, group, sizes = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return group, sizes


def disambiguate(codes: Tensor) -> Tensor:
    """Append a suffix column numbering the items that share a code tuple, so every row is unique.

    Rajput et al. (TIGER), NeurIPS 2023, https://arxiv.org/abs/2305.05065: the j-th item (in row
    order) with a given tuple gets suffix j - 1; an item whose tuple is its own gets 0. The column is
    always appended, so every item has the same number of tokens.

    Args:
        codes: (I, L) int64.

    Returns:
        (I, L+1) int64, the first L columns equal to ``codes``.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (I, L), got shape {tuple(codes.shape)}")
    if codes.shape[0] == 0:
        return codes.new_zeros(0, codes.shape[1] + 1)
    group, sizes = _groups(codes)  # (I,), (G,)
    order = torch.argsort(group, stable=True)  # (I,) rows grouped, row order inside a group
    starts = torch.cumsum(sizes, 0) - sizes  # (G,) first position of each group in ``order``
    suffix = torch.empty_like(group)
    suffix[order] = torch.arange(order.numel(), device=codes.device) - starts[group[order]]
    return torch.cat([codes, suffix.unsqueeze(1)], dim=1)  # (I, L+1)


@dataclass(frozen=True)
class CodeStats:
    """How well L-level codes separate items (before the suffix).

    Attributes:
        collision_rate: share of items whose tuple another item shares too.
        max_collisions: size of the largest group of items with one tuple (1: no collision).
        utilisation: per level, distinct codes used / codebook size.
        suffix_size: tokens the suffix needs, max suffix + 1 (= ``max_collisions``).
    """

    collision_rate: float
    max_collisions: int
    utilisation: tuple[float, ...]
    suffix_size: int


def code_stats(codes: Tensor, codebook_size: int) -> CodeStats:
    r"""Collision and utilisation statistics of (I, L) codes before :func:`disambiguate`.

    .. math::
        \text{collision rate} = \frac{1}{I} \sum_i [\,|\{j : c_j = c_i\}| > 1\,], \qquad
        \text{utilisation}_l = \frac{|\{c_i^l\}_i|}{K}
    """
    if codes.dim() != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be a non-empty (I, L) tensor, got shape {tuple(codes.shape)}")
    group, sizes = _groups(codes)
    largest = int(sizes.max())
    return CodeStats(
        collision_rate=float((sizes[group] > 1).float().mean()),
        max_collisions=largest,
        utilisation=tuple(torch.unique(col).numel() / codebook_size for col in codes.T),
        suffix_size=largest,
    )


# ---------------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------------


def _save_atomically(obj: dict, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _examples(ids: Tensor, n: int = 5) -> list[int]:
    return ids[:n].tolist()


@dataclass
class SemanticIds:
    """Every item's semantic ID: L residual k-means codes and a suffix that makes it unique.

    Attributes:
        codes: (I, L+1) int64, row r the tokens of item ``item_ids[r]``; column l < L in [0, K),
            the last column in [0, suffix_size).
        codebook_size: K, codes per level.
        suffix_size: values the suffix column takes.
        levels: L.
        source: where the embeddings came from, e.g. ``"text:all-MiniLM-L6-v2"`` or ``"checkpoint:<sha>"``.
        item_ids: (I,) int64 dataset item ids, in the order of the rows.
        stats: collision statistics of the L-level codes.
    """

    codes: Tensor
    codebook_size: int
    suffix_size: int
    levels: int
    source: str
    item_ids: Tensor
    stats: CodeStats

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.shape[1] != self.levels + 1:
            raise ValueError(
                f"codes must be (I, levels + 1) = (I, {self.levels + 1}), got {tuple(self.codes.shape)}"
            )
        if self.item_ids.shape != (self.codes.shape[0],):
            raise ValueError(
                f"item_ids must be ({self.codes.shape[0]},) like the rows of codes, "
                f"got {tuple(self.item_ids.shape)}"
            )

    @property
    def num_items(self) -> int:
        """I, the rows."""
        return self.codes.shape[0]

    @property
    def depth(self) -> int:
        """Tokens per item, L + 1."""
        return self.levels + 1

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Vocabulary of each token position: (K,) * L + (suffix_size,)."""
        return (self.codebook_size,) * self.levels + (self.suffix_size,)

    @classmethod
    def build(
        cls,
        embeddings: Tensor,
        item_ids: Tensor,
        levels: int,
        codebook_size: int,
        source: str,
        seed: int = 0,
        iters: int = 20,
        balanced: bool = False,
    ) -> SemanticIds:
        """Codes from :func:`residual_kmeans`, statistics from :func:`code_stats`, suffix from
        :func:`disambiguate`; logs the collision rate and the utilisation.

        Args:
            embeddings: (I, d) float, finite, row r for item ``item_ids[r]``.
            item_ids: (I,) int64 distinct dataset item ids.
            levels, codebook_size, seed, iters, balanced: as :func:`residual_kmeans`.
            source: where the embeddings came from.
        """
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if embeddings.dim() != 2 or not embeddings.is_floating_point():
            raise ValueError(
                f"embeddings must be a 2-D float tensor (I, d), "
                f"got {tuple(embeddings.shape)} {embeddings.dtype}"
            )
        if item_ids.dim() != 1 or item_ids.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"item_ids must be 1-D with one id per embedding row ({embeddings.shape[0]}), "
                f"got shape {tuple(item_ids.shape)}"
            )
        if torch.unique(item_ids).numel() != item_ids.numel():
            raise ValueError("item_ids has duplicates")
        if not torch.isfinite(embeddings).all():
            bad = (~torch.isfinite(embeddings)).any(1).nonzero().squeeze(1)
            raise ValueError(
                f"embeddings have NaN or infinite entries in {bad.numel()} rows "
                f"(items {_examples(item_ids[bad])})"
            )
        codes, _ = residual_kmeans(embeddings, levels, codebook_size, iters, seed, balanced)  # (I, L)
        stats = code_stats(codes, codebook_size)
        log.info(
            "semantic IDs from %s: %d items, %d levels x %d codes, collision rate %.3f (largest group %d), "
            "utilisation %s",
            source,
            codes.shape[0],
            levels,
            codebook_size,
            stats.collision_rate,
            stats.max_collisions,
            ", ".join(f"{u:.2f}" for u in stats.utilisation),
        )
        return cls(
            codes=disambiguate(codes),
            codebook_size=codebook_size,
            suffix_size=stats.suffix_size,
            levels=levels,
            source=source,
            item_ids=item_ids.long(),
            stats=stats,
        )

    def save(self, path: str | Path) -> None:
        """Write a plain dict to ``path`` atomically (``torch.load(weights_only=True)`` reads it back)."""
        state = {key: getattr(self, key) for key in _FILE_KEYS}
        state["stats"] = asdict(self.stats) | {"utilisation": list(self.stats.utilisation)}
        _save_atomically(state, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: naming the file, when it is no semantic-ID file or lacks a field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no semantic-ID file")
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a semantic-ID file (a {type(state).__name__}, not a dict)")
        missing = [key for key in _FILE_KEYS if key not in state]
        if missing:
            raise ValueError(f"{path}: not a semantic-ID file, missing {missing}")
        stats = state["stats"]
        missing = [key for key in _STATS_KEYS if not isinstance(stats, dict) or key not in stats]
        if missing:
            raise ValueError(f"{path}: semantic-ID stats missing {missing}")
        stats = CodeStats(
            **{key: stats[key] for key in _STATS_KEYS} | {"utilisation": tuple(stats["utilisation"])}
        )
        try:
            return cls(**{key: state[key] for key in _FILE_KEYS} | {"stats": stats})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def check_items(self, item_ids: Tensor, path_hint: str = "") -> None:
        """Refuse semantic IDs that do not cover exactly these dataset items.

        Args:
            item_ids: (n,) int64 the dataset's item ids.
            path_hint: the file, named in the message.

        Raises:
            ValueError: saying how many items are missing and how many extra, with up to 5 ids of each.
        """
        item_ids = item_ids.to(self.item_ids.device)
        missing = item_ids[~torch.isin(item_ids, self.item_ids)]  # dataset items without an ID
        extra = self.item_ids[~torch.isin(self.item_ids, item_ids)]  # IDs of items the dataset lacks
        if missing.numel() or extra.numel():
            where = f"{path_hint}: " if path_hint else ""
            raise ValueError(
                f"{where}semantic IDs ({self.source}) do not cover exactly the dataset's {item_ids.numel()} "
                f"items: {missing.numel()} missing (e.g. {_examples(missing)}), "
                f"{extra.numel()} extra (e.g. {_examples(extra)}); rebuild them for this dataset"
            )


# ---------------------------------------------------------------------------------------------------------
# from a datamodule
# ---------------------------------------------------------------------------------------------------------

SOURCES = ("text", "collaborative", "checkpoint")


def checkpoint_vectors(ckpt_path: str | Path, item_ids: Tensor, data_dir: str | Path | None = None) -> Tensor:
    """(I, d) item embeddings of a trained dot-product recommender (e.g. LightGCN), in ``item_ids`` order.

    The checkpoint must be of the same dataset (the same item id space); items it does not know get
    zero vectors (counted, warned). Its training interactions are not checked against the caller's
    split: a checkpoint trained on a split whose training part holds the caller's validation or
    test interactions leaks them into the codes.
    """
    from recsys.serving import load_recommender

    rec = load_recommender(ckpt_path, data_dir)
    known = rec.datamodule.item_ids  # (I',) dataset ids of the checkpoint's rows
    order = known.argsort()
    pos = torch.searchsorted(known[order], item_ids).clamp(max=known.numel() - 1)
    row = order[pos]
    found = known[row] == item_ids
    vectors = torch.where(found.unsqueeze(1), rec.item_emb[row], 0.0)
    if not found.all():
        log.warning(
            "%s knows %d of the %d items; the others get zero vectors (they will share codes)",
            ckpt_path,
            int(found.sum()),
            item_ids.numel(),
        )
    log.warning(
        "semantic IDs from %s (%s): make sure its training data holds none of this run's validation or "
        "test interactions",
        ckpt_path,
        rec.fingerprint.model,
    )
    return vectors


def for_datamodule(
    datamodule,
    source: str = "text",
    levels: int = 3,
    codebook_size: int = 64,
    seed: int = 0,
    dim: int = 64,
    balanced: bool = True,
    path: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> SemanticIds:
    """Semantic IDs of a :class:`~recsys.data.sequences.SequenceDataModule`'s items.

    Args:
        datamodule: set up; its rows are the items (``item_ids`` are the dataset's ids).
        source: ``"text"``: the items' title vectors (all-MiniLM-L6-v2, ``metadata.text``);
            ``"collaborative"``: co-occurrence in the training rows only (PPMI + SVD,
            :func:`recsys.data.item_vectors.cooccurrence_vectors`) next to the metadata one-hots
            (:func:`~recsys.data.item_vectors.metadata_vectors`), which place the items that never
            occur in training; ``"checkpoint"``: the item embeddings of ``checkpoint``, a trained
            LightGCN (or any dot-product recommender) of the same dataset
            (:func:`checkpoint_vectors`).
        levels: residual k-means levels.
        codebook_size: codes per level.
        seed: k-means (and SVD) seed.
        dim: width of the collaborative vectors.
        balanced: equal-size clusters (OneRec's balanced k-means; see :func:`residual_kmeans`).
        path: optional file: loaded (and checked against the items) when it exists, else written.
        checkpoint: the ``"checkpoint"`` source's training checkpoint.
    """
    from recsys.data.item_vectors import cooccurrence_vectors, metadata_vectors

    if source not in SOURCES:
        raise ValueError(f"semantic_ids.source must be one of {SOURCES}, got {source!r}")
    item_ids = datamodule.item_ids
    if path is not None and Path(path).exists():
        ids = SemanticIds.load(path)
        ids.check_items(item_ids, str(path))
        if (ids.levels, ids.codebook_size) != (levels, codebook_size):
            raise ValueError(
                f"{path}: {ids.levels} levels x {ids.codebook_size} codes, but the config asks for "
                f"{levels} x {codebook_size}; delete the file or match the config"
            )
        return ids
    meta = datamodule.metadata
    if source == "text":
        if meta.text is None:
            raise ValueError(
                f"{datamodule.dataset} has no item text for semantic_ids.source=text; "
                "use source=collaborative"
            )
        vectors, name = meta.text, "text:all-MiniLM-L6-v2"
    elif source == "checkpoint":
        if checkpoint is None:
            raise ValueError(
                "semantic_ids.source=checkpoint needs semantic_ids.checkpoint=<a training checkpoint of a "
                "dot-product recommender, e.g. LightGCN, on the same dataset>"
            )
        vectors, name = checkpoint_vectors(checkpoint, item_ids), f"checkpoint:{Path(checkpoint).name}"
    else:
        collab = cooccurrence_vectors(datamodule.train_rows, datamodule.num_items, dim, seed=seed)
        vectors, name = torch.cat([collab, metadata_vectors(meta)], 1), "collaborative:ppmi-svd+metadata"
    ids = SemanticIds.build(vectors, item_ids, levels, codebook_size, name, seed=seed, balanced=balanced)
    if path is not None:
        ids.save(path)
    return ids
