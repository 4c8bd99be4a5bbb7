"""Re-evaluate a training checkpoint on a split and write the same report as training.

python -m recsys.evaluate ckpt_path=outputs/bpr_ml100k/<run>/checkpoints/epoch_012.ckpt
python -m recsys.evaluate ckpt_path=... split=val
python -m recsys.evaluate ckpt_path=... evaluator=topk 'evaluator.ks=[5,10,50]'

The data, model and evaluator are rebuilt from the resolved training config stored in the
checkpoint (see :mod:`recsys.checkpoint`), so the numbers are those the training run
reported for the same checkpoint. ``evaluator=topk`` replaces the stored evaluator, e.g.
to add cut-offs; ``paths.data_dir`` overrides where the dataset is read from.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys import checkpoint
from recsys.train import USER_ERRORS, ConfigError, entry_point, protocol_of
from retrieval.eval.plots import write_figures
from retrieval.eval.report import metrics_table, write_report

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; return ``{split: {"<split>/ndcg@10": ...}}``."""
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=outputs/<task>/<run>/checkpoints/last.ckpt")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    info = checkpoint.load_info(cfg.ckpt_path)
    train_cfg, datamodule, model = checkpoint.rebuild(info, cfg.paths.data_dir, cfg.get("evaluator"))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)

    start = time.perf_counter()
    evaluate = trainer.validate if cfg.split == "val" else trainer.test
    with warnings.catch_warnings():  # the training callbacks' states are not needed to evaluate
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        metrics = {
            cfg.split: evaluate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False)[0]
        }
    timings = {"evaluate": time.perf_counter() - start}

    out_dir = Path(cfg.paths.output_dir)
    protocol = protocol_of(train_cfg) | {
        "evaluated checkpoint": str(cfg.ckpt_path),
        "checkpoint epoch (0-based)": info["epoch"],
        "re-evaluation": f"split {cfg.split}, evaluator "
        + ("from the command line" if cfg.get("evaluator") else "as in training"),
    }
    title = f"{train_cfg.get('experiment_name') or train_cfg.task_name}: {cfg.split} re-evaluation"
    monitor = train_cfg.callbacks.model_checkpoint.monitor
    figures = write_figures(out_dir, info["history"], metrics, val_key=monitor, selected=info["epoch"])
    both = {
        "evaluate": OmegaConf.to_container(cfg, resolve=True),
        "training": OmegaConf.to_container(train_cfg),
    }
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(both))
    report = write_report(
        out_dir,
        title,
        metrics,
        protocol,
        timings,
        config_yaml,
        figures=figures,
        extra={"history": info["history"]},
    )
    log.info("results (%s):\n%s", title, metrics_table(metrics))
    log.info("report written to %s", report)
    return metrics


main = entry_point("evaluate", run, USER_ERRORS)  # python -m recsys.evaluate ckpt_path=... [split=val|test]


if __name__ == "__main__":
    main()
