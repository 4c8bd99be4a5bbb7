"""Print the top-K items a trained recommender gives some users, with their titles.

python -m recsys.recommend ckpt_path=outputs/two_tower_ml1m/<run>/checkpoints/last.ckpt 'users=[0,1,2]'
python -m recsys.recommend ckpt_path=... 'users=[0,1,2]' k=20 index_dir=indexes/items/tt_ivf nprobe=16

``users`` are the dataset's user ids (the contiguous ids of :mod:`recsys.data.registry`'s reader,
``0..num_users-1``; the ids in the dataset's own files are shown beside them as "raw id"). Each
user's candidates are every item they did not interact with in training; the list comes from
scoring every item (default) or from an item index written by ``python -m recsys.index_items``
for the same checkpoint (``index_dir=...``; an index of another checkpoint is refused). Items are
shown with their dataset id, raw id, score and title (the dataset's item side information; the
raw id when it has no titles). The table goes to stdout, the log to the run folder.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import polars as pl
import torch
from omegaconf import DictConfig

from recsys.data.registry import load_interactions
from recsys.serving import TrainedRecommender, load_recommender, open_item_index, rank
from recsys.train import USER_ERRORS, ConfigError, entry_point

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[int, list[tuple[int, float, str]]]:
    """Rank ``cfg.k`` items for each of ``cfg.users`` and write them as a table to stdout.

    Returns:
        dataset user id -> ``[(dataset item id, score, title), ...]``, best first.

    Raises:
        ConfigError: missing ``ckpt_path``, no ``users``, ``k < 1``, or a user id the run does not have.
        CheckpointError, IndexFormatError: a bad checkpoint, or an index of another checkpoint.
    """
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=outputs/<task>/<run>/checkpoints/last.ckpt")
    if not cfg.users:
        raise ConfigError("users is required: dataset user ids, e.g. 'users=[0,1,2]'")
    if int(cfg.k) < 1:
        raise ConfigError(f"k must be >= 1, got {cfg.k}")
    users = _user_ids(cfg.users)
    served = load_recommender(cfg.ckpt_path, cfg.paths.data_dir)
    compact = compact_users(served, users)  # (U,)
    searcher = open_item_index(cfg.index_dir, served, nprobe=cfg.nprobe) if cfg.index_dir else None
    train_sets = served.datamodule.train_sets
    scores, items = rank(served, compact, int(cfg.k), exclude=train_sets, searcher=searcher)  # (U, k)
    raw_users, raw_items, titles = labels(served)
    dataset_items = served.datamodule.item_ids  # (I,) dataset id of each compact item id
    factory = searcher.manifest.extra.get("factory") if searcher else None
    how = f"through the {factory} index {cfg.index_dir}" if searcher else "every item scored"
    lines = [f"{served.name} on {served.fingerprint.dataset}: top {cfg.k} items per user, {how}", ""]
    out: dict[int, list[tuple[int, float, str]]] = {}
    for user, cu, row_scores, row_items in zip(users, compact.tolist(), scores, items, strict=True):
        n_train = int(train_sets.sizes()[cu])
        lines.append(f"user {user} (raw id {raw_users[cu]}): {n_train} training items excluded")
        lines.append(f"{'rank':>4}  {'item':>6}  {'raw id':>8}  {'score':>8}  title")
        ranked = []
        for pos, (s, i) in enumerate(zip(row_scores.tolist(), row_items.tolist(), strict=True), 1):
            if i < 0:  # fewer candidates than k
                break
            item = int(dataset_items[i])
            lines.append(f"{pos:>4}  {item:>6}  {raw_items[i]:>8}  {s:>8.4f}  {titles[i]}")
            ranked.append((item, float(s), titles[i]))
        out[user] = ranked
        lines.append("")
    sys.stdout.write("\n".join(lines))
    sys.stdout.flush()
    return out


def _user_ids(value: object) -> list[int]:
    """``users=5`` or ``users=[5,6]`` as a list of ints."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"users must be integer dataset user ids, e.g. 'users=[0,1]': {value}") from None


def compact_users(served: TrainedRecommender, users: list[int]) -> torch.Tensor:
    """(U,) int64 model user ids of dataset user ids ``users``.

    Raises:
        ConfigError: some id is not a user of the run (listing the valid ids).
    """
    dataset_ids = served.datamodule.user_ids.tolist()  # compact id -> dataset id, ascending
    position = {u: i for i, u in enumerate(dataset_ids)}
    unknown = [u for u in users if u not in position]
    if unknown:
        n = len(dataset_ids)
        contiguous = dataset_ids == list(range(dataset_ids[0], dataset_ids[0] + n))
        valid = f"{dataset_ids[0]}..{dataset_ids[-1]}" + ("" if contiguous else f" (not all: {n} users kept)")
        raise ConfigError(
            f"unknown user id(s) {', '.join(map(str, unknown))}; {served.fingerprint.dataset} users in "
            f"this run have dataset ids {valid}"
        )
    return torch.tensor([position[u] for u in users], dtype=torch.int64)


def labels(served: TrainedRecommender) -> tuple[list[str], list[str], list[str]]:
    """Display labels, by compact id: (users' raw ids, items' raw ids, item titles).

    Titles come from the dataset's item side information (column ``title``); without it, an
    item's title is its raw id.
    """
    data = load_interactions(served.fingerprint.dataset, root=served.config.data.get("root"))
    dm = served.datamodule

    def by_id(frame: pl.DataFrame, key: str, column: str, ids: torch.Tensor) -> list[str | None]:
        table = dict(zip(frame[key].to_list(), frame[column].to_list(), strict=True))
        return [None if table.get(i) is None else str(table[i]) for i in ids.tolist()]

    raw_users = [r or "?" for r in by_id(data.user_map, "user", "raw_id", dm.user_ids)]
    raw_items = [r or "?" for r in by_id(data.item_map, "item", "raw_id", dm.item_ids)]
    features = data.item_features
    if features is None or "title" not in features.columns:
        return raw_users, raw_items, raw_items
    titles = by_id(features, "item", "title", dm.item_ids)
    return raw_users, raw_items, [t or raw for t, raw in zip(titles, raw_items, strict=True)]


main = entry_point("recommend", run, USER_ERRORS)  # python -m recsys.recommend ckpt_path=... 'users=[0,1]'


if __name__ == "__main__":
    main()
