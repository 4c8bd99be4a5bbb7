"""Trainable learned-sparse models: SPLADE over masked LMs, echo SPLADE over causal LMs, IDF queries.

:func:`load_sparse_model` opens any of the SPLADE kinds from a directory or hub id.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.models.pooling import splade_pool
from retrieval.models.sparse_lm import read_sparrow_info, require_transformers
from retrieval.models.splade_echo import SpladeEcho
from retrieval.models.splade_mlm import SpladeMLM

__all__ = ["SpladeEcho", "SpladeMLM", "load_sparse_model", "splade_pool"]

MODEL_KINDS = {cls.kind: cls for cls in (SpladeMLM, SpladeEcho)}


def _kind_from_config(name_or_path: str | Path) -> str:
    """``splade_echo`` for a decoder-only config (``is_decoder``, a ``*ForCausalLM``), else ``splade_mlm``."""
    config = require_transformers().AutoConfig.from_pretrained(name_or_path)
    architectures = getattr(config, "architectures", None) or []
    causal = getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in architectures)
    return SpladeEcho.kind if causal else SpladeMLM.kind


def load_sparse_model(
    name_or_path: str | Path, chunk_size: int | None = 4096, zero_special_tokens: bool = True
) -> SpladeMLM | SpladeEcho:
    """Load a SPLADE model: the kind in its ``sparrow.json``, else guessed from its Hugging Face config.

    Args:
        name_or_path: (str | Path) a local model directory or a hub id.
        chunk_size: (int | None, default 4096) vocabulary rows per pooling chunk.
        zero_special_tokens: (bool, default True) special tokens get weight 0.

    Raises:
        ValueError: ``sparrow.json`` names an unknown kind.
    """
    info = read_sparrow_info(name_or_path)
    kind = info["kind"] if info is not None else _kind_from_config(name_or_path)
    if kind not in MODEL_KINDS:
        raise ValueError(f"{name_or_path}: unknown sparse model kind {kind!r}; known: {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind].from_pretrained(name_or_path, chunk_size, zero_special_tokens)
