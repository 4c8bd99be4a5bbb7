"""BEIR reader: the shared SciFact / NFCorpus copies read in place, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from retrieval.data import BEIR_SOURCES, BeirData, load_beir
from retrieval.data.errors import DataFormatError, DatasetNotFoundError
from retrieval.data.source import DATA_ENV
from retrieval.types import Qrels

# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    ("name", "split", "docs", "queries", "pairs"),
    [
        ("scifact", "test", 5183, 300, 339),
        ("scifact", "train", 5183, 809, 919),
        ("nfcorpus", "test", 3395, 323, 12334),
        ("nfcorpus", "dev", 3395, 324, 11385),
    ],
)
def test_shared_counts(shared_data: Path, name: str, split: str, docs: int, queries: int, pairs: int) -> None:
    for _ in range(2):  # the second load comes from the parquet cache and must be identical
        data = load_beir(name, split)
        assert isinstance(data, BeirData) and (data.name, data.split) == (name, split)
        assert data.corpus.height == docs and data.num_docs == docs
        assert data.queries.height == queries
        assert isinstance(data.qrels, Qrels) and len(data.qrels) == queries
        assert data.qrels.num_pairs() == pairs
        assert data.corpus.schema == pl.Schema(
            {"doc_id": pl.Utf8, "title": pl.Utf8, "text": pl.Utf8, "doc": pl.Int64}
        )
        assert data.queries.schema == pl.Schema({"query_id": pl.Utf8, "text": pl.Utf8})
        assert data.corpus["doc"].to_list() == list(range(docs))
        assert data.corpus["doc_id"].n_unique() == docs
        assert set(data.queries["query_id"]) == set(data.qrels)
        judged = {d for q in data.qrels.values() for d in q}
        assert judged <= set(data.corpus["doc_id"])


def test_shared_scifact_content(shared_data: Path) -> None:
    data = load_beir("scifact")
    first = json.loads((shared_data / "scifact" / "corpus.jsonl").open().readline())
    row = data.corpus.row(0, named=True)
    assert (row["doc_id"], row["title"], row["text"], row["doc"]) == (
        first["_id"],
        first["title"],
        first["text"],
        0,
    )
    assert all(v == 1 for q in data.qrels.values() for v in q.values())
    nf = load_beir("nfcorpus")
    assert {v for q in nf.qrels.values() for v in q.values()} == {1, 2}  # graded


def test_shared_all_queries_and_plain_path(shared_data: Path) -> None:
    assert load_beir("scifact", all_queries=True).queries.height == 1109
    by_path = load_beir(str(shared_data / "scifact"))
    assert by_path.name == "scifact" and by_path.qrels.num_pairs() == 339
    assert load_beir("scifact", root=shared_data).corpus.height == 5183


def test_shared_missing_split(shared_data: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"available splits: \['test', 'train'\]"):
        load_beir("scifact", "dev")


def test_sources_have_official_urls_and_md5s() -> None:
    for name, source in BEIR_SOURCES.items():
        (remote,) = source.remote
        assert remote.url == f"https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
        assert remote.md5 and len(remote.md5) == 32 and remote.extract and remote.strip == f"{name}/"
        assert (Path(__file__).resolve().parents[3] / source.card).is_file()


def test_missing_dataset_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_beir("scifact")
    msg = str(e.value)
    assert "datasets/scifact/README.md" in msg and DATA_ENV in msg
    assert "data.download=true" in msg and "scifact.zip" in msg
    with pytest.raises(DatasetNotFoundError, match="BEIR-format folder"):
        load_beir(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="datasets/README.md"):
        load_beir("my-own-beir-set")


# --------------------------------------------------------------------------- tiny folders

CORPUS = [
    {"_id": "d1", "title": "T1", "text": "one", "metadata": {}},
    {"_id": "d2", "text": "two"},
    {"_id": 3, "title": None, "text": "three"},
]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "third"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t3\t0\nq2\td2\t2\n"


def write(folder: Path, corpus=None, queries=None, qrels: str | None = None, split: str = "test") -> Path:
    """A BEIR folder; ``corpus``/``queries`` are lists of dicts or raw text."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    for fname, rows in (("corpus.jsonl", corpus or CORPUS), ("queries.jsonl", queries or QUERIES)):
        text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
        (folder / fname).write_text(text)
    (folder / "qrels" / f"{split}.tsv").write_text(QRELS if qrels is None else qrels)
    return folder


def test_tiny_folder(tmp_path: Path) -> None:
    data = load_beir(str(write(tmp_path / "tiny")))
    assert data.corpus.to_dicts() == [
        {"doc_id": "d1", "title": "T1", "text": "one", "doc": 0},
        {"doc_id": "d2", "title": "", "text": "two", "doc": 1},
        {"doc_id": "3", "title": "", "text": "three", "doc": 2},
    ]
    assert data.queries.to_dicts() == [
        {"query_id": "q1", "text": "first"},
        {"query_id": "q2", "text": "second"},
    ]
    assert data.qrels.to_dict() == {"q1": {"d1": 1, "3": 0}, "q2": {"d2": 2}}
    assert data.path == tmp_path / "tiny"


def test_tiny_folder_under_root(tmp_path: Path) -> None:
    write(tmp_path / "root" / "tiny")
    assert load_beir("tiny", root=tmp_path / "root").qrels.num_pairs() == 3


def test_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    corpus = (
        "\ufeff" + json.dumps(CORPUS[0]) + "\r\n\r\n" + "".join(json.dumps(r) + "\r\n" for r in CORPUS[1:])
    )
    qrels = QRELS.replace("\n", "\r\n") + "\r\n"
    data = load_beir(str(write(tmp_path / "x", corpus=corpus, qrels=qrels)))
    assert data.corpus["doc_id"].to_list() == ["d1", "d2", "3"] and data.qrels.num_pairs() == 3


def test_cache_sees_edits(tmp_path: Path) -> None:
    folder = write(tmp_path / "tiny")
    assert load_beir(str(folder)).qrels.num_pairs() == 3
    (folder / "qrels" / "test.tsv").write_text(QRELS + "q3\td2\t1\n")
    assert load_beir(str(folder)).qrels.num_pairs() == 4


def jsonl(rows: list[str]) -> str:
    return "".join(r + "\n" for r in rows)


GOOD = [json.dumps(r) for r in CORPUS]
H = "query-id\tcorpus-id\tscore\n"
C, Q, R = "corpus.jsonl", "queries.jsonl", "qrels/test.tsv"
# case: (bad file, its text, 1-based line or None, words expected in the message)
BAD_CASES = {
    "invalid_json": (C, jsonl([GOOD[0], '{"_id": "d2", "text": ', GOOD[2]]), 2, "JSON"),
    "not_object": (C, jsonl([GOOD[0], "[1, 2]", GOOD[2]]), 2, "JSON object"),
    "missing_id": (C, jsonl([GOOD[0], GOOD[1], '{"text": "x"}']), 3, "'_id'"),
    "missing_text": (C, jsonl([GOOD[0], '{"_id": "d2", "title": "t"}', GOOD[2]]), 2, "'text'"),
    "bad_text": (C, jsonl([GOOD[0], '{"_id": "d2", "text": 5}', GOOD[2]]), 2, "string"),
    "bad_id": (C, jsonl([GOOD[0], '{"_id": "", "text": "x"}', GOOD[2]]), 2, "'_id'"),
    "duplicate_doc": (C, jsonl([*GOOD, '{"_id": "d2", "text": "again"}']), 4, "line 2"),
    "query_missing_text": (Q, jsonl(['{"_id": "q1", "text": "a"}', '{"_id": "q2"}']), 2, "'text'"),
    "duplicate_query": (Q, jsonl(['{"_id": "q1", "text": "a"}', '{"_id": "q1", "text": "b"}']), 2, "unique"),
    "qrels_columns": (R, H + "q1\td1\t1\nq2 d2 1\n", 3, "3 tab"),
    "qrels_four_columns": (R, H + "q1\t0\td1\t1\n", 2, "got 4"),
    "qrels_score": (R, H + "q1\td1\t1\nq2\td2\t1.5\n", 3, "integer"),
    "qrels_duplicate": (R, H + "q1\td1\t1\nq2\td2\t1\nq1\td1\t2\n", 4, "line 2"),
    "qrels_missing_doc": (R, H + "q1\td1\t1\nq2\tnope\t1\n", 3, "corpus-id present"),
    "qrels_missing_query": (R, H + "q9\td1\t1\n", 2, "query-id present"),
    "qrels_no_header": (R, "q1\td1\t1\nq2\td2\t1\n", 1, "header"),
    "qrels_empty": (R, H, None, "at least one judgement"),
    "qrels_empty_file": (R, "", None, "at least one judgement"),
}
# problems are collected over the whole file: the message counts them
BAD_CASES.update(
    {
        "query_empty_text": (
            Q,
            jsonl(['{"_id": "q1", "text": "a"}', '{"_id": "q2", "text": " "}']),
            2,
            "non-empty",
        ),
        "many_missing_ids": (
            C,
            jsonl([GOOD[0], '{"text": "x"}', GOOD[2], '{"text": "y"}']),
            2,
            "(2 lines fail: 2, 4)",
        ),
        "ids_and_duplicates": (
            C,
            jsonl([*GOOD, '{"text": "x"}', '{"_id": "d1", "text": "again"}', '{"_id": "d2", "text": "z"}']),
            4,
            "unique document ids (2 lines fail: 5, 6)",
        ),
        "qrels_unknown_queries": (R, H + "q1\td1\t1\nq7\td1\t1\nq8\td2\t1\n", 3, "(2 lines fail: 3, 4)"),
    }
)


def test_empty_documents_are_kept_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [*GOOD, '{"_id": "d4", "title": "", "text": " "}', '{"_id": "d5", "text": ""}']
    folder = write(tmp_path / "empty_docs", corpus=jsonl(rows))
    with caplog.at_level("WARNING"):
        data = load_beir(str(folder))
    assert data.num_docs == len(GOOD) + 2
    assert "2 empty document(s) kept" in caplog.text and "'d4', 'd5'" in caplog.text


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_line(tmp_path: Path, case: str) -> None:
    fname, text, line, words = BAD_CASES[case]
    folder = write(
        tmp_path / case,
        corpus=text if fname == C else None,
        queries=text if fname == Q else None,
        qrels=text if fname == R else None,
    )
    with pytest.raises(DataFormatError) as e:
        load_beir(str(folder))
    err = e.value
    assert err.path == folder / fname and err.line == line
    where = f"{folder / fname}:{line}: expected" if line is not None else f"{folder / fname}: expected"
    msg = str(err)
    assert msg.startswith(where), msg
    assert words in msg, msg


def test_invalid_utf8(tmp_path: Path) -> None:
    folder = write(tmp_path / "x")
    (folder / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"queries\.jsonl:2: expected UTF-8"):
        load_beir(str(folder))


def test_bad_input_is_not_cached(tmp_path: Path) -> None:
    folder = write(tmp_path / "x", qrels="query-id\tcorpus-id\tscore\nq1\td1\tx\n")
    for _ in range(2):
        with pytest.raises(DataFormatError, match="integer"):
            load_beir(str(folder))
    (folder / "qrels" / "test.tsv").write_text(QRELS)
    assert load_beir(str(folder)).qrels.num_pairs() == 3
