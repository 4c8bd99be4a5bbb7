"""Helpers shared by the recsys end-to-end tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from recsys.data.diginetica import SessionData

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


def sessions_like(events: list[tuple[int, int, int, int]], categories: list[int | None]) -> SessionData:
    """Synthetic sessions: (session, item, time, day) rows in the given order."""
    sessions, items, times, days = (list(c) for c in zip(*events, strict=True))
    n_sessions, n_items = max(sessions) + 1, len(categories)
    ev = pl.DataFrame(
        {
            "session": sessions,
            "item": items,
            "user": [None] * len(items),
            "time": times,
            "date": [dt.date(2016, 1, 1) + dt.timedelta(days=d) for d in days],
        },
        schema_overrides={"user": pl.Int64},
    )
    return SessionData(
        name="synthetic-sessions",
        events=ev,
        num_sessions=n_sessions,
        num_items=n_items,
        session_map=pl.DataFrame(
            {"raw_id": [str(s) for s in range(n_sessions)], "session": range(n_sessions)}
        ),
        item_map=pl.DataFrame({"raw_id": [str(i) for i in range(n_items)], "item": range(n_items)}),
        item_features=pl.DataFrame(
            {"item": range(n_items), "category": categories}, schema_overrides={"category": pl.Int64}
        ),
    )
