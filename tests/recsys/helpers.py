"""Helpers shared by the recsys end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(config_name: str, out: Path, overrides: list[str]) -> DictConfig:
    """The composed root config ``config_name`` with its run folder at ``out`` (runs dir: its parent)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.runs_dir = str(out.parent)
    return cfg
