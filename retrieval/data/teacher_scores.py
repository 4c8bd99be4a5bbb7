"""The teacher-score file of ``python -m retrieval.teachers``: its columns, and the checked reader.

One parquet file keyed by (query id, doc id): ``query_id``, ``doc_id`` (str), ``label`` (int, 0
when not judged), ``bm25_rank`` / ``dense_rank`` (nullable ints: the candidate's rank in each
miner's list) and one float column per teacher. Training reads it through
:func:`read_teacher_scores`, which refuses what it cannot use before anything is trained.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from retrieval.data.training import TrainingSet

TEACHER_COLUMNS = ("bm25", "dense", "splade")  # the teachers retrieval.teachers computes
KEY_COLUMNS = ("query_id", "doc_id", "label")
SHOWN = 3  # offending ids quoted in an error


class TeacherScoresError(ValueError):
    """A teacher-scores file (:mod:`retrieval.teachers`) that cannot be used; the message names it."""


def teacher_columns(frame: pl.DataFrame) -> list[str]:
    """The teacher-score columns of ``frame``: every column but the keys, the label and the ranks."""
    return [c for c in frame.columns if c not in KEY_COLUMNS and not c.endswith("_rank")]


def _ids(values) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:SHOWN])
    return shown + (", ..." if len(values) > SHOWN else "")


def check_teacher_scores(frame: pl.DataFrame, path: str | Path, training: TrainingSet | None = None) -> None:
    """Refuse a teacher-scores table training cannot use (see :func:`read_teacher_scores`)."""
    if frame.height == 0:
        raise TeacherScoresError(f"{path}: empty (0 rows); rerun python -m retrieval.teachers")
    missing = [c for c in KEY_COLUMNS if c not in frame.columns]
    if missing:
        raise TeacherScoresError(f"{path}: missing columns {missing}; found {frame.columns}")
    teachers = teacher_columns(frame)
    if not teachers:
        raise TeacherScoresError(
            f"{path}: no teacher column (expected one of {list(TEACHER_COLUMNS)}); found {frame.columns}"
        )
    for col, ok in (("query_id", pl.Utf8), ("doc_id", pl.Utf8)):
        if frame.schema[col] != ok:
            raise TeacherScoresError(f"{path}: column {col!r} is {frame.schema[col]}, expected a string")
    if not frame.schema["label"].is_integer():
        raise TeacherScoresError(f"{path}: column 'label' is {frame.schema['label']}, expected an integer")
    for col in teachers:
        if not frame.schema[col].is_numeric():
            dtype = frame.schema[col]
            raise TeacherScoresError(f"{path}: teacher column {col!r} is {dtype}, expected floats")
        bad = frame.filter(~pl.col(col).is_finite().fill_null(False))
        if bad.height:
            pairs = list(zip(bad["query_id"], bad["doc_id"], strict=True))
            raise TeacherScoresError(
                f"{path}: {bad.height} non-finite or null {col!r} scores, e.g. (query, doc) {_ids(pairs)}"
            )
    repeated = frame.group_by("query_id", "doc_id", maintain_order=True).len().filter(pl.col("len") > 1)
    if repeated.height:
        pairs = list(zip(repeated["query_id"], repeated["doc_id"], strict=True))
        raise TeacherScoresError(f"{path}: {len(pairs)} (query_id, doc_id) pairs repeated: {_ids(pairs)}")
    if training is not None:
        _check_against(frame, path, training)


def _check_against(frame: pl.DataFrame, path: str | Path, training: TrainingSet) -> None:
    """Every query id must be a training query and every doc id a corpus document."""
    queries = frame["query_id"].unique(maintain_order=True)
    unknown_q = queries.filter(~queries.is_in(list(training.queries))).to_list()
    if unknown_q:
        raise TeacherScoresError(
            f"{path}: {len(unknown_q)} query ids are not training queries of {training.name} "
            f"({training.qrels_path}): {_ids(unknown_q)}; were the scores computed for another training set?"
        )
    docs = frame["doc_id"].unique(maintain_order=True)
    unknown_d = docs.filter(~docs.is_in(training.corpus["doc_id"].implode())).to_list()
    if unknown_d:
        raise TeacherScoresError(
            f"{path}: {len(unknown_d)} doc ids are not in {training.dataset_path / 'corpus.jsonl'} "
            f"({training.corpus.height} documents): {_ids(unknown_d)}"
        )


def read_teacher_scores(path: str | Path, training: TrainingSet | None = None) -> pl.DataFrame:
    """Read a file written by ``python -m retrieval.teachers``, refusing what training cannot use.

    Args:
        path: (str | Path) the parquet file.
        training: (TrainingSet | None) when given, every query id must be one of its queries and
            every doc id in its corpus. Default None.

    Returns:
        DataFrame ``query_id``, ``doc_id``, ``label``, ``bm25_rank``/``dense_rank`` (when present)
        and the teacher columns (:func:`teacher_columns`), as stored.

    Raises:
        TeacherScoresError: naming the file: missing, unreadable, empty, missing columns (the keys,
            the label, or any teacher column), non-finite scores, repeated pairs, or (with
            ``training``) unknown query or doc ids (count and the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherScoresError(f"{path}: no such file; create it with python -m retrieval.teachers")
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise TeacherScoresError(f"{path}: not a readable parquet file ({err})") from err
    check_teacher_scores(frame, path, training)
    return frame
