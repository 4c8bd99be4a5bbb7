"""SPLADE encoding (and training) speed and peak memory: plain logits vs chunked pooling vs the fused head.

    python benchmarks/splade_head.py --model ../shared/models/splade-tiny \\
        --corpus ../shared/datasets/scifact/corpus.jsonl                                  # CUDA
    python benchmarks/splade_head.py --device cpu --docs 4 --max-length 32 --fused-batches 4  # smoke

Encodes the SciFact corpus (``title + " " + text``) with splade-tiny, truncated to ``--max-length``
word-pieces, in corpus order (no length sorting). Heads compared, on the same model:

* plain: Hugging Face ``AutoModelForMaskedLM`` logits ``(B, L, V)``, then ``log1p(relu)`` and the
  masked max (the anchors: float32 at batch 128, bfloat16 autocast at batch 512);
* chunked: :func:`retrieval.kernels.splade_head.splade_head_reference`, 4096 terms per chunk;
* fused: :func:`retrieval.kernels.splade_head.splade_head_triton` at ``--fused-batches``;
* fused as :class:`~retrieval.encoders.splade.SpladeEncoder` runs it with ``dtype="bfloat16"``
  (CUDA): the model's weights cast to bfloat16 (no autocast), and with ``compile=True`` its
  transformer body compiled (timed on a second pass, after every batch shape has compiled);
  ratios against the plain bfloat16-autocast head;
* where the time goes: the encoder alone (no vocabulary projection: no head can beat it), and
  the plain head with tokenization inside the timed loop (as an end-to-end encoder runs);
* end to end (``--e2e-repeat`` > 0): raw texts in, vectors out, tokenization timed, on the corpus
  repeated ``--e2e-repeat`` times: the plain head tokenizing batch by batch in corpus order,
  against :class:`retrieval.encoders.splade.SpladeEncoder` (length-sorted batches, the fused
  head, CSR vectors on the CPU) with its tokenizing threads off and on, and the tokenizers alone
  (the Hugging Face call and the encoder's Rust batch path, on chunks of 10,000 texts as the
  encoder calls them: the bound on the end-to-end rows).

Tokenization is done once, before any timing (every batch is tokenized up front, padded to its
longest text): the numbers measure the model and the head, plus the host-to-device copy of the
token ids. Each configuration runs one warm-up batch (Triton's compilation), then the whole corpus;
docs/s is the corpus size over that time, peak memory is ``torch.cuda.max_memory_allocated`` over
it (model weights included). Vectors of the first ``--compare-docs`` documents are compared with
the plain float32 ones (the encoder keeps its special tokens here, as the plain head does).
``--train`` adds training steps (forward + backward of model and head, no optimizer step) under
bfloat16 autocast. On CPU (smoke mode) the fused kernel runs in Triton's interpreter and nothing
is appended to the results log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import cpu_model, publish  # noqa: E402

log = logging.getLogger("splade_head")

Batch = dict[str, torch.Tensor]
Head = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (model, inputs) -> (B, V)
NO_HEAD = "encoder only (no head: the bound)"
TOKENIZED = "plain, tokenizing while timed"
E2E_PLAIN = "plain HF, tokenizing batch by batch"
TOKENIZER = "tokenizer alone, chunks of 10,000"
WEIGHTS = "bf16 weights"  # the model cast to bfloat16 (SpladeEncoder's dtype), no autocast
COMPILED = "bf16 weights, compiled body"  # and its transformer body compiled (SpladeEncoder's compile)


def read_corpus(path: Path, limit: int | None) -> list[str]:
    """``title + " " + text`` of the first ``limit`` documents of a BEIR ``corpus.jsonl``."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            texts.append(f"{doc.get('title') or ''} {doc['text']}".strip())
            if limit is not None and len(texts) == limit:
                break
    return texts


def tokenize(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[Batch]:
    """The corpus as padded batches of ``input_ids`` and ``attention_mask`` (B, L), on the CPU."""
    batches = []
    for lo in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[lo : lo + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def plain_head(model: torch.nn.Module, inputs: Batch) -> torch.Tensor:
    """The plain Hugging Face path: full (B, L, V) logits, log1p(relu), masked max."""
    logits = model(**inputs).logits  # (B, L, V)
    weights = torch.log1p(torch.relu(logits)) * inputs["attention_mask"].unsqueeze(-1)  # (B, L, V)
    return weights.amax(dim=1).float()  # (B, V)


def pooled_head(pool: Callable) -> Head:
    """A head that runs the model up to its vocabulary projection and pools with ``pool``."""
    from retrieval.models.pooling import output_embedding_inputs, output_embedding_name

    def head(model: torch.nn.Module, inputs: Batch) -> torch.Tensor:
        hidden = output_embedding_inputs(model, output_embedding_name(model), **inputs)  # (B, L, H)
        decoder = model.get_output_embeddings()
        return pool(hidden, decoder.weight, decoder.bias, inputs["attention_mask"])  # (B, V)

    return head


def encoder_only(model: torch.nn.Module, inputs: Batch) -> torch.Tensor:
    """No head: the model up to its vocabulary projection, (B, H) maxima -- the bound on any head."""
    from retrieval.models.pooling import output_embedding_inputs, output_embedding_name

    return output_embedding_inputs(model, output_embedding_name(model), **inputs).amax(1)  # (B, H)


def heads() -> dict[str, Head]:
    from retrieval.kernels.splade_head import splade_head_reference, splade_head_triton

    return {
        "plain": plain_head,
        "chunked": pooled_head(splade_head_reference),
        "fused": pooled_head(splade_head_triton),
    }


def text_stats(
    model, tokenizer, texts: list[str], batch: int, max_length: int, device: str, dtype: str
) -> dict:
    """docs/s and peak memory of the plain head with tokenization inside the timed loop."""
    reset_peak(device)
    with torch.inference_mode(), autocast(device, dtype):
        start = time.perf_counter()
        for lo in range(0, len(texts), batch):
            inputs = tokenizer(
                texts[lo : lo + batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            plain_head(model, {k: v.to(device, non_blocking=True) for k, v in inputs.items()})
        synchronize(device)
    return {"docs_per_s": len(texts) / (time.perf_counter() - start), "peak_gib": peak(device)}


def reset_peak(device: str) -> None:
    synchronize(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> float:
    """GiB of ``torch.cuda.max_memory_allocated`` since :func:`reset_peak` (NaN on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def encoder_stats(
    model_dir: Path, texts: list[str], batch: int, max_length: int, device: str, dtype: str, workers: int
) -> tuple[dict, torch.Tensor]:
    """docs/s and peak memory of ``SpladeEncoder.encode`` on raw texts (after a warm-up), and its vectors.

    Returns:
        (stats, vectors): vectors (N, V) sparse CSR float32 on the CPU.
    """
    from retrieval.encoders.splade import SpladeEncoder

    encoder = SpladeEncoder(
        model_dir,
        max_length=max_length,
        batch_size=batch,
        device=device,
        zero_special_tokens=False,  # as the plain head, for the comparison
        dtype="bfloat16" if dtype == "bf16" else None,
        tokenize_workers=workers,
    )
    encoder.encode(texts[:batch], progress=False)  # Triton's compilation
    reset_peak(device)
    start = time.perf_counter()
    out = encoder.encode(texts, progress=False)  # (N, V)
    seconds = time.perf_counter() - start
    stats = {
        "docs_per_s": len(texts) / seconds,
        "peak_gib": peak(device),
        "nnz": out.values().numel() / len(texts),
    }
    return stats, out


def tokenizer_stats(tokenize: Callable[[list[str]], Batch], texts: list[str]) -> dict:
    """docs/s of ``tokenize`` alone on chunks of 10,000 texts, as the encoder calls it."""
    from retrieval.encoders.splade import _SORT_CHUNK

    tokenize(texts[:8])
    start = time.perf_counter()
    for lo in range(0, len(texts), _SORT_CHUNK):
        tokenize(texts[lo : lo + _SORT_CHUNK])
    return {"docs_per_s": len(texts) / (time.perf_counter() - start), "peak_gib": float("nan")}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    """bfloat16 autocast for ``"bf16"``; nothing for ``"fp32"`` and for models cast to bfloat16."""
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def half_models(model_dir: Path, device: str) -> dict[str, torch.nn.Module]:
    """The model as :class:`~retrieval.encoders.splade.SpladeEncoder` runs it with ``dtype="bfloat16"``:
    weights cast to bfloat16, without and with its transformer body compiled (``compile=True``)."""
    import transformers

    def load() -> torch.nn.Module:
        return transformers.AutoModelForMaskedLM.from_pretrained(model_dir).to(device, torch.bfloat16).eval()

    compiled = load()
    compiled.base_model.compile()
    return {WEIGHTS: load(), COMPILED: compiled}


def encode_stats(model, head: Head, batches: list[Batch], device: str, dtype: str) -> dict:
    """docs/s and peak memory of encoding every batch (after one warm-up batch)."""
    with torch.inference_mode(), autocast(device, dtype):
        head(model, {k: v.to(device) for k, v in batches[0].items()})
        reset_peak(device)
        nnz = torch.zeros((), dtype=torch.int64, device=device)
        start = time.perf_counter()
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            nnz += (head(model, inputs) > 0).sum()
        synchronize(device)
        seconds = time.perf_counter() - start
    docs = sum(len(b["input_ids"]) for b in batches)
    return {"docs_per_s": docs / seconds, "peak_gib": peak(device), "nnz": nnz.item() / docs}


def vectors(model, head: Head, batches: list[Batch], device: str, dtype: str) -> torch.Tensor:
    """(N, V) float32 vectors of the documents of ``batches``, on the CPU."""
    out = []
    with torch.inference_mode(), autocast(device, dtype):
        for batch in batches:
            out.append(head(model, {k: v.to(device) for k, v in batch.items()}).float().cpu())
    return torch.cat(out)


def train_stats(model, head: Head, batches: list[Batch], device: str) -> dict:
    """docs/s and peak memory of forward + backward steps under bfloat16 autocast (one warm-up)."""
    model.train()

    def step(batch: Batch) -> None:
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, "bf16"):
            weights = head(model, inputs)  # (B, V)
        (weights.sum(dim=1).mean() + 1e-3 * (weights.mean(dim=0) ** 2).sum()).backward()  # score + FLOPS
        model.zero_grad(set_to_none=True)

    step(batches[0])
    reset_peak(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    return {"docs_per_s": sum(len(b["input_ids"]) for b in batches) / seconds, "peak_gib": peak(device)}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b == b and b else "n/a"  # b == b: not NaN


def set_tiles(inference: str | None, training: str | None) -> None:
    """Override the forward kernel's launch tiles (``"BL,BV,WARPS,STAGES"``), for tuning."""
    from retrieval.kernels import splade_head as kernel

    if inference:
        kernel.INFERENCE_TILE = kernel.ForwardTile(*map(int, inference.split(",")))
    if training:
        kernel.TRAINING_TILE = kernel.ForwardTile(*map(int, training.split(",")))


def dense_rows(csr: torch.Tensor, n: int) -> torch.Tensor:
    """(n, V) dense float32: the first ``n`` rows of a (N, V) sparse CSR tensor."""
    crow = csr.crow_indices()[: n + 1]
    end = int(crow[-1])
    head = torch.sparse_csr_tensor(crow, csr.col_indices()[:end], csr.values()[:end], (n, csr.shape[1]))
    return head.to_dense()


def same_csr(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two sparse CSR tensors hold the same rows, columns and values, bit for bit."""
    parts = (torch.Tensor.crow_indices, torch.Tensor.col_indices, torch.Tensor.values)
    return all(torch.equal(part(a), part(b)) for part in parts)


def end_to_end(args, model, tokenizer, texts: list[str], truth: torch.Tensor, dtypes) -> list[str]:
    """The end-to-end table (raw texts in, vectors out, tokenization timed) as markdown lines."""
    corpus = texts * args.e2e_repeat
    workers = [int(w) for w in args.e2e_workers.split(",")]
    rows = []  # (path, dtype, batch, stats, max |diff| or None, same as the first encoder row or None)
    from retrieval.encoders.splade import RustBatchTokenizer
    from retrieval.models import load_sparse_model

    sparse_model = load_sparse_model(args.model)
    for name, tokenize in (
        ("SpladeMLM.tokenize (HF call)", lambda batch: sparse_model.tokenize(batch, args.max_length)),
        ("RustBatchTokenizer (SpladeEncoder's)", RustBatchTokenizer(sparse_model.tokenizer, args.max_length)),
    ):
        rows.append((f"{TOKENIZER}: {name}", "-", len(corpus), tokenizer_stats(tokenize, corpus), None, None))
    for dtype in dtypes:
        batch = min({"fp32": 128, "bf16": 512}[dtype], len(corpus))
        stats = text_stats(model, tokenizer, corpus, batch, args.max_length, args.device, dtype)
        rows.append((E2E_PLAIN, dtype, batch, stats, None, None))
        log.info("%s %s batch %d: %s", E2E_PLAIN, dtype, batch, stats)
        first = None
        for n in workers:
            stats, out = encoder_stats(
                args.model, corpus, args.e2e_batch, args.max_length, args.device, dtype, n
            )
            diff = (dense_rows(out, len(truth)) - truth).abs().max().item()
            same = None if first is None else same_csr(out, first)
            first = out if first is None else first
            head = "fused" if args.device == "cuda" else "chunked"
            path = f"SpladeEncoder, {head}, tokenize_workers={n}"
            rows.append((path, dtype, args.e2e_batch, stats, diff, same))
            log.info(
                "%s %s: %s, max |diff| %.2e, same vectors as the first: %s", path, dtype, stats, diff, same
            )
    lines = [
        "",
        f"End to end: raw texts in, CSR vectors out, tokenization timed; the corpus repeated "
        f"{args.e2e_repeat} times ({len(corpus)} documents). The plain rows tokenize batch by batch in "
        "corpus order (the issue's anchors); SpladeEncoder sorts by length within chunks of 10,000 "
        "texts and reads the non-zeros back to the CPU. Ratios against the plain row of the same "
        'dtype; "same": bit-identical CSR vectors to the dtype\'s first SpladeEncoder row.',
        "",
        "| path | dtype | batch | docs/s | peak GiB | docs/s vs plain | peak vs plain | nnz/doc "
        "| max abs diff | same |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    plain = {dtype: s for path, dtype, _, s, _, _ in rows if path == E2E_PLAIN}
    nan = {"docs_per_s": float("nan"), "peak_gib": float("nan")}
    for path, dtype, batch, s, diff, same in rows:
        anchor = plain.get(dtype, nan)
        checks = "- | -" if diff is None else f"{s['nnz']:.1f} | {diff:.1e}"
        lines.append(
            f"| {path} | {dtype} | {batch} | {s['docs_per_s']:.0f} | {s['peak_gib']:.2f} | "
            f"{ratio(s['docs_per_s'], anchor['docs_per_s'])} | {ratio(s['peak_gib'], anchor['peak_gib'])} | "
            f"{checks} | {'-' if same is None else same} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = Path(os.environ.get("SPARROW_MODEL_DIR", "models"))
    data = Path(os.environ.get("SPARROW_DATA_DIR", "datasets"))
    parser.add_argument("--model", type=Path, default=models / "splade-tiny")
    parser.add_argument("--corpus", type=Path, default=data / "scifact" / "corpus.jsonl")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--docs", type=int, default=None, help="first N documents only (default: all)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--fused-batches", default="128,512,1024", help="comma-separated batch sizes")
    parser.add_argument("--compare-docs", type=int, default=512)
    parser.add_argument("--train", action="store_true", help="also time training steps")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-batches", type=int, default=20, help="timed training steps")
    parser.add_argument("--e2e-repeat", type=int, default=4, help="end to end: corpus copies (0: skip)")
    parser.add_argument("--e2e-batch", type=int, default=512, help="end to end: SpladeEncoder batch size")
    parser.add_argument("--e2e-workers", default="0,1", help="end to end: SpladeEncoder tokenize_workers")
    parser.add_argument("--e2e-dtypes", default="fp32,bf16", help="end to end: dtypes (CUDA)")
    parser.add_argument("--inference-tile", help="forward kernel tile without argmax: BL,BV,WARPS,STAGES")
    parser.add_argument("--training-tile", help="forward kernel tile with argmax: BL,BV,WARPS,STAGES")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    set_tiles(args.inference_tile, args.training_tile)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForMaskedLM.from_pretrained(args.model).to(args.device).eval()
    texts = read_corpus(args.corpus, args.docs)
    fused_batches = [int(b) for b in args.fused_batches.split(",")]
    anchor_batch = {"fp32": min(128, len(texts)), "bf16": min(512, len(texts))}
    configs = [
        (name, dtype, anchor_batch[dtype]) for dtype in ("fp32", "bf16") for name in ("plain", "chunked")
    ]
    fused_dtypes = (
        ("fp32", "bf16") if args.device == "cuda" else ("fp32",)
    )  # the interpreter's bf16 dot is wrong
    configs += [("fused", dtype, b) for dtype in fused_dtypes for b in fused_batches]
    log.info("%d documents; tokenizing every batch size once, before timing", len(texts))
    tokenized = {b: tokenize(tokenizer, texts, b, args.max_length) for b in {b for *_, b in configs}}
    compare = tokenize(tokenizer, texts[: args.compare_docs], 64, args.max_length)
    by_name = heads()
    truth = vectors(model, plain_head, compare, args.device, "fp32")  # (N, V)
    rows = []
    for name, dtype, batch in configs:
        try:
            stats = encode_stats(model, by_name[name], tokenized[batch], args.device, dtype)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.info("%s %s batch %d: out of memory", name, dtype, batch)
            continue
        diff = (vectors(model, by_name[name], compare, args.device, dtype) - truth).abs().max().item()
        rows.append((name, dtype, batch, stats, diff))
        log.info("%s %s batch %d: %s, max |diff| %.2e", name, dtype, batch, stats, diff)
    for dtype in fused_dtypes:  # where the time goes: the encoder alone, and tokenizing while timed
        batch = max(fused_batches)
        rows.append(
            (
                NO_HEAD,
                dtype,
                batch,
                encode_stats(model, encoder_only, tokenized[batch], args.device, dtype),
                None,
            )
        )
        stats = text_stats(model, tokenizer, texts, anchor_batch[dtype], args.max_length, args.device, dtype)
        rows.append((TOKENIZED, dtype, anchor_batch[dtype], stats, None))
        log.info("%s %s batch %d: %s", TOKENIZED, dtype, anchor_batch[dtype], stats)
    if args.device == "cuda":  # the fused head as SpladeEncoder runs it: bf16 weights, compiled or not
        batch = max(fused_batches)
        for dtype, half in half_models(args.model, args.device).items():
            for name, head in (("fused", by_name["fused"]), (NO_HEAD, encoder_only)):
                encode_stats(half, head, tokenized[batch], args.device, dtype)  # compiles every shape
                stats = encode_stats(half, head, tokenized[batch], args.device, dtype)
                diff = None
                if name == "fused":
                    diff = (vectors(half, head, compare, args.device, dtype) - truth).abs().max().item()
                rows.append((name, dtype, batch, stats, diff))
                log.info("%s %s batch %d: %s, max |diff| %s", name, dtype, batch, stats, diff)
    anchors = {dtype: s for name, dtype, batch, s, _ in rows if name == "plain"}
    if "bf16" in anchors:
        anchors[WEIGHTS] = anchors[COMPILED] = anchors["bf16"]
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{cpu_model()}, {torch.get_num_threads()} threads"
    )
    command = (
        f"python benchmarks/splade_head.py --model {args.model} --corpus {args.corpus} "
        f"--device {args.device} --max-length {args.max_length} --fused-batches {args.fused_batches}"
        + (f" --docs {args.docs}" if args.docs else "")
        + (f" --train --train-batch {args.train_batch}" if args.train else "")
        + f" --e2e-repeat {args.e2e_repeat} --e2e-batch {args.e2e_batch} --e2e-workers {args.e2e_workers}"
        + f" --e2e-dtypes {args.e2e_dtypes}"
        + (f" --inference-tile {args.inference_tile}" if args.inference_tile else "")
        + (f" --training-tile {args.training_tile}" if args.training_tile else "")
    )
    from retrieval.kernels import splade_head as kernel

    tiles = f"forward kernel tiles: inference {kernel.INFERENCE_TILE}, training {kernel.TRAINING_TILE}"
    lines = [
        f"## Fused SPLADE head: encoding ({args.device}) - {dt.date.today()}",
        "",
        f"Machine: {machine}; Python {platform.python_version()}, torch {torch.__version__}. "
        f"Model {args.model.name}, {len(texts)} documents of {args.corpus.parent.name}, max length "
        f"{args.max_length}, corpus order; tokenized before timing. Peak = max_memory_allocated "
        "(weights included). Ratios against the plain head of the same dtype (the anchor: fp32 batch "
        f"{anchor_batch['fp32']}, bf16 autocast batch {anchor_batch['bf16']}); max |diff| against the "
        f"plain fp32 vectors of the first {len(truth)} documents; {tiles}.",
        f"Command: `{command}`",
        "",
        "| head | dtype | batch | docs/s | peak GiB | docs/s vs anchor | peak vs anchor | nnz/doc "
        "| max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, dtype, batch, s, diff in rows:
        anchor = anchors.get(dtype, {"docs_per_s": float("nan"), "peak_gib": float("nan")})
        checks = "- | -" if diff is None else f"{s['nnz']:.1f} | {diff:.1e}"
        lines.append(
            f"| {name} | {dtype} | {batch} | {s['docs_per_s']:.0f} | {s['peak_gib']:.2f} | "
            f"{ratio(s['docs_per_s'], anchor['docs_per_s'])} | {ratio(s['peak_gib'], anchor['peak_gib'])} | "
            f"{checks} |"
        )
    if args.train:
        steps = tokenized.get(args.train_batch) or tokenize(
            tokenizer, texts, args.train_batch, args.max_length
        )
        steps = steps[: args.train_batches]
        lines += [
            "",
            f"Training steps (forward + backward, bf16 autocast, batch {args.train_batch}, "
            f"{sum(len(b['input_ids']) for b in steps)} documents):",
            "",
            "| head | docs/s | peak GiB |",
            "|---|---:|---:|",
        ]
        for name, head in by_name.items():
            try:
                s = train_stats(model, head, steps, args.device)
                lines.append(f"| {name} | {s['docs_per_s']:.0f} | {s['peak_gib']:.2f} |")
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                lines.append(f"| {name} | out of memory | |")
    if args.e2e_repeat > 0:
        e2e_dtypes = [d for d in args.e2e_dtypes.split(",") if d in fused_dtypes]
        lines += end_to_end(args, model, tokenizer, texts, truth, e2e_dtypes)
    text = "\n".join(lines) + "\n"
    if args.device == "cuda":
        publish(text, args.results)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
