"""Chat back-ends: send messages, get text and token counts. The task layer (profiles,
attributes, pairs) builds prompts from files under ``conf/`` and reads JSON through
:func:`recsys.llm.ask.ask_json`.

:class:`OpenAICompatibleChat` talks to any OpenAI-compatible ``/chat/completions`` endpoint
(OpenAI, vLLM, llama.cpp's server, Ollama, ...) with the standard library only: a timeout per
request, retries with exponential backoff on 429, 5xx, timeouts and connection errors
(``Retry-After`` honoured, capped), and the usage the server reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class ChatError(RuntimeError):
    """No answer: unreachable, timed out or refused after the retries, or a malformed response."""


@dataclass(frozen=True)
class Answer:
    """One reply. ``prompt_tokens`` / ``completion_tokens`` as the server counted them (0 if unknown)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAICompatibleChat:
    """An OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name the server expects.
        api_key_env: environment variable holding the key (unset: no ``Authorization`` header).
        timeout: seconds per request.
        max_retries: retries after the first attempt.
        backoff: seconds before the first retry, doubled each time.
        max_backoff: cap on one wait (and on ``Retry-After``).
        temperature, max_tokens: sent with every request.
        price_prompt_per_1k, price_completion_per_1k: USD per 1,000 tokens, for cost accounting.
    """

    name = "openai-compatible"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int = 512,
        price_prompt_per_1k: float = 0.0,
        price_completion_per_1k: float = 0.0,
    ):
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError("timeout must be > 0, max_retries and backoff >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = (
            timeout,
            max_retries,
            backoff,
            max_backoff,
        )
        self.temperature, self.max_tokens = temperature, max_tokens
        self.prices = (price_prompt_per_1k, price_completion_per_1k)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for the given token counts."""
        return (prompt_tokens * self.prices[0] + completion_tokens * self.prices[1]) / 1000

    def chat(self, messages: list[dict[str, str]]) -> Answer:
        """One completion of ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        Raises:
            ChatError: after ``max_retries`` retries of retryable failures, at once otherwise.
        """
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _answer(json.loads(response.read().decode("utf-8")), self.url)
            except urllib.error.HTTPError as err:
                if err.code not in RETRYABLE or attempt == self.max_retries:
                    raise ChatError(f"{self.url}: HTTP {err.code} {err.reason}") from err
                wait = _retry_after(err, self._wait(attempt), self.max_backoff)
                log.warning("%s: HTTP %d, retry %d in %.1f s", self.url, err.code, attempt + 1, wait)
            except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
                if attempt == self.max_retries:
                    raise ChatError(f"{self.url}: {err}") from err
                wait = self._wait(attempt)
                log.warning("%s: %s, retry %d in %.1f s", self.url, err, attempt + 1, wait)
            except json.JSONDecodeError as err:
                raise ChatError(f"{self.url}: the response is not JSON ({err})") from err
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff)


def _retry_after(err: urllib.error.HTTPError, default: float, cap: float) -> float:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(float(value), cap) if value is not None else default
    except ValueError:
        return default


def _answer(payload: dict, url: str) -> Answer:
    try:
        text = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise ChatError(f"{url}: no choices[0].message.content in the response") from err
    usage = payload.get("usage") or {}
    return Answer(str(text), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


class HuggingFaceChat:
    """A local causal LM through transformers (any ``AutoModelForCausalLM``, by name or path).

    Greedy decoding by default. Messages go through the tokenizer's chat template when it has
    one, else as ``role: content`` lines ending with ``assistant:``. Local models cost nothing.

    Args:
        model: Hugging Face name or local folder.
        max_new_tokens: generated tokens per answer at most (``max_tokens`` to :mod:`recsys.llm.ask`).
        temperature: 0 = greedy; otherwise sampled.
        device: torch device (default: CUDA when available).
    """

    name = "hf-local"
    prices = (0.0, 0.0)

    def __init__(
        self, model: str, max_new_tokens: int = 256, temperature: float = 0.0, device: str | None = None
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model, self.max_tokens, self.temperature = str(model), max_new_tokens, temperature
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.lm = AutoModelForCausalLM.from_pretrained(model).to(self.device).eval()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return 0.0

    def _prompt_ids(self, messages: list[dict[str, str]]):
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt"
            )
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def chat(self, messages: list[dict[str, str]]) -> Answer:
        import torch

        ids = self._prompt_ids(messages).to(self.device)  # (1, L)
        sample = self.temperature > 0
        with torch.inference_mode():
            out = self.lm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_tokens,
                do_sample=sample,
                temperature=self.temperature if sample else None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0,
            )
        new = out[0, ids.shape[1] :]
        return Answer(self.tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], int(new.numel()))
