"""A trec_eval-compatible command line: ``python -m retrieval.trec_eval [-q] [-c] [-m M]... QRELS RUN``.

Prints ``measure<TAB>qid<TAB>value`` lines formatted as trec_eval does (``%-22s\\t%s\\t%6.4f``):
with ``-q`` one block per evaluated query (queries in byte order, measures in trec_eval's
order) before the ``all`` lines. The numbers follow :mod:`retrieval.eval.trec` (float32 score
comparison, ties by doc id descending, unjudged = non-relevant).

Examples::

    python -m retrieval.trec_eval -m ndcg_cut.10 -m recall.100 -m recip_rank -m map qrels.txt run.trec
    python -m retrieval.trec_eval -c -q -m ndcg_cut.5,10 -m P.10 qrels/test.tsv run.trec

Measures: ``ndcg_cut.K``, ``recall.K``, ``P.K``, ``map_cut.K``, ``success.K`` (comma lists
``ndcg_cut.5,10``; no list = trec_eval's defaults), ``recip_rank``, ``map``. Without ``-m``:
``ndcg_cut.10 recall.100 recip_rank map``. ``QRELS`` is TREC (``qid iter docid label``) or
BEIR tsv (header ``query-id corpus-id score``); ``RUN`` is TREC (``qid Q0 docid rank score tag``).

Differences from trec_eval, all deliberate: repeated ``-m`` for one family are merged
(trec_eval keeps the first); bad input is reported as one line ``trec_eval: FILE:LINE:
expected ...`` with exit status 2, including a run or qrels with a repeated (query, doc)
pair; with neither ``-c`` nor a query in both files the exit status is 2 (trec_eval: 7).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from retrieval.eval.trec import mean, parse_measures, per_query
from retrieval.types import Qrels, Run

DEFAULT_MEASURES = ("ndcg_cut.10", "recall.100", "recip_rank", "map")


def _line(name: str, qid: str, value: float) -> str:
    return f"{name:<22}\t{qid}\t{value:6.4f}\n"


def format_results(per_q: dict[str, dict[str, float]], means: dict[str, float], query_lines: bool) -> str:
    """trec_eval's text output: per-query lines (if ``query_lines``), then the ``all`` lines."""
    out = []
    if query_lines:
        for qid, values in per_q.items():
            out.extend(_line(name, qid, v) for name, v in values.items())
    out.extend(_line(name, "all", v) for name, v in means.items())
    return "".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retrieval.trec_eval",
        description="Evaluate a TREC run against qrels with trec_eval's conventions.",
    )
    p.add_argument(
        "-m",
        "--measure",
        action="append",
        metavar="MEASURE[.K,...]",
        help=f"measure to compute, repeatable (default: {' '.join(DEFAULT_MEASURES)})",
    )
    p.add_argument("-q", "--query_eval_wanted", action="store_true", help="also print each query's values")
    p.add_argument(
        "-c",
        "--complete_rel_info_wanted",
        action="store_true",
        help="average over every qrels query; queries missing from the run score 0",
    )
    p.add_argument(
        "-l",
        "--level_for_rel",
        type=int,
        default=1,
        metavar="NUM",
        help="minimum label of a relevant document (default 1)",
    )
    p.add_argument(
        "--drop-self-hits",
        action="store_true",
        help="BEIR: ignore retrieved documents whose id equals the query id",
    )
    p.add_argument("qrels", help="TREC qrels or BEIR qrels tsv")
    p.add_argument("run", help="TREC run file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad usage or bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        measures = parse_measures(args.measure or DEFAULT_MEASURES)
    except ValueError as e:
        parser.error(str(e))  # exits 2 with the usage line
    if args.level_for_rel < 1:
        parser.error(f"-l must be >= 1, got {args.level_for_rel}")
    try:
        qrels = Qrels.read(args.qrels)
        run = Run.from_trec(args.run)
        per_q = per_query(
            run,
            qrels,
            measures,
            complete=args.complete_rel_info_wanted,
            drop_self_hits=args.drop_self_hits,
            relevance_level=args.level_for_rel,
        )
        if not per_q:
            raise ValueError(f"no queries with both results ({args.run}) and relevance info ({args.qrels})")
        text = format_results(per_q, mean(per_q), args.query_eval_wanted)
    except OSError as e:
        sys.stderr.write(f"trec_eval: cannot read {e.filename or ''}: {e.strerror or e}\n")
        return 2
    except ValueError as e:  # DataFormatError is a ValueError
        sys.stderr.write(f"trec_eval: {e}\n")
        return 2
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: not an error; silence the final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
