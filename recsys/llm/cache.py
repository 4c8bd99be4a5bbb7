"""An append-only, crash-safe disk cache of LLM answers.

One JSON record per line: ``{"key", "provider", "model", "version", "prompt", "text",
"prompt_tokens", "completion_tokens"}``. A record is written whole (one ``write`` of one line,
then flush and fsync), so an interrupted run leaves at most a truncated last line, which the
next run skips (and logs). The key is the SHA-256 of (provider, model, prompt, version): a
rerun with the same prompts makes no calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cache_key(provider: str, model: str, prompt: str, version: str) -> str:
    """The record key of one prompt: hex SHA-256 of its four parts."""
    payload = json.dumps([provider, model, prompt, version], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers by key, loaded from ``path`` at start and appended to as they arrive.

    Args:
        path: the ``.jsonl`` file (created with its folder when missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: incomplete record (an interrupted run?), skipped", self.path, line_no)
                    continue
                self.records[record["key"]] = record

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        """Append one complete record (it must hold ``key``)."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record

    def __len__(self) -> int:
        return len(self.records)
