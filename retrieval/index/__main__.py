"""Index-building job: ``python -m retrieval.index +index=bm25|impact|sparse_torch|sparse_gpu|faiss``.

    python -m retrieval.index +index=bm25 dataset.name=scifact
    python -m retrieval.index +index=impact dataset.path=/data/beir/fiqa index.scale=50
    python -m retrieval.index +index=faiss dataset.path=DIR index.factory=HNSW32 overwrite=true

Writes ``<paths.indexes_dir>/<dataset>/<kind>`` (or ``index_dir=...``) with its manifest. The
build happens in ``<dir>.partial`` and is renamed at the end; an interrupted encoding resumes
from its last finished shard when the same command is run again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from omegaconf import DictConfig

from retrieval.cli import ConfigError, entry_point
from retrieval.pipeline import build_index, index_dir_of, load_dataset

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Build the index; returns its manifest as a dict."""
    if "index" not in cfg:
        raise ConfigError(
            "choose an index: +index=bm25, +index=impact, +index=sparse_torch, +index=sparse_gpu "
            "or +index=faiss"
        )
    data = load_dataset(cfg)
    index_dir = index_dir_of(cfg, data)
    manifest = build_index(cfg, data, index_dir, overwrite=cfg.overwrite)
    summary = {k: v for k, v in asdict(manifest).items() if k != "extra"}
    log.info("manifest of %s:\n%s", index_dir, json.dumps(summary, indent=2))
    return asdict(manifest)


main = entry_point("retrieval_index", run)

if __name__ == "__main__":
    main()
