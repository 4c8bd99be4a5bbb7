"""Train a recommender, select it on validation, test it once, write the report.

python -m recsys.train +experiment=bpr_ml100k
python -m recsys.train +experiment=bpr_ml100k trainer.max_epochs=5 model.net.embedding_dim=32
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.data.splitters import LeakageError
from retrieval.data.errors import DataFormatError, DatasetNotFoundError
from retrieval.eval.report import metrics_table, write_report

log = logging.getLogger(__name__)


def protocol_of(cfg: DictConfig) -> dict[str, object]:
    """The evaluation protocol in words, for the report."""
    splitter = cfg.data.splitter
    split_args = {k: v for k, v in splitter.items() if not k.startswith("_")}
    compat = list(cfg.evaluator.get("compat", []))
    return {
        "dataset": cfg.data.dataset,
        "filters": [f["_target_"].rsplit(".", 1)[-1] for f in cfg.data.get("filters", [])] or "none",
        "split": f"{splitter._target_.rsplit('.', 1)[-1]} {split_args}",
        "candidates": "all items minus the user's training items (and validation items at test)",
        "metrics": "binary relevance; DCG = sum rel/log2(rank+1); IDCG over min(K, |T_u|); "
        "Recall = hits/|T_u|; users with |T_u| > 0; ties by item id",
        "compatibility modes": compat or "none",
        "model selection": f"best {cfg.callbacks.model_checkpoint.monitor} on validation; test once",
        "seed": cfg.seed,
    }


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Fit, select on validation, test once; return ``{"val": ..., "test": ...}`` metrics."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, evaluator=instantiate(cfg.evaluator))
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))

    timings: dict[str, float] = {}
    if cfg.train:
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        timings["fit"] = time.perf_counter() - start
    metrics: dict[str, dict[str, float]] = {}
    if cfg.test:
        ckpt = trainer.checkpoint_callback.best_model_path if cfg.train else cfg.ckpt_path
        log.info("selected checkpoint: %s", ckpt)
        start = time.perf_counter()
        metrics["val"] = trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
        metrics["test"] = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
        timings["evaluate"] = time.perf_counter() - start
    protocol = protocol_of(cfg) | {"selected epoch (0-based)": _epoch_of(ckpt) if cfg.test else "n/a"}

    title = cfg.get("experiment_name") or cfg.task_name
    report = write_report(out_dir, title, metrics, protocol, timings, OmegaConf.to_yaml(cfg, resolve=True))
    log.info("results (%s):\n%s", title, metrics_table(metrics))
    log.info("report written to %s", report)
    return metrics


def _epoch_of(ckpt: str | None) -> int:
    """The epoch stored in a checkpoint file (-1 if none)."""
    if not ckpt:
        return -1
    return int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (DataFormatError, DatasetNotFoundError, LeakageError) as err:
        log.error("%s", err)  # a clear one-line message, not a traceback from deep inside
        sys.exit(2)


if __name__ == "__main__":
    main()
