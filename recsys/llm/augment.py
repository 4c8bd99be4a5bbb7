"""Run a provider over a dataset once: LLMRec's side information, saved as one file.

:func:`augment` asks a provider (:mod:`recsys.llm.tasks`) for every item's attributes, every
user's profile and, per user, a (liked, disliked) pair among that user's candidates (the base
recommender's top-K non-training items), embeds the texts (all-MiniLM-L6-v2 by default) and
returns an :class:`Augmentation`; :meth:`Augmentation.save` writes it atomically (temp file,
then rename). Unusable answers leave zero vectors / no pair, and ``fallbacks`` counts them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from recsys.llm.tasks import Catalogue

log = logging.getLogger(__name__)

Encode = Callable[[Sequence[str]], Tensor]


@dataclass(frozen=True)
class Augmentation:
    """LLMRec's side information for one dataset.

    Attributes:
        provider: the provider's name (the offline one says it is not an LLM).
        user_emb: (U, d) float32 profile embeddings; zero rows where the profile fell back.
        item_emb: (I, d) float32 attribute embeddings; zero rows where the attributes fell back.
        pairs: (P, 3) int64 rows (user, liked item, disliked item).
        fallbacks: task -> reason -> count of unusable answers.
        user_text, item_text: the texts (``None`` where they fell back).
        train_fingerprint: the training split it was made for
            (:func:`recsys.data.datamodule.pairs_fingerprint`): the pairs' candidates excluded that
            split's training items, so another split (seed, filters) is refused.
    """

    provider: str
    user_emb: Tensor
    item_emb: Tensor
    pairs: Tensor
    fallbacks: dict[str, dict[str, int]]
    user_text: list[str | None]
    item_text: list[str | None]
    train_fingerprint: str

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically (``torch.load(weights_only=True)`` reads it back)."""
        _save_atomically(self.__dict__, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Augmentation:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: naming the command that writes one.
            ValueError: a file of another kind or an older version.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no augmentation file; `python -m recsys.augment ckpt_path=<base run>` writes one"
            )
        state = torch.load(path, weights_only=True)
        fields = set(cls.__dataclass_fields__)
        if not isinstance(state, dict) or set(state) != fields:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{path}: not an augmentation of this version (fields {found}; expected {sorted(fields)})"
            )
        return cls(**state)

    def check(self, num_users: int, num_items: int, train_fingerprint: str, where: str) -> None:
        """Refuse an augmentation made for other data than ``num_users`` x ``num_items`` and this split.

        Raises:
            ValueError: naming ``where`` (the file), what it holds and what the data has.
        """
        found = (self.user_emb.shape[0], self.item_emb.shape[0])
        if found != (num_users, num_items):
            raise ValueError(
                f"{where}: made for {found[0]} users x {found[1]} items; data has {num_users} x {num_items}"
            )
        if self.pairs.numel() and (
            self.pairs[:, 0].max() >= num_users
            or self.pairs[:, 1:].max() >= num_items
            or self.pairs.min() < 0
        ):
            raise ValueError(f"{where}: pairs hold user or item ids outside the data")
        if self.train_fingerprint != train_fingerprint:
            raise ValueError(
                f"{where}: made for another training split (fingerprint {self.train_fingerprint}, this split "
                f"{train_fingerprint}); rerun `python -m recsys.augment` on a base run with the same data, "
                "filters and seed"
            )


def _embed(texts: list[str | None], encode: Encode) -> Tensor:
    live = [k for k, t in enumerate(texts) if t]
    vectors = encode([texts[k] for k in live]) if live else torch.zeros(0, 1)
    out = torch.zeros(len(texts), vectors.shape[1])
    if live:
        out[live] = vectors.float().cpu()
    return out


def augment(
    provider,
    catalogue: Catalogue,
    histories: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    encode: Encode,
    train_fingerprint: str,
    num_users: int | None = None,
) -> Augmentation:
    """Ask ``provider`` about every item and the users ``0..len(histories)-1``; pairs from their candidates.

    Args:
        provider: :class:`~recsys.llm.tasks.LLMProvider` or :class:`~recsys.llm.tasks.OfflineProvider`.
        catalogue: the dataset's texts.
        histories: per user, the training items (in any order).
        candidates: per user, the items the pair may come from (e.g. a base model's top-K).
        encode: texts -> (n, d) vectors.
        train_fingerprint: the training split's fingerprint (stored; checked when the file is used).
        num_users: rows of ``user_emb`` (users not asked about get zero rows); default: ``len(histories)``.
    """
    users = list(range(len(histories)))
    item_text = provider.item_attributes(catalogue, list(range(len(catalogue.titles))))
    user_text = provider.user_profiles(catalogue, users, histories)
    picked = provider.pick_pairs(catalogue, users, histories, candidates)
    rows = [(u, p[0], p[1]) for u, p in zip(users, picked, strict=True) if p is not None]
    fallbacks = {task: dict(usage.failures) for task, usage in provider.usage.items()}
    log.info("%s: %d pairs for %d users; fallbacks %s", provider.name, len(rows), len(users), fallbacks)
    extra = (num_users or len(users)) - len(users)
    return Augmentation(
        provider=provider.name,
        user_emb=_embed(user_text + [None] * extra, encode),
        item_emb=_embed(item_text, encode),
        pairs=torch.tensor(rows, dtype=torch.int64).reshape(-1, 3),
        fallbacks=fallbacks,
        user_text=user_text + [None] * extra,
        item_text=item_text,
        train_fingerprint=train_fingerprint,
    )


def text_key(text: str) -> str:
    """The embedding cache's key of a text: its SHA-256 (hex)."""
    return hashlib.sha256(text.encode()).hexdigest()


def minilm_encoder(
    model: str | None = None, device: str | None = None, cache: str | Path | None = None
) -> Encode:
    """Texts -> (n, 384) unit vectors by all-MiniLM-L6-v2 (``retrieval.encoders.dense.DenseEncoder``).

    Remembers every text it encoded, so asking again (the offline provider's pair choice, then
    the profile features) costs nothing. With ``cache``, the vectors also persist in that file
    (text SHA-256 -> vector, rewritten atomically after each call that encoded new texts), so runs
    on other seeds or machines reuse them; the model is loaded only when a text is missing.

    Args:
        model: dense model folder; ``None``: the packaged all-MiniLM-L6-v2.
        device: where the model runs (default: CUDA when present).
        cache: optional path of the persistent vector cache (made when missing).
    """
    cache = Path(os.path.normpath(cache)) if cache is not None else None  # 'runs/x/../f' without runs/x
    memo: dict[str, Tensor] = {}  # text key -> vector
    if cache is not None and cache.exists():
        memo.update(torch.load(cache, weights_only=True))
        log.info("%s: %d cached text vectors", cache, len(memo))
    encoder = None

    def encode(texts: Sequence[str]) -> Tensor:
        nonlocal encoder
        keys = [text_key(t) for t in texts]
        new = {k: t for k, t in zip(keys, texts, strict=True) if k not in memo}
        if new:
            if encoder is None:
                from retrieval.encoders.dense import DenseEncoder

                encoder = DenseEncoder(model, device=device)
            memo.update(zip(new, encoder.encode(list(new.values()), progress=False), strict=True))
            if cache is not None:
                _save_atomically(memo, cache)
        if not keys:
            return torch.zeros(0, next(iter(memo.values())).shape[0] if memo else 384)
        return torch.stack([memo[k] for k in keys])

    return encode


def _save_atomically(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
