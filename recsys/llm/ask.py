"""Ask a chat back-end for JSON answers to many prompts: cached, concurrent, repaired, counted.

For each prompt: the cached answer if there is one (no call); otherwise one call, and if the
text is not JSON, one *repair* call that shows the model its answer and the parse error. The
final text is cached (also when it is unusable: a rerun makes no calls); then it is parsed and
checked by ``validate``. Unusable answers come back as ``None`` and are counted by reason, so
the caller can fall back (no augmentation for that user or item) and report how many did.
Before any uncached call of a priced back-end, the cost estimate is logged.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from recsys.llm.cache import AnswerCache, cache_key
from recsys.llm.chat import Answer, ChatError

log = logging.getLogger(__name__)

Validator = Callable[[object], str | None]  # parsed JSON -> None if usable, else the reason

REPAIR = (
    "Your previous answer is not valid JSON ({error}). Reply again with only the JSON value, "
    "no prose and no code fences."
)


@dataclass
class Usage:
    """What a batch of questions cost and how many answers were unusable."""

    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    failures: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        failed = ", ".join(f"{n} {r}" for r, n in sorted(self.failures.items())) or "none"
        return (
            f"{self.calls} calls, {self.cached} cached, {self.prompt_tokens}+{self.completion_tokens} "
            f"tokens, ${self.cost:.4f}; unusable: {failed}"
        )


def parse_json(text: str) -> object:
    """The JSON value in a reply, tolerating a surrounding ```json fence."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return json.loads(text)


def estimate_cost(backend, prompts: Sequence[str]) -> float:
    """Upper-bound USD of answering ``prompts``: ~4 characters per prompt token, ``max_tokens`` out."""
    prompt_tokens = sum(len(p) // 4 + 1 for p in prompts)
    return backend.cost(prompt_tokens, backend.max_tokens * len(prompts))


def ask_json(
    backend,
    prompts: Sequence[str],
    cache: AnswerCache,
    version: str,
    validate: Validator | None = None,
    concurrency: int = 4,
) -> tuple[list[object | None], Usage]:
    """Parsed, validated JSON answers to ``prompts`` (``None`` where unusable) and the usage.

    Args:
        backend: a chat back-end (``name``, ``model``, ``chat(messages)``, ``cost``, ``max_tokens``).
        prompts: one user message each.
        cache: the answer cache.
        version: bumps the cache key when prompts' meaning changes (e.g. the prompt file's version).
        validate: ``parsed -> None | reason``; a reason makes the answer unusable.
        concurrency: calls in flight at once.
    """
    usage, lock = Usage(), threading.Lock()
    keys = [cache_key(backend.name, backend.model, p, version) for p in prompts]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    usage.cached = len(prompts) - len(todo)
    if todo and any(backend.prices):
        log.info(
            "%s %s: %d uncached prompts, estimated cost <= $%.4f",
            backend.name,
            backend.model,
            len(todo),
            estimate_cost(backend, [prompts[i] for i in todo]),
        )

    def call(i: int) -> None:
        try:
            text = _answer_with_repair(backend, prompts[i], usage, lock)
        except ChatError as err:
            log.warning("prompt %d: %s", i, err)
            with lock:
                usage.failures["unreachable"] += 1
            return
        record = {"key": keys[i], "provider": backend.name, "model": backend.model, "version": version}
        with lock:
            cache.put(record | {"prompt": prompts[i], "text": text})

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        list(pool.map(call, todo))
    answers: list[object | None] = []
    for key in keys:
        record = cache.get(key)
        answers.append(None if record is None else _usable(record["text"], validate, usage))
    log.info("%s %s: %s", backend.name, backend.model, usage.summary())
    return answers, usage


def _answer_with_repair(backend, prompt: str, usage: Usage, lock: threading.Lock) -> str:
    messages = [{"role": "user", "content": prompt}]
    answer = backend.chat(messages)
    _count(backend, answer, usage, lock)
    try:
        parse_json(answer.text)
        return answer.text
    except json.JSONDecodeError as err:
        repair = REPAIR.format(error=err)
        messages += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": repair}]
        second = backend.chat(messages)
        _count(backend, second, usage, lock)
        return second.text


def _count(backend, answer: Answer, usage: Usage, lock: threading.Lock) -> None:
    with lock:
        usage.calls += 1
        usage.prompt_tokens += answer.prompt_tokens
        usage.completion_tokens += answer.completion_tokens
        usage.cost += backend.cost(answer.prompt_tokens, answer.completion_tokens)


def _usable(text: str, validate: Validator | None, usage: Usage) -> object | None:
    try:
        parsed = parse_json(text)
    except json.JSONDecodeError:
        usage.failures["unparsable"] += 1
        return None
    reason = validate(parsed) if validate else None
    if reason:
        usage.failures[reason] += 1
        return None
    return parsed
