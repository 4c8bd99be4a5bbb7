"""Train a recommender, select it on validation, test it once, write the report.

python -m recsys.train +experiment=bpr_ml100k
python -m recsys.train +experiment=bpr_ml100k trainer.max_epochs=5 model.net.embedding_dim=32
python -m recsys.train +experiment=bpr_ml100k ckpt_path=last   # resume the newest run of the task

``ckpt_path=last`` means the newest ``<paths.runs_dir>/*/checkpoints/last.ckpt`` (by
modification time; ``paths.runs_dir`` is ``outputs/<task_name>``), not Lightning's
"last of this run". A resumed run writes into its own new run folder; its report covers
every epoch since the first run (the history travels in the checkpoint).
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from recsys import checkpoint
from recsys.checkpoint import CheckpointError, RunInfo
from recsys.data.splitters import LeakageError
from retrieval.cli import USER_ERRORS as CLI_ERRORS
from retrieval.cli import ConfigError, entry_point
from retrieval.eval.plots import write_figures
from retrieval.eval.report import metrics_table, write_report

log = logging.getLogger(__name__)


# errors of the user's input: one line on the log and exit code 2, no traceback
USER_ERRORS = (*CLI_ERRORS, LeakageError, CheckpointError)


def check_model_config(cfg: DictConfig) -> None:
    """Every ``model`` field named ``*_dim`` or ``num_*`` must be a positive integer.

    Raises:
        ConfigError: naming the key and the value.
    """

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            value, name = node[key], f"{prefix}.{key}"
            if isinstance(value, DictConfig):
                walk(value, name)
            elif str(key).endswith("_dim") or str(key).startswith("num_"):
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    walk(cfg.model, "model")


SPARSE_MODULE = "recsys.lit.pairwise.PairwiseRecommender"  # the recipe that takes model.sparsity


def check_sparsity_config(cfg: DictConfig) -> None:
    """``model.sparsity`` (DSL), when set, must be valid and fit the net's embedding tables.

    Builds the sparsity object (its own argument checks) and plans it on the net built on the
    ``meta`` device (shapes only, no memory), so a bad density or a schedule that cannot fit a
    table is refused before any data is read.

    Raises:
        ConfigError: naming ``model.sparsity`` and what is wrong.
    """
    node = cfg.model.get("sparsity")
    if node is None:
        return
    if cfg.model.get("_target_") != SPARSE_MODULE:
        raise ConfigError(f"model.sparsity is only supported by {SPARSE_MODULE} models (bpr_mf, lightgcn)")
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    try:
        sparsity = get_class(node._target_)(**kwargs)
        with torch.device("meta"):
            net = instantiate(cfg.model.net)
        sparsity.plan(net)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.sparsity: {err}") from None


def peak_memory_gib() -> dict[str, float]:
    """Peak memory so far, GiB: the process's resident set and, on a GPU, the tensors allocated
    since the last ``torch.cuda.reset_peak_memory_stats`` (``cuda_allocated``)."""
    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if torch.cuda.is_available():
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


def protocol_of(cfg: DictConfig) -> dict[str, object]:
    """The evaluation protocol in words, for the report."""
    compat = list(cfg.evaluator.get("compat", []))
    data = _data_protocol(cfg.data)
    return {
        "dataset": cfg.data.dataset,
        **data,
        "metrics": "binary relevance; DCG = sum rel/log2(rank+1); IDCG over min(K, |T_u|); "
        "Recall = hits/|T_u|; users with |T_u| > 0; ties by item id",
        "compatibility modes": compat or "none",
        "model selection": _selection_rule(cfg.callbacks.model_checkpoint.monitor),
        "seed": cfg.seed,
    }


def _args(node: DictConfig) -> str:
    return (
        f"{node._target_.rsplit('.', 1)[-1]} { ({k: v for k, v in node.items() if not k.startswith('_')}) }"
    )


def _data_protocol(data: DictConfig) -> dict[str, object]:
    if "propensity" in data:
        return _mnar_protocol(data)
    if "max_len" in data:
        return _sequence_protocol(data)
    return _split_protocol(data)


def _sequence_protocol(data: DictConfig) -> dict[str, object]:
    h = data.get("horizon", 1)
    if data.split != "leave_one_out":
        split = (
            f"whole sessions by start time: last {data.test_share:g} test, the {data.val_share:g} before "
            "validation; every prefix of an evaluated session predicts its next item"
        )
    elif h == 1:
        split = "leave-one-out per sequence (last item test, second-to-last validation)"
    else:
        split = f"leave-{h}-out per sequence (the last {h} items test, the {h} before validation)"
    session = {
        "session": f"session/: each row's next {h} items (up to {h} in a session) against a list of {h}"
    }
    return (session if h > 1 else {}) | {
        "split": split,
        "sequences": f"chronological, last {data.max_len} items kept, left-padded",
        "cold items": f"{data.cold_share:g} of the items (seed {data.seed}) removed from training; "
        "test/cold/: test rows whose target is one of them",
        "candidates": "all items; the history is not masked (sequential convention); one target per row",
    }


def _split_protocol(data: DictConfig) -> dict[str, object]:
    return {
        "filters": [f["_target_"].rsplit(".", 1)[-1] for f in data.get("filters", [])] or "none",
        "split": _args(data.splitter),
        "candidates": "all items minus the user's training items (and validation items at test)",
    }


def _mnar_protocol(data: DictConfig) -> dict[str, object]:
    return {
        "split": f"train on the MNAR ratings (clicks: rating >= {data.threshold}); each user's MAR items "
        f"split {data.val_fraction:g} validation / rest test (seed {data.seed}); pairs in both parts: "
        f"{data.overlap}",
        "training": f"{data.training}; propensity {_args(data.propensity)}",
        "candidates": "full ranking: all items minus the user's MNAR-rated items (and validation MAR items "
        "at test); mar/: the user's MAR items of the stage only",
    }


def _side_information(datamodule: L.LightningDataModule) -> dict[str, object]:
    """Where LLMRec's side information came from and how much of it fell back (none: empty)."""
    aug = getattr(datamodule, "augmentation", None)
    if aug is None:
        return {}
    fell_back = {task: sum(reasons.values()) for task, reasons in aug.fallbacks.items()}
    return {
        "side information": f"{aug.provider}; {aug.pairs.shape[0]} augmented pairs; users/items that fell "
        f"back to no augmentation, per task: {fell_back} (by reason: {aug.fallbacks})"
    }


def _semantic_ids(model: L.LightningModule) -> dict[str, object]:
    """How a generative model's semantic IDs came out (none: empty)."""
    ids = getattr(model, "semantic", None)
    if ids is None:
        return {}
    st = ids.stats
    used = ", ".join(f"{u:.2f}" for u in st.utilisation)
    return {
        "semantic IDs": f"{ids.source}; {ids.levels} levels x {ids.codebook_size} codes + a suffix of up to "
        f"{ids.suffix_size}; items sharing their level codes: {st.collision_rate:.3f} (largest group "
        f"{st.max_collisions}); codebook utilisation per level {used}"
    }


def _selection_rule(monitor: str | None) -> str:
    if monitor is None:
        return "none (fixed budget): the last checkpoint is tested, once"
    return f"best {monitor} on validation; test once"


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Fit, select on validation, test once; return ``{"val": ..., "test": ...}`` metrics."""
    check_model_config(cfg)
    check_sparsity_config(cfg)
    ckpt_path = checkpoint.resolve(cfg.ckpt_path, cfg.paths.runs_dir)
    if ckpt_path is not None:
        checkpoint.check_compatible(ckpt_path, cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, evaluator=instantiate(cfg.evaluator))
    run_info = RunInfo(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [run_info]  # null: off
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))

    timings: dict[str, float] = {}
    if cfg.train:
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        timings["fit"] = time.perf_counter() - start
    peak = peak_memory_gib()
    # read before validate/test: loading the selected checkpoint restores its (shorter) history
    history, resumed_from = dict(run_info.history), list(run_info.resumed_from)
    if not cfg.train and ckpt_path is not None:
        history = checkpoint.load_info(ckpt_path)["history"]
    metrics: dict[str, dict[str, float]] = {}
    ckpt = None
    if cfg.test:
        ckpt = _selected_checkpoint(trainer) if cfg.train else ckpt_path
        log.info("selected checkpoint: %s", ckpt)
        start = time.perf_counter()
        val = trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics |= {"val": val[0]} if val else {}  # no validation data: nothing to report
        metrics["test"] = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
        timings["evaluate"] = time.perf_counter() - start
    selected = _epoch_of(ckpt) if cfg.test else -1
    protocol = (
        protocol_of(cfg)
        | {
            "selected epoch (0-based)": selected if cfg.test else "n/a",
            "selected checkpoint": ckpt or "n/a",
            "resumed from": ", ".join(resumed_from) or "no (a fresh run)",
        }
        | _side_information(datamodule)
        | _semantic_ids(model)
    )

    title = cfg.get("experiment_name") or cfg.task_name
    monitor = cfg.callbacks.model_checkpoint.monitor
    figures = write_figures(out_dir, history, metrics, val_key=monitor, selected=selected)
    report = write_report(
        out_dir,
        title,
        metrics,
        protocol,
        timings,
        OmegaConf.to_yaml(cfg, resolve=True),
        figures=figures,
        extra={"history": history, "peak_memory_gib": peak},
    )
    log.info("results (%s):\n%s", title, metrics_table(metrics))
    log.info("report written to %s", report)
    return metrics


def _selected_checkpoint(trainer: L.Trainer) -> str:
    """The best checkpoint on the monitored validation metric; the last one when nothing is
    monitored (a fixed epoch budget)."""
    callback = trainer.checkpoint_callback
    path = callback.best_model_path if callback.monitor else callback.last_model_path
    if not path:
        raise ConfigError("training saved no checkpoint to test; check callbacks.model_checkpoint")
    return path


def _epoch_of(ckpt: str | None) -> int:
    """The 0-based epoch whose weights a checkpoint holds (-1 if none).

    Lightning's ``epoch`` field is the 0-based epoch for checkpoints saved during validation
    but the count of finished epochs for those saved after an epoch ended (``last.ckpt`` of
    a run without validation); the epoch-progress counter tells them apart: the weights are
    those of the last *started* epoch.
    """
    if not ckpt:
        return -1
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["started"]) - 1
    except (KeyError, TypeError):
        return int(state.get("epoch", -1))


main = entry_point("train", run, USER_ERRORS)


if __name__ == "__main__":
    main()
