"""Helpers shared by the retrieval tests: the splade-tiny model, a random Llama on its tokenizer, a
synthetic BEIR folder of six topics, and a job's Hydra config.

Imported as ``tests.retrieval.helpers``: under ``--import-mode=importlib`` pytest (>= 8.2) imports a test
module's parent folders as namespace packages, so this module resolves without ``__init__.py`` files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from retrieval.cli import CONF_DIR

REPO = Path(__file__).resolve().parents[2]
SPLADE_TINY = Path(os.environ.get("SPARROW_MODEL_DIR", REPO.parent / "shared" / "models")) / "splade-tiny"

TOPICS = {
    "bees": "Honey bees pollinate crops and produce honey in their hives during the summer.",
    "volcano": "A volcano erupts when magma rises through the crust and lava flows down its slopes.",
    "insulin": "Insulin is a hormone that lowers blood glucose; diabetes follows when it fails.",
    "comet": "A comet is an icy body whose tail of gas and dust points away from the sun.",
    "wheat": "Wheat is a cereal grain milled into flour for bread and pasta around the world.",
    "glacier": "Glaciers are rivers of ice that carve valleys as they slowly move downhill.",
}
NOTE = "Notes {i} on {name}: a survey of municipal budget tables, page {i}."


def splade_tiny() -> Path:
    """The splade-tiny folder (BertForMaskedLM, 2 layers); skips the calling test when it is absent."""
    if not SPLADE_TINY.is_dir():
        pytest.skip(f"no model at {SPLADE_TINY}")
    return SPLADE_TINY


def tiny_llama() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A random one-layer Llama (seed 0) sized to splade-tiny's BERT tokenizer, and that tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(splade_tiny())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config), tokenizer


def write_beir(
    root: Path, splits: dict[str, dict[str, tuple[str, list[str]]]], notes: int, note: str = NOTE
) -> Path:
    """Write a BEIR folder: per topic the document ``{name}-0`` and ``notes`` untitled distractors.

    Args:
        root (Path): the folder to create (its parents too); ``qrels/`` must not exist yet.
        splits (dict): split -> query id -> (query text, relevant doc ids); ``queries.jsonl`` holds
            every split's queries in order, ``qrels/{split}.tsv`` gives each relevant doc score 1.
        notes (int): distractors per topic, ids ``{name}-1`` .. ``{name}-{notes}``.
        note (str): their text, formatted with ``name`` (the topic) and ``i`` (the distractor number).

    Returns:
        Path: ``root``.
    """
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for name, text in TOPICS.items():
            f.write(json.dumps({"_id": f"{name}-0", "title": name.title(), "text": text}) + "\n")
            for i in range(1, notes + 1):
                other = note.format(name=name, i=i)
                f.write(json.dumps({"_id": f"{name}-{i}", "title": "", "text": other}) + "\n")
    queries = {qid: text for split in splits.values() for qid, (text, _) in split.items()}
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, judged in splits.items():
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{qid}\t{doc}\t1" for qid, (_, docs) in judged.items() for doc in docs]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def compose_job(config_name: str, overrides: list[str], out: Path) -> DictConfig:
    """The config of job ``config_name`` (a file of ``conf/``) with ``overrides``, writing into ``out``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg
