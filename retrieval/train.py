"""Train a learned sparse retriever, save it, and evaluate it once on the test split.

    python -m retrieval.teachers dataset.name=scifact dataset.split=train      # once: negatives + teachers
    python -m retrieval.train +experiment=splade_if_scifact                     # inference-free SPLADE
    python -m retrieval.train +experiment=splade_if_scifact model.query=splade  # siamese

Steps: check the config and data (bad input fails here, before any model is loaded) -> fit
(``SparseEncoderModule``) -> keep the validation-selected (or last) weights -> save a Hugging
Face directory (+ ``idf.json`` for inference-free models) in ``<run>/model`` -> index the test
corpus with it and evaluate through ``retrieval.evaluate`` (sparse_torch: exact scores), ->
``report.md``. The saved directory is indexed by ``python -m retrieval.index`` /
``retrieval.evaluate`` with ``index.encoder.model=<run>/model`` and no special case.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval import evaluate
from retrieval.cli import ConfigError, entry_point
from retrieval.eval.report import metrics_table, write_report
from retrieval.models import load_sparse_model
from retrieval.models.idf_query import IdfQueryEncoder
from retrieval.training.data import SparseTrainingData
from retrieval.training.module import SparseEncoderModule, check_schedule

log = logging.getLogger(__name__)

QUERY_SIDES = ("idf", "ones", "splade")


def check_config(cfg: DictConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded.

    Raises:
        ConfigError: naming the key and the value.
    """
    m = cfg.module
    for key, steps in (("doc_flops", m.flops_warmup_steps), ("query_flops", m.flops_warmup_steps)):
        try:
            check_schedule(m[key], steps)
        except ValueError as err:
            raise ConfigError(f"module.{key} / module.flops_warmup_steps: {err}") from err
    if cfg.model.query not in QUERY_SIDES:
        raise ConfigError(f"model.query must be one of {', '.join(QUERY_SIDES)}, got {cfg.model.query!r}")
    if m.flops_form not in ("score", "penalty"):
        raise ConfigError(f"module.flops_form must be score or penalty, got {m.flops_form!r}")
    if cfg.model.idf_trainable and not m.idf_lr:
        raise ConfigError("model.idf_trainable=true needs module.idf_lr > 0")
    if cfg.model.query == "splade" and (cfg.model.idf_trainable or cfg.model.idf_file):
        raise ConfigError("model.idf_trainable / model.idf_file apply to inference-free queries only")


def query_side(cfg: DictConfig, net, data: SparseTrainingData) -> IdfQueryEncoder | None:
    """The inference-free query encoder of ``cfg.model.query`` (None: siamese).

    ``idf``: the table of ``model.idf_file``, else BM25 IDF fitted on the training corpus with
    the backbone's tokenizer; ``ones``: every word-piece weighs 1 (the plain-FLOPS baseline).

    Raises:
        ConfigError: the IDF file does not match the backbone's tokenizer.
    """
    kind = cfg.model.query
    if kind == "splade":
        return None
    backbone = str(cfg.model.backbone)
    trainable = bool(cfg.model.idf_trainable)
    if cfg.model.idf_file:
        try:
            encoder = IdfQueryEncoder.from_file(backbone, cfg.model.idf_file, trainable=trainable)
        except ValueError as err:
            raise ConfigError(f"model.idf_file: {err}") from err
    else:
        encoder = IdfQueryEncoder.fit(
            backbone, data.corpus_texts, max_length=cfg.module.doc_max_length, trainable=trainable
        )
    if kind == "ones":  # the same tokenizer and saved format, every word-piece weighing 1
        with torch.no_grad():
            encoder.idf.fill_(1.0)
    if encoder.idf.shape[0] != net.vocab_size:
        raise ConfigError(
            f"the IDF table has {encoder.idf.shape[0]} entries; "
            f"the backbone's vocabulary has {net.vocab_size}"
        )
    return encoder


def selected_weights(module: SparseEncoderModule, trainer: L.Trainer) -> str:
    """Load the validation-selected checkpoint's weights into ``module``; say which it was."""
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None and callback.monitor else ""
    if not best:
        return f"last (epoch {trainer.current_epoch - 1}, step {trainer.global_step})"
    # this run's own checkpoint; its hyper-parameters hold the optimizer partial (not weights-only)
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    return f"best {callback.monitor} = {float(callback.best_model_score):.4f} ({Path(best).name})"


def evaluation_config(cfg: DictConfig, model_dir: Path, out_dir: Path) -> DictConfig:
    """The ``retrieval.evaluate`` config for the saved model on ``cfg.evaluate.split``."""
    ev = cfg.evaluate
    index = OmegaConf.to_container(cfg.index, resolve=True)
    index["encoder"]["model"] = str(model_dir)
    index["encoder"]["max_length"] = cfg.module.doc_max_length  # index documents as they were trained
    index["query"] = "splade" if cfg.model.query == "splade" else "idf"
    node = {
        "paths": {**OmegaConf.to_container(cfg.paths, resolve=True), "output_dir": str(out_dir / "test")},
        "dataset": {**OmegaConf.to_container(cfg.dataset, resolve=True), "split": ev.split},
        "index": index,
        "index_dir": str(out_dir / "test_index"),
        "overwrite": False,
        **{key: ev[key] for key in ("k", "threads", "batch_size", "shard_size", "measures", "mrr_cutoff")},
        "drop_self_hits": ev.drop_self_hits,
        "latency_queries": ev.latency_queries,
        "task_name": cfg.task_name,
    }
    return OmegaConf.create(node)


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Check, fit, save, evaluate on test once; returns ``{"val": ..., "test": ...}``."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    data: SparseTrainingData = instantiate(cfg.data)
    data.prepare()  # bad training pairs / teacher files fail here, before the model loads
    net = load_sparse_model(str(cfg.model.backbone), chunk_size=cfg.model.chunk_size)
    module: SparseEncoderModule = instantiate(cfg.module, net=net, query_encoder=query_side(cfg, net, data))
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    no_validation = {} if data.val is not None else {"limit_val_batches": 0}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger), **no_validation
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    timings = {"fit": time.perf_counter() - start}
    metrics: dict[str, dict[str, float]] = {}
    if not trainer.is_global_zero:
        return metrics
    selected = selected_weights(module, trainer)
    model_dir = module.save_model(out_dir / "model")
    if data.val is not None:
        metrics["val"] = {
            k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()
        }
    docs_seen = trainer.global_step * data.batch_size * (1 + data.negatives)
    train_stats = {"train_docs_per_s": docs_seen / timings["fit"], "train_steps": trainer.global_step}
    if cfg.evaluate.split:
        start = time.perf_counter()
        metrics["test"] = evaluate.run(evaluation_config(cfg, model_dir, out_dir))
        timings["evaluate"] = time.perf_counter() - start
    metrics["train"] = train_stats
    protocol = {
        "training data": f"{data.training!r}; teachers {data.teachers or 'none'} (S={data.teacher_scale}) "
        f"from {data.teacher_file}",
        "query side": {
            "idf": "inference-free, IDF",
            "ones": "inference-free, unit weights",
            "splade": "siamese",
        }[cfg.model.query],
        "model selection": selected,
        "saved model": str(model_dir),
        "test": f"split {cfg.evaluate.split}, evaluated once by retrieval.evaluate (sparse_torch, exact)",
        "seed": cfg.seed,
    }
    title = cfg.get("experiment_name") or cfg.task_name
    write_report(out_dir, title, metrics, protocol, timings, OmegaConf.to_yaml(cfg, resolve=True))
    log.info("results (%s):\n%s", title, metrics_table(metrics))
    return metrics


main = entry_point("retrieval_train", run)

if __name__ == "__main__":
    main()
