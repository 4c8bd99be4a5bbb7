"""SPLADE over a Hugging Face masked language model, trainable, with chunked max pooling."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from retrieval.encoders.sparse import check_texts
from retrieval.models.sparse_lm import SparseLM, require_transformers

log = logging.getLogger(__name__)


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


class SpladeMLM(SparseLM):
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
    (:func:`init_tied_identity_head`). Pooling, saving and loading are those of
    :class:`~retrieval.models.sparse_lm.SparseLM`.

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

    @classmethod
    def _load_model(cls, name_or_path: str | Path) -> nn.Module:
        """``AutoModelForMaskedLM`` from a directory or hub id; a tied-identity head if it has none."""
        transformers = require_transformers()
        model, info = transformers.AutoModelForMaskedLM.from_pretrained(
            name_or_path, output_loading_info=True
        )
        head = _head_keys(model)
        missing = head & set(info["missing_keys"])
        if missing and missing == head:
            log.info(
                "%s has no MLM head (missing %s): tied-identity head initialised",
                name_or_path,
                sorted(missing),
            )
            init_tied_identity_head(model)
        elif missing:
            log.warning("%s: MLM head partly missing, %s newly initialised", name_or_path, sorted(missing))
        else:
            log.info("%s: MLM loaded with its head", name_or_path)
        return model

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
        return self._pool(attention_mask, input_ids=input_ids, attention_mask=attention_mask)
