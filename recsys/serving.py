r"""Serving a trained recommender: its embeddings, a faiss item index, ranked lists for users.

A recommender can be served when its net scores by a dot product and says so with
``net.embeddings() -> (user_emb (U, d), item_emb (I, d))`` (BPR-MF, LightGCN, LLMRec, Rel-MF,
the two-tower model): user :math:`u` ranks item :math:`i` by

.. math::

    s(u, i) = \langle e_u, e_i \rangle,

so the item table is a faiss index (:mod:`retrieval.index.faiss_index`, metric ``ip``) and the
user table its queries. ``Flat`` indexes rank exactly; ``IVF{nlist},Flat`` indexes visit
``nprobe`` of ``nlist`` k-means lists per query, faster and approximately.

An item index (:func:`export_item_index`) belongs to one checkpoint: its manifest stores the
sha256 of the checkpoint file as ``encoder_checksum`` (and the checkpoint itself as the
"corpus"), with the dataset, user and item counts in ``extra``; :func:`open_item_index` refuses
an index built from another checkpoint, naming both.

Ranking (:func:`rank`) follows Sparrow's recommender protocol (``STYLE.md``): a user's
candidates are all items minus ``exclude`` (training items; plus validation items at test
time), ties broken by item id. Through an index, each user is asked for ``k + m`` items where
``m >= |exclude_u|`` (users are grouped by ``|exclude_u|`` rounded up to ``2^b - 1``, so a few
heavy users do not lengthen everyone's search); the excluded ones are dropped and the rest
sorted by (score desc, item id asc). With a ``Flat`` index every user thus gets the same ``k``
items as the full-sort harness, up to float ties; an IVF index may return fewer than ``k + m``
items when its ``nprobe`` lists hold fewer vectors, and ``-1`` then pads the list, as in the
harness. :func:`evaluate` turns the lists into the harness's metrics (``hit_matrix`` +
``compute_metrics``, averaged over the users with :math:`|T_u| > 0`), under the evaluator's keys.

faiss and torch each keep an OpenMP thread pool; ranking alternates between them, and on a
small, shared CPU the idle pool's spin-waiting can cost more than the work (benchmarks/item_index.py
measured 15x on 2 cores). Use one thread for either (``faiss.omp_set_num_threads(1)``) or set
``OMP_WAIT_POLICY=PASSIVE`` before starting Python.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from recsys import checkpoint
from recsys.checkpoint import CheckpointError, Fingerprint
from retrieval.eval.rec_metrics import compute_metrics, mean_over_users
from retrieval.eval.topk import full_sort_topk, sort_by_score_then_id
from retrieval.eval.topk_evaluator import TopKEvaluator, hit_matrix
from retrieval.index.faiss_index import FaissSearcher, build_faiss
from retrieval.index.manifest import (
    IndexFormatError,
    Manifest,
    checksum,
    partial_dir,
    replace_directory,
    write_manifest,
)
from retrieval.types import ItemSets

log = logging.getLogger(__name__)

SOURCE = "recsys.serving"  # manifest extra["source"] of item indexes written here


@dataclass(frozen=True)
class TrainedRecommender:
    """A checkpoint's recommender, loaded for serving (CPU, eval mode, no gradients).

    Attributes:
        ckpt_path: (Path) the checkpoint file.
        checksum: (str) sha256 of that file.
        config: (DictConfig) the resolved training config stored in it.
        fingerprint: (Fingerprint) model class, dataset, user and item counts.
        epoch: (int) the checkpoint's epoch (Lightning's field).
        datamodule: the run's datamodule, set up (``train_sets``, ``targets(stage)``, ``user_ids``...).
        model: the LightningModule with the checkpoint's weights.
        user_emb: (U, d) float32 user embeddings.
        item_emb: (I, d) float32 item embeddings; ``user_emb @ item_emb.T`` are the scores.
    """

    ckpt_path: Path
    checksum: str
    config: DictConfig
    fingerprint: Fingerprint
    epoch: int
    datamodule: L.LightningDataModule
    model: L.LightningModule
    user_emb: torch.Tensor
    item_emb: torch.Tensor

    @property
    def name(self) -> str:
        """``<run name>:<checkpoint file name>``, the item index's encoder name."""
        run = self.config.get("experiment_name") or self.config.get("task_name") or "run"
        return f"{run}:{self.ckpt_path.name}"

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """(B, I) dot-product scores of ``users`` (B,) against every item."""
        return self.user_emb[users.cpu()] @ self.item_emb.T


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up lines (accelerator, tips) at WARNING while the model is set up."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_recommender(ckpt_path: str | Path, data_dir: str | Path | None = None) -> TrainedRecommender:
    """Rebuild a checkpoint's data and model, load its weights and compute the embeddings.

    The datamodule and LightningModule come from the stored training config
    (:func:`recsys.checkpoint.rebuild`, as ``python -m recsys.evaluate`` does); Lightning runs
    their ``setup`` (a test run of zero batches, so that nets built from the data, such as the
    two-tower model's, exist), then the checkpoint's ``state_dict`` is loaded strictly.

    Args:
        ckpt_path: a Sparrow training checkpoint.
        data_dir: read the dataset from here instead of the run's ``data.root``.

    Raises:
        CheckpointError: the file is missing or not a Sparrow checkpoint, or its net defines no
            ``embeddings()`` (it cannot be served through a dot-product index).
    """
    path = Path(ckpt_path)
    info = checkpoint.load_info(path)
    fingerprint = Fingerprint(**info["fingerprint"])
    config, datamodule, model = checkpoint.rebuild(info, data_dir)
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_test_batches=0,
        )
        trainer.test(model, datamodule=datamodule, verbose=False)  # setup only: no batch is run
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    user_emb, item_emb = embeddings_of(model, path)
    log.info(
        "loaded %s from %s: %d users, %d items, d=%d",
        fingerprint.model,
        path,
        user_emb.shape[0],
        item_emb.shape[0],
        item_emb.shape[1],
    )
    return TrainedRecommender(
        ckpt_path=path,
        checksum=checksum([path]),
        config=config,
        fingerprint=fingerprint,
        epoch=int(info["epoch"]),
        datamodule=datamodule,
        model=model,
        user_emb=user_emb,
        item_emb=item_emb,
    )


def embeddings_of(model: L.LightningModule, where: str | Path = "the checkpoint") -> tuple[torch.Tensor, ...]:
    """A set-up LightningModule's ``net.embeddings()`` as float32 CPU tables.

    Returns:
        (user_emb (U, d), item_emb (I, d)), float32, contiguous, detached.

    Raises:
        CheckpointError: the module has no ``net`` or its net no ``embeddings()``.
    """
    net = getattr(model, "net", None)
    if not callable(getattr(net, "embeddings", None)):
        raise CheckpointError(
            f"{where} holds a {type(net).__name__} (in {type(model).__name__}), which defines no "
            "embeddings(): only recommenders that score by a dot product of user and item embeddings "
            "(BPR-MF, LightGCN, LLMRec, Rel-MF, two-tower) can be served through an item index"
        )
    with torch.no_grad():
        user_emb, item_emb = net.embeddings()
    return tuple(t.detach().to("cpu", torch.float32).contiguous() for t in (user_emb, item_emb))


def export_item_index(
    ckpt: str | Path | TrainedRecommender,
    out_dir: str | Path,
    factory: str = "Flat",
    nprobe: int = 8,
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    train_seed: int = 0,
) -> Manifest:
    """Write a checkpoint's item embeddings to a faiss index (metric ``ip``), atomically.

    Row ``i`` of the index is item ``i`` (the model's compact item id, as the string ``"i"``).
    The manifest's ``encoder`` is the recommender's :attr:`~TrainedRecommender.name`, its
    ``encoder_checksum`` and ``corpus_checksum`` the checkpoint's sha256 (the vectors come from
    it), ``corpus`` its path; ``extra`` adds ``dataset``, ``num_users``, ``num_items``, ``model``,
    ``checkpoint_epoch`` and ``source``. The index is built in ``<out_dir>.staging`` and renamed
    into place complete (:func:`retrieval.index.manifest.replace_directory`).

    Args:
        ckpt: a checkpoint path, or one already loaded with :func:`load_recommender`.
        out_dir: the index directory.
        factory: faiss factory string: ``"Flat"`` (exact), ``"IVF{nlist},Flat"``, ``"HNSW32"``.
        nprobe: IVF lists visited per query, stored as the index's default (IVF only).
        overwrite: replace an existing ``out_dir``.
        data_dir: read the dataset from here (when ``ckpt`` is a path).
        train_seed: seed of IVF's k-means.

    Returns:
        the index's manifest.

    Raises:
        IndexFormatError: ``out_dir`` exists and ``overwrite`` is false.
        CheckpointError: as :func:`load_recommender`.
    """
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise IndexFormatError(f"{final} already exists; pass overwrite=true to rebuild it")
    served = ckpt if isinstance(ckpt, TrainedRecommender) else load_recommender(ckpt, data_dir)
    staging = final.with_name(final.name + ".staging")
    leftovers = (staging, partial_dir(staging))  # an interrupted export's, or this one's on failure
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    try:
        manifest = build_faiss(
            [str(i) for i in range(served.item_emb.shape[0])],
            served.item_emb,
            staging,
            factory=factory,
            metric="ip",
            encoder=served.name,
            encoder_checksum=served.checksum,
            tokenizer="none (item ids)",
            corpus_path=served.ckpt_path,
            overwrite=True,
            train_seed=train_seed,
            nprobe=nprobe,
        )
    except BaseException:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        raise
    extra = {
        "source": SOURCE,
        "dataset": served.fingerprint.dataset,
        "num_users": served.user_emb.shape[0],
        "num_items": served.item_emb.shape[0],
        "model": served.fingerprint.model,
        "checkpoint_epoch": served.epoch,
    }
    manifest = dataclasses.replace(manifest, extra={**manifest.extra, **extra})
    write_manifest(staging, manifest)
    replace_directory(staging, final)
    log.info("item index of %s (%s) written to %s", served.name, factory, final)
    return manifest


def open_item_index(
    index_dir: str | Path, served: TrainedRecommender, nprobe: int | None = None
) -> FaissSearcher:
    """Open an item index for ``served``'s checkpoint, refusing one built from anything else.

    Args:
        index_dir: a directory written by :func:`export_item_index`.
        served: the recommender whose users will query it.
        nprobe: IVF lists visited per query; ``None``: the index's stored default.

    Raises:
        IndexFormatError: not a finished faiss index, or built from another checkpoint (the
            message names both checkpoints and checksums), or with another item count or size.
    """
    searcher = FaissSearcher(index_dir, nprobe=nprobe)
    m = searcher.manifest
    if m.encoder_checksum != served.checksum:
        raise IndexFormatError(
            f"{index_dir} was built from checkpoint {m.corpus} ({m.encoder}, sha256 "
            f"{m.encoder_checksum[:12]}), not from {served.ckpt_path} (sha256 {served.checksum[:12]}); "
            f"rebuild it with: python -m recsys.index_items ckpt_path={served.ckpt_path} out={index_dir} "
            "overwrite=true"
        )
    num_items, dim = served.item_emb.shape
    if m.num_docs != num_items or searcher.dim != dim or searcher.metric != "ip":
        raise IndexFormatError(
            f"{index_dir} holds {m.num_docs} vectors of size {searcher.dim} ({searcher.metric}), but "
            f"{served.ckpt_path} has {num_items} items of size {dim} (ip); rebuild the index"
        )
    if searcher.doc_ids != [str(i) for i in range(num_items)]:
        raise IndexFormatError(f"{index_dir}: its rows are not items 0..{num_items - 1}; rebuild the index")
    return searcher


def rank(
    served: TrainedRecommender,
    users: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    searcher: FaissSearcher | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` candidates of ``users``, by full scoring or through an item index.

    Args:
        served: the recommender.
        users: (U,) int64 compact user ids.
        k: list length, >= 1.
        exclude: items never returned per user (e.g. ``datamodule.train_sets``), or ``None``.
        searcher: an index from :func:`open_item_index`; ``None`` scores every item
            (:func:`retrieval.eval.topk.full_sort_topk`, the harness's ranking).

    Returns:
        (scores, items): (U, k) float32 and (U, k) int64 on the CPU, by (score desc, item id
        asc); ``-1`` (score ``-inf``) pads a short list.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    users = torch.as_tensor(users, dtype=torch.int64).reshape(-1)
    if searcher is None:
        return full_sort_topk(served.score_all, users, k, exclude=exclude, progress=False)
    return _search(searcher.index, served.user_emb, users, k, exclude)


def _search(
    index: faiss.Index, user_emb: torch.Tensor, users: torch.Tensor, k: int, exclude: ItemSets | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank` through ``index``: ``k + m`` per user (``m >= |exclude_u|``), filtered, re-sorted."""
    n_users = users.numel()
    out_scores = torch.full((n_users, k), float("-inf"))  # (U, k)
    out_items = torch.full((n_users, k), -1, dtype=torch.int64)  # (U, k)
    n_excl = exclude.sizes()[users] if exclude is not None else torch.zeros(n_users, dtype=torch.int64)
    margin = torch.tensor([(1 << int(n).bit_length()) - 1 for n in n_excl.tolist()])  # (U,) >= |E_u|
    queries = user_emb[users].numpy()  # (U, d)
    for m in margin.unique().tolist():
        rows = torch.nonzero(margin == m).squeeze(1)  # (B,) positions in users
        kq = min(k + m, index.ntotal)
        scores, items = index.search(queries[rows.numpy()], kq, params=_hnsw_params(index, kq))  # (B, kq)
        scores, items = torch.from_numpy(scores), torch.from_numpy(items).to(torch.int64)
        drop = items < 0
        if exclude is not None:
            drop |= _excluded(exclude, users[rows], items)
        scores, items = scores.masked_fill(drop, float("-inf")), items.masked_fill(drop, -1)
        scores, items = sort_by_score_then_id(scores, items)  # (B, kq)
        width = min(k, kq)
        out_scores[rows, :width], out_items[rows, :width] = scores[:, :width], items[:, :width]
    return out_scores, out_items


def _excluded(exclude: ItemSets, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: ``items[b, j]`` is in ``exclude`` of ``users[b]``, reading only those users' rows.

    (:meth:`ItemSets.contains` builds keys over every stored pair: O(all pairs) per call, too slow
    for one user at a time.)

    Args:
        exclude: per-user item sets.
        users: (B,) int64 user ids.
        items: (B, n) int64 item ids; ``-1`` is never excluded.
    """
    row, excluded = exclude.rows(users)  # (E,), (E,): the users' sets as (position in users, item)
    n = exclude.num_items
    keys = row * n + excluded  # (E,) ascending: by row, then item
    if keys.numel() == 0:
        return torch.zeros(items.shape, dtype=torch.bool)
    query = torch.arange(users.numel()).unsqueeze(1) * n + items.clamp(min=0)  # (B, n)
    pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)  # (B, n)
    return (keys[pos] == query) & (items >= 0)


def _hnsw_params(index: faiss.Index, k: int) -> faiss.SearchParameters | None:
    """HNSW's efSearch raised to ``k`` (else faiss returns fewer than ``k``); ``None`` for other indexes."""
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexHNSW):
        return None
    return faiss.SearchParametersHNSW(efSearch=max(inner.hnsw.efSearch, k))


def evaluate(
    served: TrainedRecommender,
    stage: str = "test",
    searcher: FaissSearcher | None = None,
    evaluator: TopKEvaluator | None = None,
) -> dict[str, float]:
    """The harness's metrics of ``stage``, ranking by full sort or through an item index.

    Candidates are all items minus ``datamodule.exclude(stage)`` (training items; plus validation
    items at test); metrics and keys are ``evaluator``'s: ``{"test/ndcg@10": ..., "test/num_users":
    ...}``. Without ``searcher`` this is the evaluator itself on the embeddings' scores.

    Args:
        served: the recommender.
        stage: ``"val"`` or ``"test"``.
        searcher: an item index (:func:`open_item_index`), or ``None`` for full sort.
        evaluator: cut-offs and metrics; default: the training run's evaluator.

    Returns:
        metric name -> mean over the users with :math:`|T_u| > 0`, prefixed ``"<stage>/"``.
    """
    if stage not in ("val", "test"):
        raise ValueError(f"stage must be val or test, got {stage!r}")
    if evaluator is None:
        evaluator = instantiate(served.config.evaluator)
    dm, prefix = served.datamodule, f"{stage}/"
    targets, exclude = dm.targets(stage), dm.exclude(stage)
    if searcher is None:
        return evaluator(served.score_all, targets, exclude, prefix=prefix)
    users = torch.nonzero(targets.sizes() > 0).squeeze(1)  # (U,) users with targets, ascending
    _, items = rank(served, users, max(evaluator.ks), exclude, searcher)  # (U, K)
    return list_metrics(users, items, targets, evaluator, prefix)


def list_metrics(
    users: torch.Tensor, items: torch.Tensor, targets: ItemSets, evaluator: TopKEvaluator, prefix: str = ""
) -> dict[str, float]:
    """The harness's metrics of ranked lists: ``hit_matrix`` + ``compute_metrics``, averaged.

    Args:
        users: (U,) int64 user ids, each with :math:`|T_u| > 0`.
        items: (U, K) int64 ranked items, ``K >= max(evaluator.ks)``; ``-1`` pads.
        targets: the per-user target sets.
        evaluator: its ``ks``, ``metrics`` and ``compat`` are used.
        prefix: prepended to every key, e.g. ``"test/"``.

    Returns:
        ``{prefix + "ndcg@10": ..., prefix + "num_users": U}``, as :class:`TopKEvaluator` returns.
    """
    hits = hit_matrix(users, items, targets)  # (U, K)
    n_true = targets.sizes()[users]  # (U,)
    per_user = compute_metrics(hits, n_true, evaluator.ks, evaluator.metrics, evaluator.compat)
    out = {prefix + name: value for name, value in mean_over_users(per_user, n_true).items()}
    out[prefix + "num_users"] = float(users.numel())
    return out


def recall_against(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean over rows of |approx_u ∩ reference_u| / |reference_u| (``-1`` padding ignored).

    Args:
        reference: (U, K) int64 exact lists (e.g. a Flat index's).
        approx: (U, K') int64 lists to score (e.g. an IVF index's).
    """
    ref, got = reference.numpy(), approx.numpy()
    total = 0.0
    for r, a in zip(ref, got, strict=True):
        r = r[r >= 0]
        total += len(np.intersect1d(r, a[a >= 0])) / max(len(r), 1)
    return total / max(len(ref), 1)
