"""Recommendation data: readers (polars), filters, splitters and DataModules."""

from recsys.data.diginetica import SessionData
from recsys.data.filters import implicit, k_core
from recsys.data.registry import DATASETS, SESSION_DATASETS, load_interactions, load_sessions
from recsys.data.splitters import (
    LeakageError,
    Split,
    leave_one_out,
    predefined_split,
    random_split,
    temporal_split,
)
from recsys.data.tables import InteractionData

__all__ = [
    "DATASETS",
    "SESSION_DATASETS",
    "InteractionData",
    "LeakageError",
    "SessionData",
    "Split",
    "implicit",
    "k_core",
    "leave_one_out",
    "load_interactions",
    "load_sessions",
    "predefined_split",
    "random_split",
    "temporal_split",
]
