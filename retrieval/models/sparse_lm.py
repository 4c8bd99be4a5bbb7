"""The part every trainable SPLADE model shares: pooling an LM's vocabulary projection, saving, loading."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Self

import torch
from torch import nn

from retrieval.index.manifest import replace_directory
from retrieval.models.pooling import output_embedding_inputs, output_embedding_name, splade_pool

log = logging.getLogger(__name__)

SPARROW_INFO = "sparrow.json"  # written beside the weights: {"kind": ..., ...}


def require_transformers():
    """The ``transformers`` module, imported lazily with an install hint."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("SPLADE models need Hugging Face transformers: pip install transformers") from err
    return transformers


def read_sparrow_info(name_or_path: str | Path) -> dict | None:
    """The ``sparrow.json`` of a local model directory, or None (a hub id, or no such file).

    Raises:
        ValueError: the file is not a JSON object with a string ``kind``.
    """
    path = Path(name_or_path).expanduser() / SPARROW_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
        raise ValueError(f"{path}: expected a JSON object with a string 'kind'")
    return info


def check_kind(name_or_path: str | Path, kind: str) -> None:
    """Refuse a directory whose ``sparrow.json`` records another kind of model."""
    info = read_sparrow_info(name_or_path)
    if info is not None and info["kind"] != kind:
        raise ValueError(
            f"{name_or_path} holds a {info['kind']!r} model, not {kind!r}; "
            "load it with retrieval.models.load_sparse_model"
        )


def special_token_mask(
    tokenizer, vocab_size: int, zero_special_tokens: bool
) -> tuple[torch.Tensor, list[int]]:
    """``(mask, special_ids)``: (V,) float, 0 on the tokenizer's special tokens (when zeroing), else 1.

    Special ids beyond the model's vocabulary (tokens added to the tokenizer only) are ignored.
    """
    special = sorted(i for i in set(tokenizer.all_special_ids) if i is not None and 0 <= i < vocab_size)
    mask = torch.ones(vocab_size)
    if zero_special_tokens:
        mask[special] = 0.0
    return mask, special


def save_model_directory(directory: str | Path, model, tokenizer, info: dict) -> Path:
    """Write a Hugging Face model, its tokenizer and ``sparrow.json`` to ``directory`` atomically.

    Everything is written to ``<directory>.tmp`` first, then renamed; an existing ``directory``
    is replaced only once the new one is complete.

    Returns:
        the directory.
    """
    directory = Path(directory)
    work = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    (work / SPARROW_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    replace_directory(work, directory)
    log.info("saved %s model to %s", info["kind"], directory)
    return directory


class SparseLM(nn.Module):
    r"""SPLADE weights pooled from a Hugging Face LM's output embeddings: the common base of
    :class:`~retrieval.models.splade_mlm.SpladeMLM` and :class:`~retrieval.models.splade_echo.SpladeEcho`.

    Formal, Lassance, Piwowarski, Clinchant. *SPLADE v2: Sparse Lexical and Expansion Model for
    Information Retrieval*. 2021. https://arxiv.org/abs/2109.10086. The weight of vocabulary
    term :math:`j` is

    .. math::
        w_j = m_j \max_{i \in P} \log\bigl(1 + \mathrm{ReLU}(h_i \cdot W_j + b_j)\bigr)

    where :math:`h_i` is the hidden state fed to the output embeddings :math:`W, b` at position
    :math:`i`, :math:`m_j` is 0 on zeroed special tokens and 1 elsewhere, and :math:`P` are the
    pooled positions, which a subclass picks in its ``forward`` (the tokens of an MLM input, the
    second copy of an echo input) and hands to :meth:`_pool`; the pooling is chunked over the
    vocabulary (:func:`~retrieval.models.pooling.splade_pool`). A subclass also sets ``kind``
    (recorded in ``sparrow.json``), loads its Hugging Face model in :meth:`_load_model` and
    defines ``tokenize``.

    Args:
        model: a Hugging Face LM with output embeddings (``get_output_embeddings()``).
        tokenizer: its tokenizer.
        chunk_size: (int | None, default 4096) vocabulary rows per pooling chunk; ``None`` pools
            through the full logits.
        zero_special_tokens: (bool, default True) the tokenizer's special tokens get weight 0.

    Attributes:
        kind: (str) the model kind written to ``sparrow.json``, one per subclass.
        model: the Hugging Face model.
        tokenizer: the tokenizer.
        vocab_size: (int) ``V``, rows of the output embeddings.
        special_ids: (list[int]) the tokenizer's special token ids.
        token_mask: (V,) float buffer, 0 on zeroed special tokens, 1 elsewhere.
    """

    kind: str

    def __init__(
        self, model: nn.Module, tokenizer, chunk_size: int | None = 4096, zero_special_tokens: bool = True
    ):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.zero_special_tokens = zero_special_tokens
        self._head_name = output_embedding_name(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        mask, self.special_ids = special_token_mask(tokenizer, self.vocab_size, zero_special_tokens)
        self.register_buffer("token_mask", mask, persistent=False)

    @classmethod
    def _load_model(cls, name_or_path: str | Path) -> nn.Module:
        """The Hugging Face model of a directory or hub id; each subclass loads its own kind of LM."""
        raise NotImplementedError(f"{cls.__name__} does not define _load_model")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, chunk_size: int | None = 4096, zero_special_tokens: bool = True
    ) -> Self:
        """Load the LM (:meth:`_load_model`) and its tokenizer from a directory or hub id.

        Only the local cache is read when offline (``HF_HUB_OFFLINE=1``).

        Raises:
            ValueError: the directory's ``sparrow.json`` records another kind of model.
        """
        check_kind(name_or_path, cls.kind)
        tokenizer = require_transformers().AutoTokenizer.from_pretrained(name_or_path)
        return cls(cls._load_model(name_or_path), tokenizer, chunk_size, zero_special_tokens)

    def _pool(self, pool_mask: torch.Tensor, **inputs) -> torch.Tensor:
        """SPLADE weights over the positions ``pool_mask`` of the model run on ``inputs``.

        Args:
            pool_mask: (B, L) bool or 0/1, the positions :math:`P` pooled over; each row needs one.
            inputs: the model's keyword inputs (``input_ids``, ``attention_mask``, ...).

        Returns:
            (B, V) float32 weights, >= 0, 0 on zeroed special tokens.
        """
        hidden = output_embedding_inputs(self.model, self._head_name, **inputs)  # (B, L, H)
        head = self.model.get_output_embeddings()
        weights = splade_pool(hidden, head.weight, head.bias, pool_mask, self.chunk_size)  # (B, V)
        return weights * self.token_mask.to(weights.device)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model, tokenizer and ``sparrow.json`` to ``directory`` (atomically)."""
        info = {"kind": self.kind, "zero_special_tokens": self.zero_special_tokens}
        return save_model_directory(directory, self.model, self.tokenizer, info)
