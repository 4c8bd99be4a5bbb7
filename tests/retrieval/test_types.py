"""Run / Qrels: construction, trec_eval rank order, TREC and BEIR file IO."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.data.errors import DataFormatError
from retrieval.types import ItemSets, Qrels, Run, trec_order


def test_constructors_keep_working():
    qrels = Qrels({"q1": {"d1": 1, "d2": 0}, 7: {8: 2}}, name="dev")
    assert qrels["q1"] == {"d1": 1, "d2": 0} and qrels["7"] == {"8": 2}
    assert qrels.num_pairs() == 3 and qrels.name == "dev" and len(qrels) == 2
    run = Run({"q1": {"d1": 1, "d2": 0.5}}, name="bm25")
    assert run["q1"] == {"d1": 1.0, "d2": 0.5} and isinstance(run["q1"]["d1"], float)
    assert run.name == "bm25" and "queries=1" in repr(run)
    assert run.to_dict() == {"q1": {"d1": 1.0, "d2": 0.5}}


def test_trec_order():
    ids = ["a", "b", "c", "d", "e"]
    scores = [1.0, 3.0, 1.0 + 1e-9, 2.0, -math.inf]
    order = trec_order(ids, np.array(scores))
    assert order.dtype == np.int64 and order.shape == (5,)
    assert [ids[i] for i in order] == ["b", "d", "c", "a", "e"]  # a/c tie in float32 -> "c" first
    assert trec_order([], []).shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        trec_order(["a"], [math.nan])
    with pytest.raises(ValueError, match="one length"):
        trec_order(["a", "b"], [1.0])


def test_run_ranked():
    run = Run({"q": {"x": 0.5, "b": 1.0, "a": 1.0, "B": 1.0}})
    assert run.ranked("q") == [("b", 1.0), ("a", 1.0), ("B", 1.0), ("x", 0.5)]
    assert Run({"q": {}}).ranked("q") == []


def test_run_round_trip(tmp_path: Path):
    scores = {"d1": 0.1 + 0.2, "d2": 1e-300, "d3": -0.0, "d4": math.inf, "d5": 12345678.123456789}
    run = Run({"q1": scores, "q2": {"x": 1.0}}, name="my-run")
    path = tmp_path / "out" / "run.trec"
    run.to_trec(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d4 1 inf my-run"
    assert [line.split()[3] for line in lines[:5]] == ["1", "2", "3", "4", "5"]
    back = Run.from_trec(path)
    assert back.to_dict() == run.to_dict() and back.name == "my-run"
    assert math.copysign(1.0, back["q1"]["d3"]) == -1.0  # exact, sign of zero included
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left
    run.to_trec(path, tag="other")
    assert Run.from_trec(path).name == "other"
    assert Run.from_trec(path, name="forced").name == "forced"


def test_run_reads_rank_column_but_ranks_by_score(tmp_path: Path):
    path = tmp_path / "r.txt"
    path.write_text("# comment\n\nq1 Q0 a 1 0.5 t1\nq1 Q0 b 2 0.9 t1\nq2 Q0 a 1 -3e2 t2\n")
    run = Run.from_trec(path)
    assert run.to_dict() == {"q1": {"a": 0.5, "b": 0.9}, "q2": {"a": -300.0}}
    assert run.name == "t2"  # the last line's tag, as trec_eval's runid
    assert [d for d, _ in run.ranked("q1")] == ["b", "a"]


def test_failed_write_keeps_old_file(tmp_path: Path):
    path = tmp_path / "run.trec"
    Run({"q": {"a": 1.0}}).to_trec(path)
    before = path.read_text()
    with pytest.raises(ValueError, match="whitespace"):
        Run({"q": {"a b": 1.0}}).to_trec(path)
    with pytest.raises(ValueError, match="whitespace"):
        Run({"q": {"a": 1.0}}).to_trec(path, tag="two words")
    assert path.read_text() == before
    assert list(tmp_path.iterdir()) == [path]


def test_qrels_round_trip_and_formats(tmp_path: Path):
    qrels = Qrels({"q1": {"d1": 2, "d2": 0, "d3": -1}, "q2": {"d1": 1}})
    path = tmp_path / "qrels.txt"
    qrels.to_trec(path)
    assert path.read_text().splitlines()[0] == "q1 0 d1 2"
    assert Qrels.from_trec(path).to_dict() == qrels.to_dict()
    assert Qrels.read(path).to_dict() == qrels.to_dict() and Qrels.read(path).name == "qrels"
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq1\td3\t-1\nq2\td1\t1\n")
    assert Qrels.from_beir_tsv(beir).to_dict() == qrels.to_dict()
    assert Qrels.read(beir).to_dict() == qrels.to_dict() and Qrels.read(beir, name="t").name == "t"


@pytest.mark.parametrize(
    "reader, content, line, expected",
    [
        (Qrels.from_trec, "q1 0 d1 1\nq1 0 d1\n", 2, "4 whitespace-separated fields"),
        (Qrels.from_trec, "q1 0 d1 1.0\n", 1, "an integer relevance label"),
        (Qrels.from_trec, "# c\n\nq1 0 d1 1\nq1 0 d1 1\n", 4, "one judgement per (query, doc) pair"),
        (Qrels.from_beir_tsv, "q1\td1\t1\n", 1, "the header"),
        (Qrels.from_beir_tsv, "query-id\tcorpus-id\tscore\nq1\td1\t1\tx\n", 2, "3 tab-separated fields"),
        (Qrels.from_beir_tsv, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t0\n", 3, "one judgement"),
        (Run.from_trec, "q1 Q0 d1 1 0.5 t x\n", 1, "6 whitespace-separated fields"),
        (Run.from_trec, "q1 Q0 d1 1.5 0.5 t\n", 1, "an integer rank"),
        (Run.from_trec, "q1 Q0 d1 1 1_0 t\n", 1, "a float (not NaN) score"),
        (Run.from_trec, "q1 Q0 d1 1 NaN t\n", 1, "a float (not NaN) score"),
        (Run.from_trec, "q1 Q0 d1 1 1 t\nq2 Q0 d1 1 1 t\nq1 Q0 d1 2 0 t\n", 3, "each doc at most once"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, reader, content, line, expected):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DataFormatError) as info:
        reader(path)
    assert info.value.line == line and info.value.path == path
    assert str(info.value).startswith(f"{path}:{line}: expected {expected}")


def test_whole_file_errors(tmp_path: Path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="empty file"):
        Qrels.from_beir_tsv(empty)
    assert len(Qrels.from_trec(empty)) == 0 and len(Run.from_trec(empty)) == 0
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("q1 0 d\xe9 1\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match="UTF-8"):
        Qrels.from_trec(latin)
    with pytest.raises(FileNotFoundError):
        Run.from_trec(tmp_path / "absent")


def test_item_sets_unchanged():
    sets = ItemSets.from_pairs(
        torch.tensor([0, 0, 1, 0]), torch.tensor([2, 1, 0, 2]), num_users=3, num_items=4
    )
    assert sets.indptr.tolist() == [0, 2, 3, 3] and sets.indices.tolist() == [1, 2, 0]
    assert sets.sizes().tolist() == [2, 1, 0]


def _random_item_sets(U: int, N: int, nnz: int, seed: int) -> ItemSets:
    g = torch.Generator().manual_seed(seed)
    return ItemSets.from_pairs(
        torch.randint(0, U, (nnz,), generator=g), torch.randint(0, N, (nnz,), generator=g), U, N
    )


@pytest.mark.parametrize("nnz", [0, 5, 200])
def test_item_sets_contains_is_set_membership(nnz):
    sets = _random_item_sets(12, 9, nnz, seed=nnz)
    users = torch.arange(12).unsqueeze(1)  # (12, 1) broadcast against every item
    got = sets.contains(users, torch.arange(9).unsqueeze(0))  # (12, 9)
    rows = [set(sets.indices[sets.indptr[u] : sets.indptr[u + 1]].tolist()) for u in range(12)]
    assert got.dtype == torch.bool and got.tolist() == [[i in row for i in range(9)] for row in rows]


def test_item_sets_rows_with_a_known_output_size():
    sets = _random_item_sets(20, 15, 120, seed=3)
    users = torch.tensor([4, 0, 19, 4, 7])
    row, item = sets.rows(users)
    n = int(sets.sizes()[users].sum())
    row_n, item_n = sets.rows(users, output_size=n)
    assert row.numel() == n and torch.equal(row, row_n) and torch.equal(item, item_n)
    assert torch.equal(sets.row_ids(), sets.rows(torch.arange(20))[0])
