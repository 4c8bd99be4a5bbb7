"""Recommendation data: readers (polars), filters, splitters, samplers and DataModules.

The public names below load on first use (PEP 562), so that importing a torch-only module
such as ``recsys.data.sampling`` does not import polars.
"""

from importlib import import_module

_EXPORTS = {
    "SessionData": "recsys.data.diginetica",
    "implicit": "recsys.data.filters",
    "k_core": "recsys.data.filters",
    "DATASETS": "recsys.data.registry",
    "SESSION_DATASETS": "recsys.data.registry",
    "load_interactions": "recsys.data.registry",
    "load_sessions": "recsys.data.registry",
    "LeakageError": "recsys.data.splitters",
    "Split": "recsys.data.splitters",
    "leave_one_out": "recsys.data.splitters",
    "predefined_split": "recsys.data.splitters",
    "random_split": "recsys.data.splitters",
    "temporal_split": "recsys.data.splitters",
    "InteractionData": "recsys.data.tables",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'recsys.data' has no attribute {name!r}")
