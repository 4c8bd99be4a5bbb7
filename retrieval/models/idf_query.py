r"""The query side of inference-free SPLADE as a module: IDF-weighted bags of word-pieces.

Geng, Ru, Lin et al. *Towards Competitive Search Relevance For Inference-Free Learned Sparse
Representations*. 2024. https://arxiv.org/abs/2411.04403. Documents are encoded by a SPLADE
model; a query is only tokenized, its vector

.. math::
    q_j = \mathrm{idf}_j \cdot \mathbb{1}[\,j \text{ is a non-special word-piece of the query}\,]

and the score is :math:`q \cdot d`. With ``trainable=True`` the IDF table is a parameter learned
jointly with the document encoder. The table's file format is the one of
:class:`~retrieval.encoders.inference_free.InferenceFreeQueryEncoder` (``idf.json``), whose
``encode`` gives the same vectors as this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from retrieval.encoders.inference_free import InferenceFreeQueryEncoder
from retrieval.encoders.sparse import check_texts

IDF_FILE = "idf.json"


class IdfQueryEncoder(nn.Module):
    r"""Queries as IDF-weighted binary bags of their distinct word-pieces.

    .. math::
        q_j = \max(\mathrm{idf}_j, 0) \cdot \mathbb{1}[\exists i : t_i = j,\ t_i \notin S]

    where :math:`t_i` are the query's non-padding tokens and :math:`S` the special tokens.
    Build it with :meth:`fit` (BM25 IDF over a corpus) or :meth:`from_file` (a saved
    ``idf.json``); both attach the tokenizer that :meth:`tokenize` uses.

    Args:
        idf: (torch.Tensor) (V,) IDF per vocabulary id, finite and >= 0.
        special_ids: (list[int]) token ids that never get weight (the tokenizer's special tokens).
        trainable: (bool, default False) ``idf`` is an ``nn.Parameter`` (kept >= 0 by clamping
            in :meth:`forward`); otherwise a buffer.

    Attributes:
        idf: (V,) parameter or buffer.
        tokenizer: the Hugging Face tokenizer, or None when built from a tensor.
        tokenizer_name: (str | None) its name (a directory's absolute path, or the hub id).
        num_docs: (int | None) documents the table was fitted on, as recorded in ``idf.json``.
        doc_max_length: (int | None) document truncation used when fitting, as recorded.
        vocab_size: (int) ``V``.
    """

    def __init__(self, idf: torch.Tensor, special_ids: list[int], trainable: bool = False):
        super().__init__()
        idf = torch.as_tensor(idf, dtype=torch.float32).detach().clone()
        if idf.dim() != 1:
            raise ValueError(f"idf must be (V,), got shape {tuple(idf.shape)}")
        if not torch.isfinite(idf).all() or (idf < 0).any():
            raise ValueError("idf values must be finite and >= 0")
        bad = [i for i in special_ids if not 0 <= i < len(idf)]
        if bad:
            raise ValueError(f"special_ids {bad[:10]} are outside the vocabulary [0, {len(idf)})")
        if trainable:
            self.idf = nn.Parameter(idf)
        else:
            self.register_buffer("idf", idf)
        special = torch.zeros(len(idf), dtype=torch.bool)
        special[list(special_ids)] = True
        self.register_buffer("special", special, persistent=False)  # (V,)
        self.vocab_size = len(idf)
        self.tokenizer = None
        self.tokenizer_name: str | None = None
        self.num_docs: int | None = None
        self.doc_max_length: int | None = None

    @classmethod
    def _from_encoder(cls, encoder: InferenceFreeQueryEncoder, trainable: bool) -> IdfQueryEncoder:
        module = cls(encoder.idf, encoder.special_ids.tolist(), trainable)
        module.tokenizer, module.tokenizer_name = encoder.tokenizer, encoder.tokenizer_name
        module.num_docs, module.doc_max_length = encoder.num_docs, encoder.max_length
        return module

    @classmethod
    def from_file(cls, tokenizer_path: str | Path, idf_json_path: str | Path, trainable: bool = False):
        """Load an ``idf.json`` for a tokenizer (:meth:`InferenceFreeQueryEncoder.load`).

        Raises:
            ValueError: not a Sparrow IDF table, or fitted with another tokenizer's vocabulary.
        """
        return cls._from_encoder(InferenceFreeQueryEncoder.load(tokenizer_path, idf_json_path), trainable)

    @classmethod
    def fit(
        cls,
        tokenizer_path: str | Path,
        corpus_texts: Sequence[str],
        max_length: int | None = 256,
        trainable: bool = False,
    ) -> IdfQueryEncoder:
        """BM25 IDF over a corpus (:meth:`InferenceFreeQueryEncoder.fit`).

        Args:
            tokenizer_path: (str | Path) the document encoder's tokenizer.
            corpus_texts: the documents.
            max_length: (int | None, default 256) word-pieces per document counted; None: all.
            trainable: (bool, default False) learn the table.
        """
        encoder = InferenceFreeQueryEncoder.fit(tokenizer_path, corpus_texts, max_length, progress=False)
        return cls._from_encoder(encoder, trainable)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/idf.json`` with the current (clamped) table; returns its path.

        Raises:
            ValueError: the module was built from a tensor, without a tokenizer to name.
        """
        if self.tokenizer_name is None:
            raise ValueError("save needs the tokenizer: build the encoder with from_file or fit")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = InferenceFreeQueryEncoder(
            self.tokenizer_name,
            self.idf.detach().clamp(min=0).float().cpu(),
            num_docs=self.num_docs,
            max_length=self.doc_max_length,
        )
        return table.save(directory / IDF_FILE)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize queries, padded; not truncated unless ``max_length`` is given.

        Returns:
            ``input_ids`` and ``attention_mask``, (B, L) int64 each.
        """
        texts = check_texts(texts)
        if self.tokenizer is None:
            raise ValueError("tokenize needs the tokenizer: build the encoder with from_file or fit")
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_token_type_ids=False,
            return_tensors="pt",
            verbose=False,
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query vectors: ``idf_j`` on each distinct non-special, non-padding word-piece ``j``.

        Args:
            input_ids: (B, L) token ids in ``[0, V)``.
            attention_mask: (B, L) 1 for tokens, 0 for padding.

        Returns:
            (B, V) float32, differentiable with respect to ``idf`` when trainable.

        Raises:
            ValueError: an id outside the vocabulary, or mismatched shapes.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            shapes = f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)}"
            raise ValueError(f"{shapes} must be (B, L), the same")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(
                f"input_ids must be in [0, {self.vocab_size}), got [{input_ids.min()}, {input_ids.max()}]"
            )
        present = attention_mask.bool() & ~self.special[input_ids]  # (B, L)
        bag = torch.zeros(input_ids.shape[0], self.vocab_size, dtype=self.idf.dtype, device=input_ids.device)
        bag.scatter_reduce_(1, input_ids, present.to(bag.dtype), reduce="amax")  # (B, V) 0/1
        return bag * self.idf.clamp(min=0)  # (B, V)
