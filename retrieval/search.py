"""Search any index and write a TREC run: ``python -m retrieval.search index=KIND``.

    python -m retrieval.search index=bm25 dataset.name=scifact run_file=bm25.trec
    python -m retrieval.search index=impact index.query=idf dataset.path=DIR

Searches every query of the dataset's split (batched; Lucene searches use ``threads``). The
index must exist (``python -m retrieval.index`` or ``python -m retrieval.evaluate`` build it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from retrieval.cli import entry_point
from retrieval.index.manifest import read_manifest
from retrieval.pipeline import index_dir_of, load_dataset, open_search, search_all, write_run
from retrieval.types import Run

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Run:
    """Search the configured index for every query; write and return the run."""
    data = load_dataset(cfg)
    index_dir = index_dir_of(cfg, data)
    manifest = read_manifest(index_dir, cfg.index.kind)
    search, _ = open_search(cfg, index_dir, manifest, data)
    result = search_all(search, data, cfg.k, cfg.batch_size)
    path = Path(cfg.run_file) if cfg.run_file else Path(cfg.paths.output_dir) / "run.trec"
    write_run(result, path, tag=f"sparrow-{cfg.index.kind}")
    return result


main = entry_point("retrieval_search", run)

if __name__ == "__main__":
    main()
