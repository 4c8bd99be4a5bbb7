"""SPLADE over a decoder-only causal LM, reading the text twice ("echo" input)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from retrieval.encoders.sparse import check_texts
from retrieval.models.sparse_lm import SparseLM, require_transformers

log = logging.getLogger(__name__)


def _start_token_id(tokenizer) -> int:
    """The token that opens an echo input: bos, else cls, else eos.

    Raises:
        ValueError: the tokenizer has none of them.
    """
    for token_id in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has no bos, cls or eos token to open the echo input with")


class SpladeEcho(SparseLM):
    r"""SPLADE sparse representations from a decoder-only causal LM with echo inputs, for training.

    Doshi, Kumar, Murthy, Vamsikrishna, Lal. *Mistral-SPLADE: LLMs for better Learned Sparse
    Retrieval*. 2024. https://arxiv.org/abs/2408.11119 -- with the echo input of Springer,
    Kotha, Fried, Neubig, Raghunathan. *Repetition Improves Language Model Embeddings*. 2024.
    https://arxiv.org/abs/2402.15449.

    A causal LM's state at position :math:`i` has only seen tokens :math:`\le i`. The text is
    therefore given twice, ``[bos] t_1..t_n t_1..t_n``, and pooled over the positions
    :math:`P` of the second copy only, where the model has seen the whole text:

    .. math::
        w_j = \max_{i \in P} \log\bigl(1 + \mathrm{ReLU}(h_i \cdot W_j + b_j)\bigr)

    with :math:`h_i` the final hidden state and :math:`W, b` the LM head
    (``get_output_embeddings()``), pooled chunk-wise over the vocabulary
    (:func:`~retrieval.models.pooling.splade_pool`). Each copy holds at most
    ``(max_length - 1) // 2`` word-pieces. Batches are padded on the right, so that the positions
    of the tokens do not depend on the padding; an empty text is pooled over its ``[bos]``.
    Tokenizers without a pad token pad with eos. Pooling, saving and loading are those of
    :class:`~retrieval.models.sparse_lm.SparseLM`.

    Args:
        model: a Hugging Face ``*ForCausalLM`` model.
        tokenizer: its tokenizer; ``[bos]`` is its bos token (else cls, else eos).
        chunk_size: (int | None, default 4096) vocabulary rows per pooling chunk; ``None`` pools
            through the full logits.
        zero_special_tokens: (bool, default True) the tokenizer's special tokens get weight 0.

    Attributes:
        model: the Hugging Face model.
        tokenizer: the tokenizer.
        vocab_size: (int) ``V``, rows of the LM head.
        special_ids: (list[int]) the tokenizer's special token ids.
        token_mask: (V,) float buffer, 0 on zeroed special tokens, 1 elsewhere.
        start_id: (int) the id of ``[bos]``.
        pad_id: (int) the id padding is filled with.
    """

    kind = "splade_echo"

    def __init__(
        self, model: nn.Module, tokenizer, chunk_size: int | None = 4096, zero_special_tokens: bool = True
    ):
        super().__init__(model, tokenizer, chunk_size, zero_special_tokens)
        self.start_id = _start_token_id(tokenizer)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.info("the tokenizer has no pad token: padding with eos %r", tokenizer.eos_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.start_id

    @classmethod
    def _load_model(cls, name_or_path: str | Path) -> nn.Module:
        """``AutoModelForCausalLM`` from a directory or hub id."""
        model = require_transformers().AutoModelForCausalLM.from_pretrained(name_or_path)
        log.info("%s: causal LM loaded for echo SPLADE", name_or_path)
        return model

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Echo inputs ``[bos] text text``, each copy truncated to ``(max_length - 1) // 2`` pieces.

        Returns:
            ``input_ids`` (B, L) int64 padded on the right, ``attention_mask`` (B, L) int64,
            ``pool_mask`` (B, L) bool: True on the second copy (on ``[bos]`` for an empty text).

        Raises:
            TypeError: ``texts`` is not a sequence of strings.
            ValueError: ``max_length < 3``.
        """
        texts = check_texts(texts)
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([bos] and two copies), got {max_length}")
        pieces = (
            self.tokenizer(
                texts,
                add_special_tokens=False,
                truncation=True,
                max_length=(max_length - 1) // 2,
                return_attention_mask=False,
                verbose=False,
            )["input_ids"]
            if texts
            else []
        )
        width = max((1 + 2 * len(p) for p in pieces), default=1)
        input_ids = torch.full((len(texts), width), self.pad_id, dtype=torch.int64)  # (B, L)
        attention_mask = torch.zeros(len(texts), width, dtype=torch.int64)  # (B, L)
        pool_mask = torch.zeros(len(texts), width, dtype=torch.bool)  # (B, L)
        for row, copy in enumerate(pieces):
            n = len(copy)
            input_ids[row, : 1 + 2 * n] = torch.tensor([self.start_id, *copy, *copy], dtype=torch.int64)
            attention_mask[row, : 1 + 2 * n] = 1
            pool_mask[row, 1 + n : 1 + 2 * n] = True
            if n == 0:
                pool_mask[row, 0] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor
    ) -> torch.Tensor:
        """SPLADE weights of a batch from :meth:`tokenize`.

        Args:
            input_ids: (B, L) token ids, padded on the right.
            attention_mask: (B, L) 1 for tokens, 0 for padding.
            pool_mask: (B, L) the positions pooled over (the second copy).

        Returns:
            (B, V) float32 weights, >= 0, 0 on zeroed special tokens.
        """
        pooled = pool_mask.bool() & attention_mask.bool()  # (B, L)
        return self._pool(pooled, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
