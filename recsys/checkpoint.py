"""What a Sparrow checkpoint carries besides weights; finding and checking checkpoints.

Every training checkpoint (best, periodic and ``last.ckpt``) gets, from :class:`RunInfo`:

- ``checkpoint["sparrow"]``: the fully resolved training config (plain YAML types) and a
  :class:`Fingerprint` (model class, dataset, user and item counts), so that
  ``python -m recsys.evaluate`` rebuilds the same data and model, and a checkpoint from
  another model or dataset is refused before any weight is loaded;
- the per-epoch history (train loss, validation metrics) as the callback's state, which
  Lightning restores on resume, so a resumed run's learning curve starts at epoch 0.

Nothing in it is a pickled object: checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

KEY = "sparrow"  # top-level checkpoint entry written by RunInfo


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another model or dataset."""


@dataclass(frozen=True)
class Fingerprint:
    """What must match for a checkpoint's weights to mean anything in a run.

    Args:
        model: import path of the network (``model.net._target_``).
        dataset: registered dataset name (``data.dataset``).
        num_users: users after filtering.
        num_items: items after filtering.
    """

    model: str
    dataset: str
    num_users: int
    num_items: int

    @classmethod
    def of(cls, cfg: DictConfig | Mapping[str, Any]) -> Fingerprint:
        """The fingerprint of a training config."""
        data, net = cfg["data"], cfg["model"]["net"]
        return cls(str(net["_target_"]), str(data["dataset"]), data["num_users"], data["num_items"])

    def __str__(self) -> str:
        return f"{self.model} on {self.dataset} ({self.num_users} users, {self.num_items} items)"


class RunInfo(Callback):
    """Writes the run's config and fingerprint into checkpoints and keeps per-epoch history.

    The history is recorded at the end of each training epoch, from the epoch's mean train
    loss and the validation metrics logged in that epoch (none in an epoch without validation,
    e.g. with ``check_val_every_n_epoch`` > 1); with the default checkpointing
    (validation every epoch) this happens before the epoch's checkpoints are saved, so each
    checkpoint holds the history up to and including its own epoch.

    On resume into a new run folder, the ModelCheckpoint states are re-pointed at the new
    folder, so Lightning restores their best score and top-k list instead of starting over
    (the best checkpoint may then stay in the earlier run's folder; Lightning never deletes
    files outside its own folder).

    Args:
        config: the resolved training config as plain containers.
        keys: metrics recorded each epoch besides every ``val/...`` metric.
    """

    def __init__(self, config: Mapping[str, Any], keys: tuple[str, ...] = ("train/loss",)):
        self.config = dict(config)
        self.fingerprint = Fingerprint.of(config)
        self.keys = keys
        self.history: dict[int, dict[str, float]] = {}
        self.resumed_from: list[str] = []
        self._validated = -1  # the last epoch whose validation ran

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validated = self._validated == trainer.current_epoch  # else the val/ metrics are an earlier epoch's
        row = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k in self.keys
            or (validated and k.startswith("val/") and not k.split("/")[-1].startswith("num_"))
        }
        self.history[trainer.current_epoch] = dict(sorted(row.items()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {str(e): row for e, row in self.history.items()},
            "resumed_from": self.resumed_from,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): dict(row) for e, row in state_dict.get("history", {}).items()}
        self.resumed_from = list(state_dict.get("resumed_from", []))

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[KEY] = {"config": self.config, "fingerprint": asdict(self.fingerprint)}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit":
            return
        states = checkpoint.setdefault("callbacks", {})
        mine = states.setdefault(self.state_key, {})  # read back by load_state_dict, called next
        mine["resumed_from"] = [*mine.get("resumed_from", []), str(trainer.ckpt_path)]
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
            if state is not None and cb.dirpath is not None:
                state["dirpath"] = cb.dirpath  # same folder → Lightning restores best score and top-k


def load_info(path: str | Path) -> dict[str, Any]:
    """The ``sparrow`` entry of a checkpoint (config and fingerprint), read without weights.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a Sparrow training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    info = ckpt.get(KEY) if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "fingerprint" not in info or "config" not in info:
        raise CheckpointError(f"{path} is not a Sparrow training checkpoint (it has no '{KEY}' entry)")
    info["epoch"] = int(ckpt.get("epoch", -1))
    info["history"] = {
        int(e): row
        for e, row in ckpt.get("callbacks", {}).get(RunInfo.__qualname__, {}).get("history", {}).items()
    }
    return info


def rebuild(
    info: Mapping[str, Any],
    data_dir: str | Path | None = None,
    evaluator: DictConfig | None = None,
) -> tuple[DictConfig, L.LightningDataModule, L.LightningModule]:
    """The data and (untrained) model of a checkpoint's run, from its stored training config.

    Seeds everything with the run's seed first, as training did, so the datamodule's split and
    the model's initial state are the run's. The weights are not loaded here (Lightning does it
    with ``ckpt_path=...``, or :mod:`recsys.serving` after setup).

    Args:
        info: the checkpoint's ``sparrow`` entry (:func:`load_info`).
        data_dir: read the dataset from here instead of the run's ``data.root``.
        evaluator: a config that replaces the run's evaluator (e.g. other cut-offs).

    Returns:
        (training config, datamodule, LightningModule), none of them set up.
    """
    train_cfg = OmegaConf.create(dict(info["config"]))
    with open_dict(train_cfg):
        if evaluator is not None:
            train_cfg.evaluator = evaluator
        if data_dir is not None:
            train_cfg.data.root = str(data_dir)
    L.seed_everything(train_cfg.seed, workers=True)
    datamodule = instantiate(train_cfg.data)
    model = instantiate(train_cfg.model, evaluator=instantiate(train_cfg.evaluator))
    return train_cfg, datamodule, model


def check_compatible(path: str | Path, cfg: DictConfig) -> dict[str, Any]:
    """Refuse a checkpoint whose model, dataset or network settings differ from ``cfg``'s.

    Returns:
        The checkpoint's ``sparrow`` entry (see :func:`load_info`).

    Raises:
        CheckpointError: naming what the checkpoint holds and what this run expects.
    """
    info = load_info(path)
    stored, expected = Fingerprint(**info["fingerprint"]), Fingerprint.of(cfg)
    if stored != expected:
        raise CheckpointError(f"checkpoint {path} holds {stored}, but this run trains {expected}")
    net_then, net_now = info["config"]["model"]["net"], cfg.model.net
    diff = [
        f"{k}={net_then.get(k)!r} vs {net_now.get(k)!r}" for k in net_now if net_then.get(k) != net_now.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} has other model.net settings (checkpoint vs run): {', '.join(diff)}"
        )
    return info


def find_last(runs_dir: str | Path) -> Path:
    """The newest ``<runs_dir>/*/checkpoints/last.ckpt`` (by modification time, then path).

    Raises:
        CheckpointError: no run under ``runs_dir`` has one.
    """
    found = list(Path(runs_dir).absolute().glob("*/checkpoints/last.ckpt"))
    if not found:
        raise CheckpointError(f"ckpt_path=last: no run under {runs_dir} has checkpoints/last.ckpt")
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def resolve(ckpt_path: str | None, runs_dir: str | Path) -> str | None:
    """``None`` stays ``None``; ``"last"`` becomes the newest run's ``last.ckpt``; a path must exist."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        path = find_last(runs_dir)
        log.info("ckpt_path=last resolved to %s", path)
        return str(path)
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"checkpoint {ckpt_path} does not exist")
    return str(ckpt_path)
