"""Test-wide settings: offline hub, the shared datasets read in place, a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPARROW_TEST_DATA", REPO.parent / "shared" / "datasets"))

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors): the kernel tests check
# the kernels' logic in CI. Read when a kernel is decorated, so it is set before any import.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("SPARROW_DATA_DIR", str(SHARED_DATA))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prepared-data caches go to a per-session temp dir, never to ~/.cache or ../shared."""
    os.environ["SPARROW_CACHE_DIR"] = str(tmp_path_factory.mktemp("sparrow-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only ../shared/datasets folder (skips if this checkout has none)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared datasets at {SHARED_DATA}")
    return SHARED_DATA
