"""The codebase passes ruff (pyproject's rules) and keeps datasets/ a data folder."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "recsys", "retrieval", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_datasets_folder_is_not_a_package() -> None:
    # an __init__.py there would shadow Hugging Face's `datasets` when run from the repo root
    assert not (REPO / "datasets" / "__init__.py").exists()
    assert all(
        (REPO / "datasets" / d.name / "README.md").is_file()
        for d in (REPO / "datasets").iterdir()
        if d.is_dir()
    )
