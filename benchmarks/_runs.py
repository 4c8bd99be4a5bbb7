"""Tables over training runs: run ``python -m recsys.train`` as a user would, reuse finished runs."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(args: list[str], log: Path) -> None:
    """Run ``python -m <args>`` in the repository; raise with the log's tail on failure."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise RuntimeError(f"python -m {' '.join(args)} failed; see {log}:\n{log.read_text()[-3000:]}")


def train(out: Path, overrides: list[str]) -> dict:
    """metrics.json of a finished ``recsys.train`` run in ``out`` (run it unless already there).

    An interrupted run (``checkpoints/last.ckpt`` but no metrics) resumes from its last epoch.
    """
    if not (out / "metrics.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        last = out / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path={last}"] if last.exists() else []
        args = ["recsys.train", *overrides, *resume, f"paths.output_dir={out}", f"hydra.run.dir={out}"]
        command([*args, "trainer.enable_progress_bar=false"], out.parent / f"{out.name}.log")
    return json.loads((out / "metrics.json").read_text())


def cell(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` over runs (std 0 for one run)."""
    sd = statistics.stdev(values) if len(values) > 1 and all(v == v for v in values) else 0.0  # nan: 0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    """The options every table over training runs takes: seeds, jobs, work folder, publishing, overrides."""
    p.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    p.add_argument("--jobs", type=int, default=1, help="training runs at once")
    p.add_argument("--work", type=Path, default=None, help="run folders (reused when present)")
    p.add_argument("--table-only", action="store_true", help="publish the finished runs, train nothing")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.accelerator=gpu")
