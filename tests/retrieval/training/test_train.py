"""python -m retrieval.train end to end on a small unseen BEIR folder, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import torch
from omegaconf import DictConfig

from retrieval import train as train_cli
from retrieval.cli import ConfigError
from retrieval.data.teacher_scores import TeacherScoresError
from retrieval.data.training import TrainingDataError
from retrieval.training.data import SparseTrainingData, candidate_tables
from tests.retrieval.helpers import SPLADE_TINY, TOPICS, compose_job, splade_tiny, tiny_llama, write_beir

REPO = Path(__file__).resolve().parents[3]

TRAIN = {
    "t1": ("honey making insects", "bees"),
    "t2": ("lava and magma eruptions", "volcano"),
    "t3": ("blood glucose hormone", "insulin"),
    "t4": ("icy body with a tail", "comet"),
    "t5": ("grain for bread flour", "wheat"),
    "t6": ("moving rivers of ice", "glacier"),
}
TEST = {"q1": ("which insects make honey", "bees"), "q2": ("what carves valleys of ice", "glacier")}
Train = Callable[..., dict]  # train(out, *overrides) -> metrics: the `train` fixture


def _teachers(path: Path) -> Path:
    """Candidates: the positive and every other document, with made-up but consistent scores."""
    rows = []
    docs = [f"{n}-{i}" for n in TOPICS for i in range(4)]
    for qid, (_, topic) in TRAIN.items():
        for rank, doc in enumerate(sorted(docs, key=lambda d: (not d.startswith(topic), d)), start=1):
            good = doc == f"{topic}-0"
            rows.append(
                {
                    "query_id": qid,
                    "doc_id": doc,
                    "label": int(good),
                    "bm25_rank": rank,
                    "dense_rank": rank,
                    "bm25": 10.0 - rank * 0.1 + 5 * good,
                    "dense": 0.9 if good else 0.2 + 0.01 * rank,
                    "splade": 20.0 if good else 5.0,
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six topics of four documents: one topical, three notes; each query judges its topic's document."""
    splits = {
        split: {qid: (text, [f"{topic}-0"]) for qid, (text, topic) in queries.items()}
        for split, queries in (("train", TRAIN), ("test", TEST))
    }
    return write_beir(tmp_path_factory.mktemp("train") / "tinytrain", splits, notes=3)


@pytest.fixture(scope="module")
def teacher_file(beir_dir: Path) -> Path:
    return _teachers(beir_dir.parent / "teachers.parquet")


def _cfg(beir_dir: Path, teacher_file: Path, out: Path, *overrides: str) -> DictConfig:
    args = [
        f"dataset.path={beir_dir}",
        f"data.teacher_file={teacher_file}",
        f"model.backbone={splade_tiny()}",
        f"paths.indexes_dir={out / 'indexes'}",
        "data.batch_size=3",
        "data.negatives=2",
        "data.negative_depth=8",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "module.lr_warmup_steps=1",
        "module.flops_warmup_steps=2",
        "module.optimizer.lr=1e-3",
        "module.doc_max_length=32",
        "evaluate.latency_queries=2",
        *overrides,
    ]
    return compose_job("retrieval_train", args, out)


@pytest.fixture
def train(beir_dir: Path, teacher_file: Path) -> Train:
    """``train(out, *overrides)``: one run of the training job on the tiny folder; its metrics."""

    def run(out: Path, *overrides: str) -> dict:
        return train_cli.run(_cfg(beir_dir, teacher_file, out, *overrides))

    return run


def test_candidate_tables_combine_teachers_per_query(beir_dir: Path, teacher_file: Path) -> None:
    data = SparseTrainingData(str(beir_dir), str(teacher_file), teachers=("bm25", "dense"), negatives=2)
    data.prepare()
    frame = pl.read_parquet(teacher_file)
    rows = dict(zip(data.training.corpus["doc_id"], data.training.corpus["doc"], strict=True))
    cands = candidate_tables(frame, rows, ["bm25", "dense"], 30.0, negative_depth=3)
    assert cands.docs.shape == (6, 24)
    # the positive is each teacher's maximum: min-max gives 1 for both, average 1, times S
    assert torch.allclose(cands.target[cands.positive], torch.full((6,), 30.0))
    assert cands.target.min() >= 0 and cands.target.max() <= 30.0
    # negatives: non-positive candidates within depth 3 of a miner (ranks 2 and 3)
    assert cands.negative.sum(1).tolist() == [2] * 6
    item = data.examples[0]
    assert len(item["docs"]) == 3 and item["target"][0] == 30.0  # positive first
    assert item["rows"].shape == (3,) and item["rows"][0] in item["positives"].tolist()
    assert not set(item["rows"][1:].tolist()) & set(item["positives"].tolist())
    with pytest.raises(TrainingDataError, match="not in the teacher file"):
        candidate_tables(frame, rows, ["colbert"], 30.0, 3)


def test_inference_free_training_end_to_end(train: Train, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    metrics = train(tmp_path)
    model_dir = tmp_path / "model"
    assert {"config.json", "idf.json", "sparrow.json"} <= {p.name for p in model_dir.iterdir()}
    trained = AutoModelForMaskedLM.from_pretrained(model_dir)
    original = AutoModelForMaskedLM.from_pretrained(SPLADE_TINY)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), original.state_dict().values(), strict=True)
    ]
    assert any(changed), "training did not update the backbone"
    test = metrics["test"]
    assert 0.0 <= test["ndcg@10"] <= 1.0 and test["avg_doc_nnz"] > 0
    assert metrics["train"]["train_steps"] == 4  # 6 queries, batch 3, 2 epochs
    assert (tmp_path / "report.md").is_file()
    # the query side of the test index is the model's own idf.json (inference-free)
    assert json.loads((model_dir / "idf.json").read_text())["format"] == "sparrow-idf-1"


def test_unit_query_weights_for_the_plain_flops_baseline(train: Train, tmp_path: Path) -> None:
    train(tmp_path, "model.query=ones", "trainer.max_epochs=1")
    table = json.loads((tmp_path / "model" / "idf.json").read_text())["idf"]
    assert set(table.values()) == {1.0}


def test_siamese_and_trainable_idf(train: Train, beir_dir: Path, tmp_path: Path) -> None:
    train(tmp_path / "s", "model.query=splade", "evaluate.split=null")
    assert not (tmp_path / "s" / "model" / "idf.json").exists()
    out = tmp_path / "t"
    train(out, "model.idf_trainable=true", "module.idf_lr=0.5", "evaluate.split=null")
    from retrieval.encoders.inference_free import InferenceFreeQueryEncoder

    saved = InferenceFreeQueryEncoder.load(out / "model", out / "model" / "idf.json").idf
    fitted = InferenceFreeQueryEncoder.fit(SPLADE_TINY, _corpus_texts(beir_dir), max_length=32).idf
    assert not torch.allclose(saved, fitted), "a trainable IDF table was not trained"


def _corpus_texts(beir_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in open(beir_dir / "corpus.jsonl")]
    return [f"{r['title']} {r['text']}".strip() for r in rows]


def test_held_out_training_queries_validate_and_are_never_trained_on(beir_dir, teacher_file) -> None:
    data = SparseTrainingData(str(beir_dir), str(teacher_file), negatives=2, val_fraction=0.34, val_seed=3)
    data.prepare()
    held = set(data.val.queries["query_id"].to_list())
    assert len(held) == 2 and set(data.val.qrels) == held  # round(0.34 * 6)
    assert held.isdisjoint(data.examples.query_ids) and len(data.examples) == 4
    again = SparseTrainingData(str(beir_dir), str(teacher_file), negatives=2, val_fraction=0.34, val_seed=3)
    again.prepare()
    assert set(again.val.queries["query_id"].to_list()) == held  # the draw depends on the seed only
    with pytest.raises(TrainingDataError, match="not both"):
        SparseTrainingData(str(beir_dir), str(teacher_file), val_split="test", val_fraction=0.2)


@pytest.mark.parametrize("validation", ["data.val_split=test", "data.val_fraction=0.34"])
def test_validation_selects_a_checkpoint(train: Train, tmp_path: Path, validation: str) -> None:
    metrics = train(tmp_path, validation, "callbacks=default", "evaluate.split=null")
    assert 0.0 <= metrics["val"]["val/ndcg@10"] <= 1.0
    assert metrics["val"]["val/doc_nnz"] > 0


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("module.flops_warmup_steps=0", ConfigError, "T must be > 0"),
        ("model.query=bm25", ConfigError, "model.query must be one of"),
        ("module.flops_form=l1", ConfigError, "module.flops_form must be"),
        ("model.idf_trainable=true", ConfigError, "idf_lr"),
    ],
)
def test_bad_settings_fail_before_training(train: Train, tmp_path: Path, override, error, message) -> None:
    with pytest.raises(error, match=message):
        train(tmp_path, override)


def test_bad_training_files_are_refused(train: Train, teacher_file: Path, tmp_path: Path) -> None:
    bad_qrels = tmp_path / "bad.tsv"
    bad_qrels.write_text("query-id\tcorpus-id\tscore\nt1\tbees-0\t1\nt2\tno-such-doc\t1\n")
    with pytest.raises(TrainingDataError, match="no-such-doc"):
        train(tmp_path, f"data.train_qrels={bad_qrels}")
    empty = tmp_path / "empty.parquet"
    pl.read_parquet(teacher_file).head(0).write_parquet(empty)
    with pytest.raises(TeacherScoresError, match="empty"):
        train(tmp_path, f"data.teacher_file={empty}")
    unknown = tmp_path / "unknown.parquet"
    pl.read_parquet(teacher_file).with_columns(pl.lit("ghost").alias("query_id")).write_parquet(unknown)
    with pytest.raises(TeacherScoresError, match="ghost"):
        train(tmp_path, f"data.teacher_file={unknown}")


def test_idf_file_of_another_vocabulary_is_refused(train: Train, tmp_path: Path) -> None:
    table = {
        "format": "sparrow-idf-1",
        "tokenizer": "x",
        "num_docs": 1,
        "max_length": None,
        "idf": {"[PAD]": 1.0, "hello": 2.0},
    }
    path = tmp_path / "idf.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ConfigError, match="model.idf_file"):
        train(tmp_path, f"model.idf_file={path}")


def test_command_line_reports_bad_input_in_one_line(beir_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "retrieval.train",
        f"dataset.path={beir_dir}",
        f"data.teacher_file={tmp_path}/none.parquet",
        f"model.backbone={SPLADE_TINY}",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "none.parquet" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_two_process_ddp_training(train: Train, tmp_path: Path) -> None:
    """Lightning DDP on 2 CPU processes (gloo): documents gathered across ranks, one saved model."""
    metrics = train(
        tmp_path,
        "+trainer.strategy=ddp_spawn",
        "trainer.devices=2",
        "evaluate.split=null",
        "module.nce_weight=1",
    )
    from transformers import AutoModelForMaskedLM

    assert "train" in metrics and (tmp_path / "model" / "idf.json").is_file()
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "model").state_dict()
    original = AutoModelForMaskedLM.from_pretrained(SPLADE_TINY).state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), (
        "rank 0's weights did not come back"
    )


def test_decoder_only_echo_backbone_trains_and_indexes(train: Train, tmp_path: Path) -> None:
    """A small random Llama (echo input, LM head as the vocabulary projection): train, save, index."""
    from transformers import AutoModelForCausalLM

    llama, tokenizer = tiny_llama()
    llama_dir = tmp_path / "llama"
    llama.save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)
    out = tmp_path / "run"
    metrics = train(out, f"model.backbone={llama_dir}", "trainer.max_epochs=1")
    assert json.loads((out / "model" / "sparrow.json").read_text())["kind"] == "splade_echo"
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    original = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    # the test split was indexed with the saved echo model through the ordinary index path
    assert metrics["test"]["avg_doc_nnz"] > 0 and 0.0 <= metrics["test"]["ndcg@10"] <= 1.0


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("splade_*.yaml")))
def test_shipped_experiments_compose_and_pass_the_checks(name: str, tmp_path: Path) -> None:
    cfg = compose_job("retrieval_train", [f"+experiment={name}"], tmp_path)
    train_cli.check_config(cfg)
    assert cfg.experiment_name == name and cfg.dataset.name in name
    if cfg.dataset.name == "nfcorpus":  # judgements from original/, selection on dev, never on test
        assert cfg.data.val_split == "dev" and cfg.data.train_qrels.startswith("original/")
