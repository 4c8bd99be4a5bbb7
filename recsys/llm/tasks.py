"""LLMRec's three questions, asked of an LLM or answered offline from the dataset's metadata.

A *provider* answers, for the users and items it is given (Wei et al., LLMRec, WSDM 2024):

* ``item_attributes(items)`` -> text per item (e.g. director, country, language);
* ``user_profiles(users, histories)`` -> a short profile per user;
* ``pick_pairs(users, histories, candidates)`` -> (liked, disliked) item ids per user, both
  from that user's candidates (extra BPR pairs).

``None`` marks an answer the caller must not use (unreachable, unparsable after the repair
retry, an item outside the candidates, an empty text): the user or item falls back to no
augmentation, and ``usage`` says how many did. Providers:

* :class:`LLMProvider`: a chat back-end (:mod:`recsys.llm.chat`), prompts from a file under
  ``conf/llm/prompts/``, answers cached on disk (:mod:`recsys.llm.cache`);
* :class:`OfflineProvider`: **not an LLM** -- fixed templates over the dataset's own metadata
  (titles, genres, year; age, gender, occupation), and a deterministic pair choice: the
  candidates most and least similar to the user's profile, by an embedding model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from recsys.data.tables import InteractionData
from recsys.llm.ask import Usage, ask_json
from recsys.llm.cache import AnswerCache
from retrieval.cli import CONF_DIR

log = logging.getLogger(__name__)

Encode = Callable[[Sequence[str]], torch.Tensor]  # texts -> (n, d) unit vectors


@dataclass(frozen=True)
class Catalogue:
    """Per-item and per-user text a provider can use.

    Attributes:
        titles, genres, years: per item (``years`` entry ``None`` when unknown).
        demographics: per user, one phrase (e.g. "a 24-year-old man, technician").
    """

    titles: list[str]
    genres: list[list[str]]
    years: list[int | None]
    demographics: list[str]

    @classmethod
    def of(cls, data: InteractionData) -> Catalogue:
        """The catalogue of a dataset with ``title``/``genres``/``year`` item features and user features."""
        if data.item_features is None or "title" not in data.item_features.columns:
            raise ValueError(f"{data.name} has no item titles: LLMRec's providers need them")
        items = data.item_features.sort("item")
        users = data.user_features.sort("user") if data.user_features is not None else None
        return cls(
            titles=items["title"].to_list(),
            genres=[list(g or []) for g in items["genres"].to_list()],
            years=items["year"].to_list() if "year" in items.columns else [None] * items.height,
            demographics=[_demographics(row) for row in users.iter_rows(named=True)]
            if users is not None
            else ["a user"] * data.num_users,
        )

    def select(self, users: Sequence[int], items: Sequence[int]) -> Catalogue:
        """The catalogue of a renumbered run: its user ``u`` is dataset user ``users[u]``, items likewise."""
        return Catalogue(
            titles=[self.titles[i] for i in items],
            genres=[self.genres[i] for i in items],
            years=[self.years[i] for i in items],
            demographics=[self.demographics[u] for u in users],
        )


def _demographics(row: dict) -> str:
    gender = {"M": "man", "F": "woman"}.get(str(row.get("gender")), "person")
    age = row.get("age")
    occupation = row.get("occupation")
    parts = [f"a {age}-year-old {gender}" if age is not None else f"a {gender}"]
    if occupation is not None and not isinstance(occupation, int):
        parts.append(str(occupation))
    return ", ".join(parts)


def load_prompts(path: str | Path) -> dict:
    """The prompt file: ``version`` and the templates ``item_attributes``, ``user_profile``, ``pick_pair``.

    A relative path that does not exist is read from the repository's ``conf/`` folder.
    """
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = CONF_DIR / path
    prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = {"version", "item_attributes", "user_profile", "pick_pair"} - set(prompts or {})
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}")
    return prompts


def _history_text(catalogue: Catalogue, items: Sequence[int], limit: int = 20) -> str:
    return "; ".join(catalogue.titles[i] for i in list(items)[:limit]) or "none yet"


class LLMProvider:
    """LLMRec's questions asked of a chat back-end, with prompts from a file and a disk cache.

    Args:
        backend: a chat back-end (e.g. :class:`~recsys.llm.chat.OpenAICompatibleChat`).
        prompts: path of the prompt file (``conf/llm/prompts/movielens.yaml``).
        cache: path of the ``.jsonl`` answer cache.
        concurrency: calls in flight at once.
    """

    def __init__(self, backend, prompts: str | Path, cache: str | Path, concurrency: int = 4):
        self.backend, self.prompts = backend, load_prompts(prompts)
        self.cache, self.concurrency = AnswerCache(cache), concurrency
        self.name = f"{backend.name} {backend.model}"
        self.usage: dict[str, Usage] = {}

    def _ask(self, task: str, prompts: list[str], validate) -> list:
        version = f"{task}-{self.prompts['version']}"
        answers, usage = ask_json(self.backend, prompts, self.cache, version, validate, self.concurrency)
        self.usage[task] = usage
        return answers

    def item_attributes(self, catalogue: Catalogue, items: Sequence[int]) -> list[str | None]:
        template = self.prompts["item_attributes"]
        prompts = [
            template.format(
                title=catalogue.titles[i], genres=", ".join(catalogue.genres[i]), year=catalogue.years[i]
            )
            for i in items
        ]
        answers = self._ask("item_attributes", prompts, _nonempty_object)
        return [None if a is None else "; ".join(f"{k}: {v}" for k, v in a.items()) for a in answers]

    def user_profiles(
        self, catalogue: Catalogue, users: Sequence[int], histories: Sequence[Sequence[int]]
    ) -> list[str | None]:
        template = self.prompts["user_profile"]
        prompts = [
            template.format(demographics=catalogue.demographics[u], history=_history_text(catalogue, h))
            for u, h in zip(users, histories, strict=True)
        ]
        answers = self._ask("user_profile", prompts, _profile)
        return [None if a is None else a["profile"].strip() for a in answers]

    def pick_pairs(
        self,
        catalogue: Catalogue,
        users: Sequence[int],
        histories: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
    ) -> list[tuple[int, int] | None]:
        template = self.prompts["pick_pair"]
        prompts = [
            template.format(
                demographics=catalogue.demographics[u],
                history=_history_text(catalogue, h),
                candidates="\n".join(f"{i}: {catalogue.titles[i]}" for i in c),
            )
            for u, h, c in zip(users, histories, candidates, strict=True)
        ]
        answers = self._ask("pick_pair", prompts, None)
        return [_pair(a, set(c), self.usage["pick_pair"]) for a, c in zip(answers, candidates, strict=True)]


def _nonempty_object(parsed) -> str | None:
    ok = isinstance(parsed, dict) and parsed and all(str(v).strip() for v in parsed.values())
    return None if ok else "empty attributes"


def _profile(parsed) -> str | None:
    ok = isinstance(parsed, dict) and isinstance(parsed.get("profile"), str) and parsed["profile"].strip()
    return None if ok else "empty profile"


def _pair(answer, candidates: set[int], usage: Usage) -> tuple[int, int] | None:
    """(liked, disliked) if both are distinct candidate ids; else counted as unusable."""
    if answer is None:
        return None
    try:
        liked, disliked = int(answer["liked"]), int(answer["disliked"])
    except (KeyError, TypeError, ValueError):
        usage.failures["malformed pair"] += 1
        return None
    if liked not in candidates or disliked not in candidates or liked == disliked:
        usage.failures["item not in the candidates"] += 1
        return None
    return liked, disliked


class OfflineProvider:
    """**Not an LLM**: LLMRec's three outputs built from the dataset's own metadata.

    Item attributes and user profiles are fixed templates (title, genres, year; demographics and
    the user's most-watched genres). The pair choice is deterministic: among the user's
    candidates, the most and the least similar to the user's profile text under ``encode``
    (e.g. all-MiniLM-L6-v2, :class:`~retrieval.encoders.dense.DenseEncoder`), ties by lower id.

    Args:
        encode: texts -> (n, d) unit vectors.
    """

    name = "offline metadata templates (not an LLM)"

    def __init__(self, encode: Encode):
        self.encode = encode
        self.usage: dict[str, Usage] = {}

    def item_attributes(self, catalogue: Catalogue, items: Sequence[int]) -> list[str | None]:
        self.usage["item_attributes"] = Usage()
        return [_item_text(catalogue, i) for i in items]

    def user_profiles(
        self, catalogue: Catalogue, users: Sequence[int], histories: Sequence[Sequence[int]]
    ) -> list[str | None]:
        usage = self.usage["user_profile"] = Usage()
        out = []
        for u, history in zip(users, histories, strict=True):
            if not history:
                usage.failures["empty profile"] += 1
                out.append(None)
                continue
            genres = Counter(g for i in history for g in catalogue.genres[i]).most_common(3)
            liked = ", ".join(g for g, _ in genres) or "no particular genre"
            out.append(
                f"{catalogue.demographics[u].capitalize()} who mostly watches {liked} movies, "
                f"for example {_history_text(catalogue, history, limit=3)}."
            )
        return out

    def pick_pairs(
        self,
        catalogue: Catalogue,
        users: Sequence[int],
        histories: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
    ) -> list[tuple[int, int] | None]:
        profiles = self.user_profiles(catalogue, users, histories)
        usage = self.usage["pick_pair"] = Usage(failures=Counter(self.usage["user_profile"].failures))
        items = sorted({i for c in candidates for i in c})
        item_vec = dict(zip(items, self.encode([_item_text(catalogue, i) for i in items]), strict=True))
        live = [k for k, p in enumerate(profiles) if p is not None and len(candidates[k]) >= 2]
        user_vec = self.encode([profiles[k] for k in live]) if live else torch.empty(0)
        out: list[tuple[int, int] | None] = [None] * len(users)
        for row, k in enumerate(live):
            cands = sorted(candidates[k])
            sims = torch.stack([item_vec[i] for i in cands]) @ user_vec[row]  # (c,)
            out[k] = (cands[int(sims.argmax())], cands[int(sims.argmin())])
        short = sum(1 for k, p in enumerate(profiles) if p is not None and len(candidates[k]) < 2)
        if short:
            usage.failures["fewer than 2 candidates"] += short
        return out


def _item_text(catalogue: Catalogue, item: int) -> str:
    year = catalogue.years[item]
    genres = ", ".join(catalogue.genres[item]) or "unknown genre"
    return f"{catalogue.titles[item]}. Genres: {genres}." + (f" Released in {year}." if year else "")
