"""Write a trained recommender's item embeddings to a faiss index (flat or IVF).

python -m recsys.index_items ckpt_path=outputs/<task>/<run>/checkpoints/last.ckpt out=indexes/items/tt_flat
python -m recsys.index_items ckpt_path=... out=indexes/items/tt_ivf 'factory="IVF64,Flat"' nprobe=8
python -m recsys.index_items ckpt_path=... out=indexes/items/tt_ivf 'factory=[IVF64,Flat]' nprobe=8

(A factory string with a comma must be quoted for Hydra, which reads ``a,b`` as a sweep; a
list is joined with commas.)

The data and model are rebuilt from the training config stored in the checkpoint, the item
table comes from the net's ``embeddings()`` (:mod:`recsys.serving`), and the index's manifest
records the checkpoint's sha256, so ``python -m recsys.recommend index_dir=...`` refuses the index
for any other checkpoint. Only dot-product recommenders (those whose net defines
``embeddings()``) can be indexed; others are refused with a message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from omegaconf import DictConfig, ListConfig

from recsys.serving import export_item_index
from recsys.train import USER_ERRORS, ConfigError, entry_point
from retrieval.index.manifest import Manifest

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Manifest:
    """Build the index ``cfg.out`` of ``cfg.ckpt_path``'s items; return its manifest.

    Raises:
        ConfigError: ``ckpt_path`` or ``out`` missing, or ``nprobe < 1``.
        CheckpointError: a bad checkpoint, or a model without ``embeddings()``.
        IndexFormatError: ``out`` exists and ``overwrite`` is false.
    """
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=outputs/<task>/<run>/checkpoints/last.ckpt")
    if not cfg.out:
        raise ConfigError("out is required: the index directory to write, e.g. out=indexes/items/<name>")
    factory = ",".join(map(str, cfg.factory)) if isinstance(cfg.factory, ListConfig) else str(cfg.factory)
    if int(cfg.nprobe) < 1:
        raise ConfigError(f"nprobe must be >= 1, got {cfg.nprobe}")
    try:
        manifest = export_item_index(
            cfg.ckpt_path,
            cfg.out,
            factory=factory,
            nprobe=int(cfg.nprobe),
            overwrite=bool(cfg.overwrite),
            data_dir=cfg.paths.data_dir,
            train_seed=int(cfg.train_seed),
        )
    except RuntimeError as err:  # faiss's own message for a bad factory string or too few vectors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"faiss cannot build factory={factory!r}: {first}") from None
    log.info("manifest:\n%s", json.dumps(asdict(manifest), indent=2, sort_keys=True))
    log.info(
        "built %s over %d items of %s in %.2f s: %s",
        factory,
        manifest.num_docs,
        manifest.extra["dataset"],
        manifest.build_seconds,
        cfg.out,
    )
    return manifest


main = entry_point("index_items", run, USER_ERRORS)  # python -m recsys.index_items ckpt_path=... out=...


if __name__ == "__main__":
    main()
