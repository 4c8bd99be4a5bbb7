"""SPLADE over a Hugging Face masked language model, trainable, with chunked max pooling."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from retrieval.encoders.sparse import check_texts
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
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(work, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, directory)
    log.info("saved %s model to %s", info["kind"], directory)
    return directory


def _head_keys(model: nn.Module) -> set[str]:
    """Parameter names of the LM head: outside the base model, not tied to the input embeddings."""
    prefix = model.base_model_prefix + "."
    embeddings = model.get_input_embeddings().weight
    return {
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if not name.startswith(prefix) and param is not embeddings
    }


def init_tied_identity_head(model: nn.Module) -> None:
    """Give an MLM a "tied and identity" head, for an encoder checkpoint without one.

    The vocabulary projection is tied to the input word embeddings with bias 0; every square
    linear layer of the head (the transform, e.g. BERT's ``dense``) is the identity with bias 0;
    normalisation layers get their default parameters. The logits then start as (a normalised
    nonlinearity of) the dot products of the last hidden states with the word embeddings.

    Raises:
        ValueError: the head has a non-square linear layer besides the projection.
    """
    prefix = model.base_model_prefix + "."
    decoder = model.get_output_embeddings()
    model.config.tie_word_embeddings = True
    decoder.weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name or name.startswith(prefix) or name + "." == prefix or module is decoder:
                continue
            if isinstance(module, nn.Linear):
                if module.in_features != module.out_features:
                    raise ValueError(
                        f"head layer {name} is {module.out_features}x{module.in_features}, not square"
                    )
                module.weight.copy_(torch.eye(module.in_features))
            elif hasattr(module, "reset_parameters"):  # LayerNorm and the like
                module.reset_parameters()
            for param_name, param in module.named_parameters(recurse=False):
                if param_name == "bias":
                    param.zero_()
        if decoder.bias is not None:
            decoder.bias.zero_()


def _load_masked_lm(name_or_path: str | Path):
    """``AutoModelForMaskedLM`` from a directory or hub id; a tied-identity head if it has none."""
    transformers = require_transformers()
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
    head = _head_keys(model)
    missing = head & set(info["missing_keys"])
    if missing and missing == head:
        log.info(
            "%s has no MLM head (missing %s): tied-identity head initialised", name_or_path, sorted(missing)
        )
        init_tied_identity_head(model)
    elif missing:
        log.warning("%s: MLM head partly missing, %s newly initialised", name_or_path, sorted(missing))
    else:
        log.info("%s: MLM loaded with its head", name_or_path)
    return model


class SpladeMLM(nn.Module):
    r"""SPLADE sparse representations from a Hugging Face masked language model, for training.

    Formal, Piwowarski, Clinchant. *SPLADE: Sparse Lexical and Expansion Model for First Stage
    Ranking*. SIGIR 2021. https://arxiv.org/abs/2107.05720 -- with the max pooling of SPLADE v2
    (Formal, Lassance, Piwowarski, Clinchant, https://arxiv.org/abs/2109.10086).

    The weight of vocabulary term :math:`j` for a text of tokens :math:`i = 1..L` is

    .. math::
        w_j = \max_{i \,:\, \text{not padding}} \log\bigl(1 + \mathrm{ReLU}(x_{ij})\bigr),
        \qquad x_{ij} = h_i \cdot W_j + b_j

    where :math:`h_i` is the MLM head's transformed hidden state and :math:`W, b` its output
    (decoder) layer. The logits :math:`x` are never materialised: the pooling is chunked over the
    vocabulary (:func:`~retrieval.models.pooling.splade_pool`), so memory stays ``O(B L C)``
    instead of ``O(B L V)`` in the forward and the backward pass. Works with any
    ``AutoModelForMaskedLM`` (BERT, DistilBERT, RoBERTa, ...).

    Build it with :meth:`from_pretrained`; an encoder checkpoint without an MLM head (e.g. a
    sentence-transformers ``BertModel``) gets a "tied and identity" head
    (:func:`init_tied_identity_head`).

    Args:
        model: a Hugging Face ``*ForMaskedLM`` model.
        tokenizer: its tokenizer.
        chunk_size: (int | None, default 4096) vocabulary rows per pooling chunk; ``None`` pools
            through the full logits.
        zero_special_tokens: (bool, default True) the tokenizer's special tokens (``[CLS]``,
            ``[SEP]``, ``[PAD]``, ...) get weight 0.

    Attributes:
        model: the Hugging Face model (its ``logits`` are the full MLM logits when called directly).
        tokenizer: the tokenizer.
        vocab_size: (int) ``V``, rows of the output layer.
        special_ids: (list[int]) the tokenizer's special token ids.
        token_mask: (V,) float buffer, 0 on zeroed special tokens, 1 elsewhere.
    """

    kind = "splade_mlm"

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
        self._decoder_name = output_embedding_name(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        mask, self.special_ids = special_token_mask(tokenizer, self.vocab_size, zero_special_tokens)
        self.register_buffer("token_mask", mask, persistent=False)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, chunk_size: int | None = 4096, zero_special_tokens: bool = True
    ) -> SpladeMLM:
        """Load a masked LM and its tokenizer from a directory or hub id (cache only when offline).

        Raises:
            ValueError: the directory's ``sparrow.json`` records another kind of model.
        """
        check_kind(name_or_path, cls.kind)
        tokenizer = require_transformers().AutoTokenizer.from_pretrained(name_or_path)
        return cls(_load_masked_lm(name_or_path), tokenizer, chunk_size, zero_special_tokens)

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Tokenize, truncate to ``max_length`` word-pieces (special tokens included), pad right.

        Returns:
            ``input_ids`` and ``attention_mask``, (B, L) int64 each.

        Raises:
            TypeError: ``texts`` is not a sequence of strings.
            ValueError: ``max_length < 2``.
        """
        texts = check_texts(texts)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            padding_side="right",
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """SPLADE weights of a padded batch.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) 1 for tokens, 0 for padding; the max runs over the tokens.

        Returns:
            (B, V) float32 weights, >= 0, 0 on zeroed special tokens.
        """
        hidden = output_embedding_inputs(
            self.model, self._decoder_name, input_ids=input_ids, attention_mask=attention_mask
        )  # (B, L, H)
        decoder = self.model.get_output_embeddings()
        weights = splade_pool(hidden, decoder.weight, decoder.bias, attention_mask, self.chunk_size)  # (B, V)
        return weights * self.token_mask.to(weights.device)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model, tokenizer and ``sparrow.json`` to ``directory`` (atomically)."""
        info = {"kind": self.kind, "zero_special_tokens": self.zero_special_tokens}
        return save_model_directory(directory, self.model, self.tokenizer, info)
