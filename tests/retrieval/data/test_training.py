"""Training sets: queries and judgements checked against the corpus, in every accepted format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from retrieval.data.beir import BeirData, load_beir
from retrieval.data.errors import DataFormatError
from retrieval.data.training import TrainingDataError, TrainingSet, load_training_set, read_queries

DOCS = {f"d{i}": f"document number {i} about topic {i % 3}" for i in range(1, 7)}
QUERIES = {"q1": "first question", "q2": "second question", "q3": "third question", "q4": "no positives"}
TRAIN = [("q1", "d1", 1), ("q1", "d2", 2), ("q2", "d3", 1), ("q2", "d4", 0), ("q3", "d5", 1), ("q4", "d6", 0)]


def _beir_folder(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, text in DOCS.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, rows in (("train", TRAIN), ("test", [("q1", "d1", 1)])):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def train_split(tmp_path: Path) -> BeirData:
    return load_beir(str(_beir_folder(tmp_path / "tiny")), split="train")


def _trec(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    path.write_text("".join(f"{q} 0 {d} {s}\n" for q, d, s in rows))
    return path


def test_loads_the_dataset_split_and_drops_queries_without_positives(
    train_split: BeirData, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="retrieval.data.training"):
        training = load_training_set(train_split)
    assert isinstance(training, TrainingSet) and training.name == "tiny/train"
    assert training.queries == {q: QUERIES[q] for q in ("q1", "q2", "q3")}  # q4 judged 0 only
    assert training.positives("q1") == ["d1", "d2"] and training.positives("q2") == ["d3"]
    assert training.qrels["q2"] == {"d3": 1, "d4": 0}  # judged non-relevant kept
    assert "q4" not in training.qrels and training.num_positives() == 4
    assert training.corpus.height == 6 and training.corpus["doc_id"].to_list() == list(DOCS)
    assert training.qrels_path == train_split.path / "qrels" / "train.tsv"
    assert "dropped 1 of 4 queries with no positive judgement" in caplog.text


def test_tsv_queries_and_trec_qrels(train_split: BeirData, tmp_path: Path) -> None:
    queries = tmp_path / "train.titles.queries"
    queries.write_text("A-1\thow are bees\nA-2\t  volcanoes  \n\nA-3\tunjudged\n")
    qrels = _trec(tmp_path / "train.qrel", [("A-1", "d1", 2), ("A-1", "d2", 1), ("A-2", "d6", 1)])
    training = load_training_set(train_split, queries, qrels)
    assert training.queries == {"A-1": "how are bees", "A-2": "volcanoes"}
    assert training.qrels.to_dict() == {"A-1": {"d1": 2, "d2": 1}, "A-2": {"d6": 1}}
    assert training.name == "tiny/train" and training.queries_path == queries


def test_queries_file_format_is_detected_by_content(tmp_path: Path) -> None:
    jsonl = tmp_path / "queries.txt"  # no .jsonl suffix: the first line tells
    jsonl.write_text(json.dumps({"_id": 7, "text": "seven"}) + "\n")
    assert read_queries(jsonl) == {"7": "seven"}
    assert read_queries(_beir_folder(tmp_path / "b") / "queries.jsonl") == QUERIES


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("Q1\tok\nQ2 no tab\n", r"queries.tsv:2: expected 'QID<TAB>text' on each line"),
        ("Q1\tok\nQ2\t \n", r"queries.tsv:2: expected a non-empty query text"),
        ("Q1\tok\nQ2\tb\nQ1\tagain\n", r"queries.tsv:3: expected unique query ids"),
    ],
)
def test_bad_tsv_queries_name_the_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "queries.tsv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=expected):
        read_queries(path)


def test_unknown_query_is_refused_with_file_and_line(train_split: BeirData, tmp_path: Path) -> None:
    qrels = _trec(tmp_path / "t.qrel", [("q1", "d1", 1), ("ghost", "d2", 1), ("ghost", "d3", 1)])
    with pytest.raises(TrainingDataError) as err:
        load_training_set(train_split, qrels=qrels)
    msg = str(err.value)
    queries_path = train_split.path / "queries.jsonl"
    assert f"{qrels}: 2 judgements of 1 queries with no text in {queries_path} (of 3 judgements)" in msg
    assert f"{qrels}:2: query 'ghost' has no text in {queries_path}" in msg
    assert msg.endswith("pass drop_unknown=true to skip them")


def test_unknown_doc_is_refused_with_file_and_line(train_split: BeirData, tmp_path: Path) -> None:
    rows = [("q1", "d1", 1), ("q1", "gone", 1), ("q2", "d3", 1), ("q2", "lost", 1), ("q3", "gone", 1)]
    qrels = _trec(tmp_path / "t.qrel", rows)
    with pytest.raises(TrainingDataError) as err:
        load_training_set(train_split, qrels=qrels)
    msg = str(err.value)
    assert "3 judgements of 2 documents not in corpus.jsonl (6 docs)" in msg
    assert f"{qrels}:2: doc 'gone' is not in corpus.jsonl (6 documents)" in msg
    assert f"{qrels}:4: doc 'lost' is not in corpus.jsonl (6 documents)" in msg
    assert msg.count("'gone'") == 1  # each id quoted once, at its first line


def test_unknown_ids_in_a_beir_tsv_get_their_lines(train_split: BeirData, tmp_path: Path) -> None:
    queries = tmp_path / "q.tsv"
    queries.write_text("q1\tfirst\n")  # the split's q2, q3, q4 have no text here
    with pytest.raises(TrainingDataError, match=r"train.tsv:4: query 'q2' has no text in .*q.tsv"):
        load_training_set(train_split, queries=queries)


def test_drop_unknown_keeps_the_rest(
    train_split: BeirData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [("q1", "d1", 1), ("q1", "gone", 1), ("ghost", "d2", 1), ("q3", "gone", 2)]
    qrels = _trec(tmp_path / "t.qrel", rows)
    with caplog.at_level(logging.INFO, logger="retrieval.data.training"):
        training = load_training_set(train_split, qrels=qrels, drop_unknown=True)
    assert training.qrels.to_dict() == {"q1": {"d1": 1}}  # q3 lost its only positive
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "dropped 3 of 4 judgements naming unknown ids: 1 judgements of 1 queries" in message
    assert "2 judgements of 1 documents not in corpus.jsonl" in message


def test_nothing_left_is_an_error(train_split: BeirData, tmp_path: Path) -> None:
    qrels = _trec(tmp_path / "t.qrel", [("q1", "d1", 0), ("q2", "d2", -1)])
    with pytest.raises(TrainingDataError, match="no query with a positive judgement"):
        load_training_set(train_split, qrels=qrels)
    only_unknown = _trec(tmp_path / "u.qrel", [("q1", "gone", 1)])
    with pytest.raises(TrainingDataError, match="no query with a positive judgement"):
        load_training_set(train_split, qrels=only_unknown, drop_unknown=True)


def test_missing_files_are_named(train_split: BeirData, tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match=r"nope.qrel: no such qrels file"):
        load_training_set(train_split, qrels=tmp_path / "nope.qrel")
    with pytest.raises(TrainingDataError, match=r"nope.tsv: no such queries file"):
        load_training_set(train_split, queries=tmp_path / "nope.tsv")


# --------------------------------------------------------------------------- real data


def test_nfcorpus_train_needs_drop_unknown(shared_data: Path) -> None:
    if not (shared_data / "nfcorpus" / "original").is_dir():
        pytest.skip("no NFCorpus original/ files")
    original = shared_data / "nfcorpus" / "original"
    corpus = load_beir(str(shared_data / "nfcorpus"), split="dev")  # no qrels/train.tsv: dev gives the corpus
    files = (original / "train.titles.queries", original / "train.2-1-0.qrel")
    with pytest.raises(TrainingDataError, match=r"500 judgements of 238 documents not in corpus.jsonl"):
        load_training_set(corpus, *files)
    training = load_training_set(corpus, *files, drop_unknown=True)
    assert training.qrels.num_pairs() == 110_575 - 500
    assert len(training.queries) == 2563 and training.name == "nfcorpus/train.2-1-0"
    # paths relative to the dataset folder, as the experiment configs give them
    relative = load_training_set(
        corpus, "original/train.titles.queries", "original/train.2-1-0.qrel", drop_unknown=True
    )
    assert relative.queries == training.queries and relative.qrels_path == files[1]


def test_scifact_train(shared_data: Path) -> None:
    if not (shared_data / "scifact" / "qrels" / "train.tsv").is_file():
        pytest.skip("no SciFact train split")
    training = load_training_set(load_beir(str(shared_data / "scifact"), split="train"))
    assert len(training.queries) == 809 and training.num_positives() == 919
