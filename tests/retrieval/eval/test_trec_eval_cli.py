"""Tests of ``python -m retrieval.trec_eval``: end to end as a subprocess, details in process.

(Each subprocess pays for importing torch, ~2 s, so only a few tests start one.)"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.trec_eval import main

REPO = Path(__file__).resolve().parents[3]

# q1: d1=2, d2=0, d3=1; q2: a=1; q3: z=1 (missing from the run). Run: q1 d1 0.9, then d2 and
# d3 tied at 0.8 -> d3 first (doc ids descending); q2 retrieves only b (unjudged); q4 unjudged.
QRELS = "q1 0 d1 2\nq1 0 d2 0\nq1 0 d3 1\nq2 0 a 1\nq3 0 z 1\n"
RUN = "q1 Q0 d1 1 0.9 runA\nq1 Q0 d2 2 0.8 runA\nq1 Q0 d3 3 0.8 runA\nq2 Q0 b 1 2.0 runA\nq4 Q0 a 1 1 runA\n"


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "retrieval.trec_eval", *args], capture_output=True, text=True, cwd=REPO,
        timeout=60,
    )  # fmt: skip


@pytest.fixture
def cli(capsys):
    """Run ``main`` in this process; same (returncode, stdout, stderr) as :func:`_cli`."""

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out, err)

    return run


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "qrels.txt").write_text(QRELS)
    (tmp_path / "run.txt").write_text(RUN)
    return str(tmp_path / "qrels.txt"), str(tmp_path / "run.txt")


def _line(name: str, qid: str, value: float) -> str:
    return f"{name:<22}\t{qid}\t{value:6.4f}"


def test_all_lines_in_trec_eval_format(files):
    res = _cli("-m", "ndcg_cut.10", "-m", "P.2", "-m", "recip_rank", "-m", "map", *files)
    assert res.returncode == 0, res.stderr
    # q1 is perfect, q2 scores 0; mean over the 2 queries in both files
    assert res.stdout.splitlines() == [
        "map                   \tall\t0.5000",
        "recip_rank            \tall\t0.5000",
        "P_2                   \tall\t0.5000",
        "ndcg_cut_10           \tall\t0.5000",
    ]
    assert res.stderr == ""


def test_query_lines_come_first(cli, files):
    res = cli("-q", "-m", "recall.1,2", "-m", "success.1", *files)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        _line("recall_1", "q1", 0.5),
        _line("recall_2", "q1", 1.0),
        _line("success_1", "q1", 1.0),
        _line("recall_1", "q2", 0.0),
        _line("recall_2", "q2", 0.0),
        _line("success_1", "q2", 0.0),
        _line("recall_1", "all", 0.25),
        _line("recall_2", "all", 0.5),
        _line("success_1", "all", 0.5),
    ]


def test_complete_counts_every_qrels_query(files):
    res = _cli("-c", "-q", "-m", "map", "-m", "map_cut.1", *files)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert _line("map", "q3", 0.0) in lines  # missing from the run: scored 0 and printed
    # q1: AP = 1, AP@1 = (1/1) / R = 1/2; q2 and q3 score 0; three queries
    assert lines[-2:] == [_line("map", "all", 1 / 3), _line("map_cut_1", "all", 0.5 / 3)]


def test_ndcg_value_by_hand(cli, tmp_path):
    (tmp_path / "q").write_text("1 0 a 3\n1 0 b 2\n1 0 c 1\n")
    (tmp_path / "r").write_text("1 Q0 c 1 3 t\n1 Q0 x 2 2 t\n1 Q0 a 3 1 t\n")
    res = cli("-m", "ndcg_cut.3", str(tmp_path / "q"), str(tmp_path / "r"))
    dcg = 1 + 3 / math.log2(4)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert res.stdout == _line("ndcg_cut_3", "all", dcg / idcg) + "\n"


def test_default_measures_and_beir_qrels(cli, tmp_path, files):
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq1\td3\t1\nq2\ta\t1\nq3\tz\t1\n")
    res = cli(str(beir), files[1])
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0].strip() for line in res.stdout.splitlines()] == [
        "map",
        "recip_rank",
        "recall_100",
        "ndcg_cut_10",
    ]
    assert res.stdout == cli(*files).stdout


def test_drop_self_hits(cli, tmp_path):
    (tmp_path / "q").write_text("q1 0 q1 1\nq1 0 d 1\n")
    (tmp_path / "r").write_text("q1 Q0 q1 1 2 t\nq1 Q0 d 2 1 t\n")
    args = ["-m", "P.1", str(tmp_path / "q"), str(tmp_path / "r")]
    assert cli(*args).stdout == _line("P_1", "all", 1.0) + "\n"
    assert cli("--drop-self-hits", *args).stdout == _line("P_1", "all", 1.0) + "\n"
    (tmp_path / "q").write_text("q1 0 d 1\n")
    assert cli(*args).stdout == _line("P_1", "all", 0.0) + "\n"
    assert cli("--drop-self-hits", *args).stdout == _line("P_1", "all", 1.0) + "\n"


@pytest.mark.parametrize(
    "which, content, expected",
    [
        ("run", "q1 Q0 d1 1 0.9\n", ":1: expected 6 whitespace-separated fields"),
        ("run", "q1 Q0 d1 1 0.9 t\nq1 Q0 d1 2 0.5 t\n", ":2: expected each doc at most once per query"),
        ("run", "q1 Q0 d1 x 0.9 t\n", ":1: expected an integer rank"),
        ("run", "q1 Q0 d1 1 nan t\n", ":1: expected a float (not NaN) score"),
        ("qrels", "q1 0 d1\n", ":1: expected 4 whitespace-separated fields"),
        ("qrels", "# comment\nq1 0 d1 1\nq1 0 d1 2\n", ":3: expected one judgement per (query, doc) pair"),
        ("qrels", "q1 0 d1 high\n", ":1: expected an integer relevance label"),
        ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\n", ":2: expected 3 tab-separated fields"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, files, tmp_path, which, content, expected):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    args = [files[0], str(bad)] if which == "run" else [str(bad), files[1]]
    res = cli(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"trec_eval: {bad}{expected}"), res.stderr


def test_duplicate_message_names_the_first_line(cli, files, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("q1 0 a 1\nq1 0 d1 1\nq1 0 d1 0\n")
    assert "first judged on line 2" in cli(str(bad), files[1]).stderr


def test_missing_file_and_no_common_query(cli, files, tmp_path):
    res = cli(files[0], str(tmp_path / "absent.run"))
    assert res.returncode == 2 and "absent.run" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "other.run").write_text("zz Q0 d1 1 1 t\n")
    res = cli(files[0], str(tmp_path / "other.run"))
    assert res.returncode == 2 and "no queries with both" in res.stderr
    assert cli("-c", "-m", "map", files[0], str(tmp_path / "other.run")).returncode == 0


@pytest.mark.parametrize("args", [["-m", "bpref"], ["-m", "P.0"], ["-m", "map.5"], ["-l", "0"]])
def test_bad_options_exit_2(cli, files, args):
    res = cli(*args, *files)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "error:" in res.stderr


def test_bad_input_end_to_end(files, tmp_path):
    bad = tmp_path / "bad.run"
    bad.write_text("q1 Q0 d1 1 0.9 t\nq1 Q0 d1 2 0.8 t\n")
    res = _cli(files[0], str(bad))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == (
        f"trec_eval: {bad}:2: expected each doc at most once per query, "
        "found '(q1, d1) again, first on line 1'\n"
    )
