"""Tables over training runs: run ``python -m recsys.train`` as a user would, reuse finished runs."""

from __future__ import annotations

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
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
