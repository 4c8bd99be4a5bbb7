"""The OpenAI-compatible back-end end to end against a fake server on 127.0.0.1 (real HTTP round
trips), the JSON repair retry, 429 retries, timeouts, validation, cost accounting and the cache."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recsys.llm.ask import ask_json, parse_json
from recsys.llm.cache import AnswerCache
from recsys.llm.chat import ChatError, OpenAICompatibleChat


class FakeOpenAI(BaseHTTPRequestHandler):
    """Replies by the first word of the last user message; counts calls per prompt."""

    calls: Counter = Counter()
    auth: list[str] = []

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "fake-1"
        prompt = body["messages"][0]["content"]
        FakeOpenAI.calls[prompt] += 1
        FakeOpenAI.auth.append(self.headers.get("Authorization", ""))
        repairing = len(body["messages"]) == 3
        word = prompt.split()[0]
        if word == "busy" and FakeOpenAI.calls[prompt] == 1:
            return self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
        if word == "slow":
            time.sleep(0.6)
        text = {
            "ok": '{"pick": "a"}',
            "fence": '```json\n{"pick": "b"}\n```',
            "bad": '{"pick": "c"}' if repairing else "Sure! The answer is c.",
            "never": "I cannot answer in JSON.",
            "busy": '{"pick": "d"}',
            "alien": '{"pick": "zzz"}',
            "slow": '{"pick": "e"}',
        }[word]
        self._send(
            200,
            {
                "choices": [{"message": {"content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
            },
        )

    def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    FakeOpenAI.calls, FakeOpenAI.auth = Counter(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _backend(url: str, **kwargs) -> OpenAICompatibleChat:
    options = {"timeout": 0.3, "max_retries": 1, "backoff": 0.01, "price_prompt_per_1k": 1.0}
    return OpenAICompatibleChat(url, "fake-1", api_key_env="SPARROW_TEST_KEY", **(options | kwargs))


def _pick_in(candidates: set[str]):
    def validate(parsed) -> str | None:
        return None if isinstance(parsed, dict) and parsed.get("pick") in candidates else "not a candidate"

    return validate


PROMPTS = ["ok 1", "fence 2", "bad 3", "never 4", "busy 5", "alien 6", "slow 7"]


def test_answers_repairs_retries_and_counts(server, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("SPARROW_TEST_KEY", "sk-test")
    cache = AnswerCache(tmp_path / "answers.jsonl")
    with caplog.at_level(logging.INFO, logger="recsys.llm.ask"):
        answers, usage = ask_json(
            _backend(server), PROMPTS, cache, "v1", _pick_in(set("abcde")), concurrency=3
        )
    assert answers == [{"pick": "a"}, {"pick": "b"}, {"pick": "c"}, None, {"pick": "d"}, None, None]
    assert usage.failures == Counter({"unparsable": 1, "not a candidate": 1, "unreachable": 1})
    calls = FakeOpenAI.calls
    assert calls["bad 3"] == 2 and calls["never 4"] == 2  # one repair retry each
    assert calls["busy 5"] == 2  # 429, then success
    assert calls["slow 7"] == 2  # timed out twice (max_retries = 1)
    assert usage.calls == 8 and usage.prompt_tokens == 80 and usage.cost == pytest.approx(80 / 1000)
    assert set(FakeOpenAI.auth) == {"Bearer sk-test"}
    assert "estimated cost <= $" in caplog.text  # logged before the paid calls


def test_a_rerun_is_served_by_the_cache(server, tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    first, _ = ask_json(_backend(server), PROMPTS[:6], AnswerCache(path), "v1", _pick_in(set("abcd")))
    before = sum(FakeOpenAI.calls.values())
    again, usage = ask_json(_backend(server), PROMPTS[:6], AnswerCache(path), "v1", _pick_in(set("abcd")))
    assert sum(FakeOpenAI.calls.values()) == before  # no call at all
    assert again == first and usage.cached == 6 and usage.calls == 0
    assert usage.failures == Counter({"unparsable": 1, "not a candidate": 1})  # counted again, from the cache
    ask_json(_backend(server), PROMPTS[:1], AnswerCache(path), "v2")  # a new prompt version is a new key
    assert sum(FakeOpenAI.calls.values()) == before + 1


def test_an_interrupted_cache_file_keeps_its_complete_records(tmp_path: Path, caplog) -> None:
    path = tmp_path / "answers.jsonl"
    cache = AnswerCache(path)
    cache.put({"key": "k1", "text": "{}"})
    with path.open("a") as f:
        f.write('{"key": "k2", "te')  # a write cut short
    with caplog.at_level(logging.WARNING):
        again = AnswerCache(path)
    assert len(again) == 1 and again.get("k1")["text"] == "{}"
    assert "incomplete record" in caplog.text


def test_unreachable_server_and_refusals_raise_chat_error() -> None:
    backend = OpenAICompatibleChat("http://127.0.0.1:9/v1", "m", timeout=0.2, max_retries=1, backoff=0.0)
    with pytest.raises(ChatError, match="127.0.0.1:9"):
        backend.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="timeout must be > 0"):
        OpenAICompatibleChat("http://x", "m", timeout=0)


def test_parse_json_accepts_fenced_replies() -> None:
    assert parse_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json(" [1, 2] ") == [1, 2]


def test_a_local_causal_lm_answers_and_its_gibberish_is_counted(tmp_path: Path) -> None:
    """A tiny random GPT-2 (built here, with splade-tiny's word-piece tokenizer) through HuggingFaceChat."""
    transformers = pytest.importorskip("transformers")
    from recsys.llm.chat import HuggingFaceChat
    from tests.retrieval.helpers import SPLADE_TINY

    if not SPLADE_TINY.is_dir():
        pytest.skip(f"no tokenizer at {SPLADE_TINY}")
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=30522, n_positions=256, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    transformers.AutoTokenizer.from_pretrained(SPLADE_TINY).save_pretrained(tmp_path / "lm")
    backend = HuggingFaceChat(str(tmp_path / "lm"), max_new_tokens=8, device="cpu")
    answer = backend.chat([{"role": "user", "content": "Reply with JSON."}])
    assert answer.prompt_tokens > 3 and 1 <= answer.completion_tokens <= 8 and backend.cost(10, 10) == 0.0
    answers, usage = ask_json(backend, ["Reply with JSON."], AnswerCache(tmp_path / "c.jsonl"), "v1")
    assert answers == [None] and usage.calls == 2 and usage.failures == Counter({"unparsable": 1})
