"""Exact sparse top-k on the GPU: the Triton kernel against ``torch.sparse`` at MS MARCO scale.

Data:

* synthetic, MS MARCO-sized by default: ``--docs`` documents (8.8M) of about ``--nnz`` (120)
  distinct terms each, drawn from a Zipf-like law over ``--vocab`` (30,522) word-pieces, weights
  ``log1p`` of a log-normal (SPLADE-like); inference-free queries (about 7 terms, BM25 IDF
  weights) and siamese queries (about 40 terms, SPLADE-like weights), terms drawn from the same law;
* real, with ``--real FILE`` (made on a CPU by ``python benchmarks/sparse_topk.py export``): the
  splade-tiny document encodings of SciFact and NFCorpus from the index issue's cache and their
  test queries, siamese and inference-free.

Methods, measured in the same call:

* ``scatter only (previous)``: :func:`retrieval.kernels.sparse_topk.sparse_topk_triton` on a
  float16 inverted index without a dense head: every posting of the batch's terms is scattered
  with float32 atomic adds into zero-filled accumulators;
* ``hybrid, head H`` (``--heads``, default 128): the same function on the index with a dense head
  of its ``H`` most frequent terms (``InvertedIndex.with_head``): one tensor-core matmul per wave
  scores the head terms and initialises the accumulators, the scatter adds the other terms'
  postings; "head used" says whether the kernel's byte rule (``head_pays_off``) chose the head
  for that batch (else the row times the previous design on the same index);
* ``single-query mode (CUDA graphs)`` at batch 1: ``SingleQuerySearch`` (no head);
* ``torch.sparse``: the ``(N, V)`` float32 CSR document matrix times the dense ``(V, B)`` query
  block (``torch.sparse.mm``), then ``topk`` over the ``(N, B)`` scores.

Reported per (data, query kind, method, batch size): queries/s, median and p99 latency of one call
(one batch), bytes of postings the batch needs per query (6 bytes per posting: int32 id +
float16 weight), the share of them in head terms and the head's memory, the bandwidth that the
needed postings amount to as a fraction of the device-to-device copy rate measured in the same
run (an effective rate for the hybrid, which reads the head's ``2 N H`` bytes once per wave for
the whole batch instead of its postings once per query: it can pass 100%), peak GPU memory, the
speed-up over ``torch.sparse``, and whether the two agree (same scores rank by rank within float16
rounding). A profile of each method's GPU time by kernel at the largest batch says where the
time goes (``head_matmul``, ``scatter``, ``run_max``, the ``topk`` kernels, the zero-fill).
The table is appended to ``benchmarks/RESULTS.md``.

    python benchmarks/sparse_topk.py export --out .bench/sparse_real.pt       # on the CPU box
    python benchmarks/sparse_topk.py lucene --real .bench/sparse_real.pt      # the CPU side (Lucene)
    python benchmarks/sparse_topk.py run --real .bench/sparse_real.pt         # on the GPU
    python benchmarks/sparse_topk.py run --docs 20000 --device cpu --batches 1,8   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.kernels.inverted_index import InvertedIndex, block_pointers, csr_rows  # noqa: E402
from retrieval.kernels.sparse_head import head_pays_off  # noqa: E402
from retrieval.kernels.sparse_single import SingleQuerySearch  # noqa: E402
from retrieval.kernels.sparse_topk import sparse_topk_reference, sparse_topk_triton  # noqa: E402

log = logging.getLogger("sparse_topk")
RESULTS = REPO / "benchmarks" / "RESULTS.md"


# --- data --------------------------------------------------------------------------------------


def hashed(counter: torch.Tensor, stream: int) -> torch.Tensor:
    """splitmix64 of ``counter`` in ``stream``: int64 pseudo-random bits, the same on every device.

    Integer arithmetic only (wrapping multiplies, arithmetic shifts), so a collection generated
    on the GPU here is bit-identical to the one generated on the CPU for the Lucene baseline.
    """
    offset = (stream * 0x632BE59BD9B4E019 + (1 << 63)) % (1 << 64) - (1 << 63)  # as a signed int64
    z = counter * -7046029254386353131 + offset  # golden-ratio increment
    z = (z ^ (z >> 30)) * -4658895280553007687
    z = (z ^ (z >> 27)) * -7723592293110705685
    return z ^ (z >> 31)


def term_law(vocab: int, device: str) -> torch.Tensor:
    """(V + 1,) int64 cumulative counts of a Zipf-like law ~ 1 / (rank + 10), ranks in a hashed order."""
    ranks = hashed(torch.arange(vocab, device=device), 0).argsort().argsort()  # (V,) a fixed shuffle
    counts = (1 << 40) // (ranks + 10)  # (V,) exact integers
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def draw_terms(cdf: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """Term ids drawn from the law ``cdf`` for each counter (exact integer inverse CDF)."""
    r = torch.remainder(hashed(counter, stream) & ((1 << 62) - 1), cdf[-1])
    return torch.searchsorted(cdf, r, right=True) - 1


def weight_table(size: int = 1024) -> torch.Tensor:
    """(size,) SPLADE-like weights log1p(exp(0.6 z)), z at the quantiles of a standard normal."""
    normal = statistics.NormalDist()
    return torch.tensor(
        [math.log1p(math.exp(0.6 * normal.inv_cdf((i + 0.5) / size))) for i in range(size)],
        dtype=torch.float16,
    )


def synthetic_index(n_docs: int, nnz: int, vocab: int, device: str, bits: int = 14, chunk: int = 1 << 24):
    """Postings of ``n_docs`` documents with about ``nnz`` distinct Zipf terms each, device-independent.

    Returns:
        (InvertedIndex float16, the same as a float32 (N, V) CSR matrix, the law's cdf (V + 1,)).
    """
    cdf = term_law(vocab, device)
    table = weight_table().to(device)
    keys = []
    docs_per_chunk = max(1, chunk // nnz)
    for lo in range(0, n_docs, docs_per_chunk):
        n = min(docs_per_chunk, n_docs - lo)
        counter = torch.arange(lo * nnz, (lo + n) * nnz, device=device)  # (n * nnz,)
        terms = draw_terms(cdf, counter, 1).view(n, nnz)
        doc = torch.arange(lo, lo + n, device=device)[:, None]
        keys.append((terms * n_docs + doc).reshape(-1).unique())  # term-major keys, duplicates merged
    key = torch.cat(keys).sort().values  # (P,) term-major, docs ascending within a term
    del keys
    term, doc = key // n_docs, key % n_docs
    weights = table[hashed(key, 2) & (table.numel() - 1)]  # (P,) float16, a function of (term, doc)
    del key
    indptr = torch.zeros(vocab + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.bincount(term, minlength=vocab).cumsum(0)
    doc_ids = doc.to(torch.int32)
    index = InvertedIndex(
        indptr, doc_ids, weights, block_pointers(indptr, doc_ids, n_docs, bits), n_docs, bits
    )
    order = (doc * vocab + term).argsort()  # document-major for the CSR baseline
    crow = torch.zeros(n_docs + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.bincount(doc, minlength=n_docs).cumsum(0)
    csr = torch.sparse_csr_tensor(crow, term[order], weights.float()[order], (n_docs, vocab))
    return index, csr, cdf


def synthetic_queries(n: int, terms: int, cdf: torch.Tensor, df: torch.Tensor, n_docs: int, kind: str):
    """(n, V) CSR queries of about ``terms`` distinct terms: IDF weights or SPLADE-like ones."""
    stream = 3 if kind == "idf" else 4
    counter = torch.arange(n * terms, device=cdf.device)
    sampled = draw_terms(cdf, counter, stream).view(n, terms)  # (n, terms)
    dense = torch.zeros(n, cdf.numel() - 1, device=cdf.device)
    if kind == "idf":
        idf = torch.log1p((n_docs - df + 0.5) / (df + 0.5))  # (V,)
        dense.scatter_(1, sampled, idf[sampled].float())
    else:
        u = (hashed(counter, stream + 10) & 0xFFFF).view(n, terms).float() / 65536  # exact in [0, 1)
        dense.scatter_(1, sampled, u * 2 + 0.1)
    return dense.to_sparse_csr()


# --- timing -------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_rate(device: str, gib: float = 2.0) -> float:
    """Device-to-device copy rate in bytes/s (read + write counted), best of 5."""
    n = int(gib * (1 << 30) / 4)
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del x, y
    return 2 * n * 4 / best


def torch_sparse_topk(docs_csr: torch.Tensor, block: torch.Tensor, k: int):
    """The baseline: (N, V) CSR x dense (V, B), then topk over documents."""
    scores = torch.sparse.mm(docs_csr, block.to_dense().T)  # (N, B)
    vals, idx = scores.topk(min(k, scores.shape[0]), dim=0)  # (k, B)
    return vals.T, idx.T


def time_calls(fn, blocks: list, device: str) -> list[float]:
    """Seconds of each call (after one warm-up call per distinct batch)."""
    fn(blocks[0])
    out = []
    for block in blocks:
        sync(device)
        t = time.perf_counter()
        fn(block)
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def postings_bytes(index: InvertedIndex, block: torch.Tensor) -> int:
    """Bytes of the postings a query block needs (ids + weights of every query term's list)."""
    lengths = index.indptr[1:] - index.indptr[:-1]  # (V,)
    per = index.doc_ids.element_size() + index.weights.element_size()
    return int(lengths[block.col_indices()].sum()) * per


def peak(fn, device: str) -> float:
    """Peak GPU memory (GiB) of one call above what was allocated before it."""
    if device != "cuda":
        return float("nan")
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def agree(a, b, rtol: float = 2e-3) -> bool:
    """Same scores rank by rank (ids may differ only among equal scores)."""
    sa, sb = a[0].float().cpu(), b[0].float().cpu()
    k = min(sa.shape[1], sb.shape[1])
    sa, sb = sa[:, :k], sb[:, :k]
    live = torch.isfinite(sa) & (sa > 0)
    return bool(torch.allclose(sa[live], sb[live], rtol=rtol, atol=1e-3))


def profile_kernel(fn, device: str) -> list[tuple[str, float]]:
    """GPU time (ms) by kernel name over one call, largest first."""
    if device != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    rows = [(e.key, e.device_time_total / 1000) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:8]


def profile_host(fn, device: str) -> list[tuple[str, float]]:
    """Host time (ms) of one call by torch operator (self time, with call counts), largest first.

    The first row is the whole call's wall time and the number of operators it dispatched.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    ops = sum(e.count for e in events)
    rows = [(f"{e.key} x{e.count}", e.self_cpu_time_total / 1000) for e in events]
    return [(f"whole call, {ops} operator calls (profiled)", wall)] + sorted(rows, key=lambda r: -r[1])[:7]


# --- the measurement ------------------------------------------------------------------------------


def head_share(index: InvertedIndex, block: torch.Tensor) -> float:
    """Fraction of the postings a query block needs that belong to the index's dense head terms."""
    lengths = index.indptr[1:] - index.indptr[:-1]  # (V,)
    need = lengths[block.col_indices()]
    in_head = index.head_slot[block.col_indices()] >= 0
    return float(need[in_head].sum()) / max(1, float(need.sum()))


def search_modes(indexes: dict, batch: int, budgets: list[int], k: int, search, device: str) -> list:
    """(method, index, budget, searcher) of every timed mode for one batch size.

    The hybrid is timed from batch 2 up (one query never pays for a dense head).
    """
    modes = []
    for head, index in indexes.items():
        if head and batch == 1:
            continue
        method = f"hybrid, head {head}" if head else "scatter only (previous)"
        modes += [(method, index, b, partial(search, index, k=k, budget_bytes=b)) for b in budgets]
    if batch == 1 and device == "cuda":
        graphs = SingleQuerySearch(indexes[0], k)
        modes.append(("single-query mode (CUDA graphs)", indexes[0], graphs.budget_bytes, graphs))
    return modes


def measure(
    name, indexes, csr, queries_by_kind, batches, k, device, rate, baseline_max_batch, budgets, search
):
    """One row per (query kind, batch, method, accumulator budget); the baseline once per (kind, batch).

    ``indexes``: {head terms: the index with a dense head of that many terms}; 0 (required) is
    the index without one, the previous design.
    """
    rows, profiles = [], []
    for kind, queries in queries_by_kind.items():
        for batch in batches:
            n_calls = max(3, min(50, 2000 // batch)) if device == "cuda" else 2
            n_calls = min(n_calls, queries.shape[0] // batch)
            blocks = [csr_rows(queries, i * batch, (i + 1) * batch) for i in range(n_calls)]
            bytes_q = statistics.mean(postings_bytes(indexes[0], b) for b in blocks) / batch
            base = {}
            if csr is not None and batch <= baseline_max_batch:
                baseline = partial(torch_sparse_topk, csr, k=k)
                base_times = time_calls(baseline, blocks[: max(2, n_calls // 4)], device)
                base = {
                    "torch.sparse QPS": batch * len(base_times) / sum(base_times),
                    "torch.sparse peak GiB": peak(partial(baseline, blocks[0]), device),
                    "reference": baseline(blocks[0]),
                }
            modes = search_modes(indexes, batch, budgets, k, search, device)
            for method, index, budget, kernel in modes:
                for block in blocks if device == "cuda" else []:  # compile every variant the batches need
                    kernel(block)
                times = time_calls(kernel, blocks, device)
                head = 0 if index.head is None or method.startswith("single") else index.head.shape[1]
                row = {
                    "data": name,
                    "queries": kind,
                    "method": method,
                    "terms/query": statistics.mean(b.values().numel() for b in blocks) / batch,
                    "batch": batch,
                    "k": k,
                    "budget MiB": budget / 2**20,
                    "kernel QPS": batch * len(times) / sum(times),
                    "median ms": statistics.median(times) * 1e3,
                    "p99 ms": sorted(times)[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
                    "MB postings/query": bytes_q / 1e6,
                    "head share %": 100 * statistics.mean(head_share(index, b) for b in blocks)
                    if head
                    else 0.0,
                    "head GiB": index.head.numel() * index.head.element_size() / 2**30 if head else 0.0,
                    "head used": bool(head) and head_pays_off(index, blocks[0].col_indices()),
                    "bandwidth % of copy": 100 * bytes_q * batch / statistics.median(times) / rate,
                    "kernel peak GiB": peak(partial(kernel, blocks[0]), device),
                }
                if base:
                    row["torch.sparse QPS"] = base["torch.sparse QPS"]
                    row["speed-up"] = row["kernel QPS"] / base["torch.sparse QPS"]
                    row["torch.sparse peak GiB"] = base["torch.sparse peak GiB"]
                    row["agree"] = agree(kernel(blocks[0]), base["reference"])
                rows.append(row)
                log.info(
                    "%s", json.dumps({c: round(v, 4) if isinstance(v, float) else v for c, v in row.items()})
                )
            timed = rows[-len(modes) :]
            for method, index in dict((m[0], m[1]) for m in modes if not m[0].startswith("single")).items():
                best = max((r for r in timed if r["method"] == method), key=lambda r: r["kernel QPS"])
                kernel = partial(search, index, k=k, budget_bytes=int(best["budget MiB"] * 2**20))
                title = f"{name} {kind} batch {batch}, {method}, budget {best['budget MiB']:.0f} MiB"
                if batch == max(batches):
                    profiles.append(
                        (f"GPU time by kernel, {title}", profile_kernel(partial(kernel, blocks[0]), device))
                    )
                if batch == min(batches) and index.head is None:
                    profiles.append(
                        (f"host time by operator, {title}", profile_host(partial(kernel, blocks[0]), device))
                    )
    return rows, profiles


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(
                f"{v:.3g}"
                if isinstance(v, float) and abs(v) < 10
                else f"{v:,.0f}"
                if isinstance(v, float)
                else str(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def synthetic_case(n_docs: int, nnz: int, vocab: int, n_queries: int, device: str):
    """(index, CSR matrix, {query kind: (n_queries, V) CSR}) of the synthetic collection."""
    start = time.perf_counter()
    index, csr, cdf = synthetic_index(n_docs, nnz, vocab, device)
    log.info(
        "synthetic: %d docs, %.1f postings/doc, %.2f GB of postings, built in %.0f s",
        index.num_docs,
        index.doc_ids.numel() / index.num_docs,
        index.nbytes / 1e9,
        time.perf_counter() - start,
    )
    df = (index.indptr[1:] - index.indptr[:-1]).double()
    queries = {
        "inference-free (IDF)": synthetic_queries(n_queries, 7, cdf, df, n_docs, "idf"),
        "siamese": synthetic_queries(n_queries, 40, cdf, df, n_docs, "splade"),
    }
    return index, csr, queries


def kernel_search(device: str, scatter_block: int):
    """The searcher timed: the Triton kernels on CUDA, the torch reference elsewhere."""
    if device == "cuda":
        return partial(sparse_topk_triton, scatter_block=scatter_block)
    return sparse_topk_reference


def with_heads(index: InvertedIndex, heads: str) -> dict[int, InvertedIndex]:
    """{head terms: ``index`` with a dense head of that many terms} for each of ``heads``, and 0."""
    sizes = sorted({0} | {int(h) for h in heads.split(",") if h})
    return {h: index.with_head(h) for h in sizes}


def run(args) -> None:
    device = args.device
    batches = [int(b) for b in args.batches.split(",")]
    rate = copy_rate(device)
    budget = [int(float(g) * (1 << 30)) for g in args.budgets_gib.split(",")]
    log.info("device-to-device copy rate: %.0f GB/s", rate / 1e9)
    all_rows, all_profiles = [], []
    configs = [(int(b), int(s)) for b in args.block_bits.split(",") for s in args.scatter_blocks.split(",")]
    for n_docs in (int(d) for d in args.docs.split(",")):
        index, csr, queries = synthetic_case(n_docs, args.nnz, args.vocab, max(batches) * 3, device)
        name = f"synthetic {n_docs:,} docs ({collection_fingerprint(index)})"
        for bits, scatter_block in configs:
            index = replace(
                index, block_ptr=block_pointers(index.indptr, index.doc_ids, n_docs, bits), block_bits=bits
            )
            config = f", blocks 2^{bits}, scatter {scatter_block}" if len(configs) > 1 else ""
            rows, profiles = measure(
                name + config,
                with_heads(index, args.heads),
                csr,
                queries,
                batches,
                args.k,
                device,
                rate,
                args.baseline_max_batch,
                budget,
                kernel_search(device, scatter_block),
            )
            all_rows += rows
            all_profiles += profiles
        del index, csr
    if args.real:
        for name, data in torch.load(args.real, weights_only=True).items():
            docs = data["docs"].to(torch.float32).to(device)
            index = InvertedIndex.from_csr(docs, torch.float16).to(device)
            csr = docs.to_sparse_csr()
            kinds = ("inference-free (IDF)", "siamese")
            qs = {kind: data[kind].to(torch.float32).to(device).to_sparse_csr() for kind in kinds}
            real_batches = [b for b in batches if b <= min(q.shape[0] for q in qs.values())] or [1]
            rows, profiles = measure(
                name,
                with_heads(index, args.heads),
                csr,
                qs,
                real_batches,
                args.k,
                device,
                rate,
                args.baseline_max_batch,
                budget,
                kernel_search(device, int(args.scatter_blocks.split(",")[0])),
            )
            all_rows += rows
            all_profiles += profiles
    text = table(all_rows)
    print(text)
    for title, prof in (p for p in all_profiles if p[1]):
        print(f"\n{title}:")
        for kname, ms in prof:
            print(f"  {ms:9.3f} ms  {kname[:90]}")
    if not args.no_append:
        machine = (
            torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M")
        prof_text = "\n".join(
            f"- {title}: " + "; ".join(f"{kname[:60]} {ms:.2f} ms" for kname, ms in prof[:7])
            for title, prof in all_profiles
            if prof
        )
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(
                f"\n## Exact sparse top-k: Triton kernel vs torch.sparse ({device}) - {stamp}\n\n"
                f"Machine: {machine}; torch {torch.__version__}; "
                f"device-to-device copy {rate / 1e9:.0f} GB/s. "
                f"Command: `python {' '.join(sys.argv)}`\n\n{text}\n\n{prof_text}\n"
            )


def compact(csr: torch.Tensor) -> torch.Tensor:
    """A CSR matrix with int32 indices and float16 values (half the bytes to carry to the GPU)."""
    csr = csr.to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().int(), csr.col_indices().int(), csr.values().half(), csr.shape
    )


def export(args) -> None:
    """Write the real encodings (SciFact, NFCorpus test: documents, siamese and IDF queries) to one file."""
    import os

    from retrieval.data.beir import document_texts, load_beir
    from retrieval.encoders.inference_free import InferenceFreeQueryEncoder
    from retrieval.encoders.splade import SpladeEncoder

    model = Path(os.environ.get("SPARROW_MODEL_DIR", REPO.parent / "shared" / "models")) / "splade-tiny"
    encoder = SpladeEncoder(str(model), max_length=256)
    out = {}
    for name in args.datasets.split(","):
        data = load_beir(name, split="test")
        texts = document_texts(data.corpus)
        queries = data.queries["text"].to_list()
        idf = InferenceFreeQueryEncoder.fit(str(model), texts)
        out[name] = {
            "docs": compact(encoder.encode(texts)),
            "siamese": compact(encoder.encode(queries)),
            "inference-free (IDF)": compact(idf.encode(queries)),
        }
        log.info("%s: %d documents, %d queries", name, len(texts), len(queries))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.out) + ".tmp")
    torch.save(out, tmp)
    tmp.replace(args.out)


def lucene_one(searcher, qid: str, vocab: list[str], k: int, block: torch.Tensor):
    """One query through the Lucene impact searcher."""
    return searcher.search([qid], block, vocab, k)


def lucene_rows(name: str, docs: torch.Tensor, queries: dict, vocab: list[str], args) -> list[dict]:
    """Build a Lucene impact index of ``docs`` (scale 100) and time its queries against the reference."""
    import tempfile

    from retrieval.index.impact import ImpactSearcher, build_impact

    rows = []
    ids = [str(i) for i in range(docs.shape[0])]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("{}\n")
        start = time.perf_counter()
        build_impact(
            ids,
            docs,
            vocab,
            Path(tmp) / "index",
            scale=100.0,
            encoder="synthetic",
            encoder_checksum="-",
            tokenizer="-",
            corpus_path=corpus,
            threads=args.threads,
        )
        log.info("%s: Lucene impact index built in %.0f s", name, time.perf_counter() - start)
        searcher = ImpactSearcher(Path(tmp) / "index")
        index = InvertedIndex.from_csr(docs, torch.float16)
        for kind, q in queries.items():
            q = q.to(torch.float32).to_sparse_csr()
            n = min(q.shape[0], args.queries)
            qids = [f"q{i}" for i in range(n)]
            single = [csr_rows(q, i, i + 1) for i in range(n)]
            lat = time_calls(partial(lucene_one, searcher, qids[0], vocab, args.k), single, "cpu")
            ref = time_calls(partial(sparse_topk_reference, index, k=args.k), single, "cpu")
            t = time.perf_counter()
            searcher.search(qids, csr_rows(q, 0, n), vocab, args.k, threads=args.threads)
            batch_s = time.perf_counter() - t
            rows.append(
                {
                    "data": name,
                    "queries": kind,
                    "k": args.k,
                    "Lucene median ms (1 thread)": statistics.median(lat) * 1e3,
                    "Lucene p99 ms": sorted(lat)[int(0.99 * (len(lat) - 1))] * 1e3,
                    f"Lucene QPS ({args.threads} threads)": n / batch_s,
                    "torch reference median ms (CPU)": statistics.median(ref) * 1e3,
                }
            )
            log.info("%s", rows[-1])
    return rows


def collection_fingerprint(index: InvertedIndex) -> str:
    """A short digest of a collection's postings: the same on CPU and GPU for the same vectors."""
    terms = torch.repeat_interleave(torch.arange(index.vocab_size, device=index.device), index.indptr.diff())
    mix = hashed(terms * index.num_docs + index.doc_ids.long(), 7) ^ index.weights.view(torch.int16).long()
    return f"{index.doc_ids.numel()}-{int(mix.sum()) & 0xFFFFFFFF:08x}"


def lucene(args) -> None:
    """The CPU side: a Lucene impact index of the same vectors (scale 100), one query at a time."""
    import os

    from transformers import AutoTokenizer

    model = Path(os.environ.get("SPARROW_MODEL_DIR", REPO.parent / "shared" / "models")) / "splade-tiny"
    tok = AutoTokenizer.from_pretrained(str(model))
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    rows = []
    for n_docs in (int(d) for d in args.synthetic_docs.split(",") if d):
        index, csr, queries = synthetic_case(n_docs, args.nnz, len(vocab), args.queries, "cpu")
        log.info("synthetic %d docs, fingerprint %s", n_docs, collection_fingerprint(index))
        rows += lucene_rows(
            f"synthetic {n_docs:,} docs ({collection_fingerprint(index)})", csr, queries, vocab, args
        )
    if args.real:
        for name, data in torch.load(args.real, weights_only=True).items():
            kinds = ("inference-free (IDF)", "siamese")
            docs = data["docs"].to(torch.float32).to_sparse_csr()
            rows += lucene_rows(name, docs, {kind: data[kind] for kind in kinds}, vocab, args)
    text = table(rows)
    print(text)
    if not args.no_append:
        machine = platform.processor() or platform.machine()
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(
                f"\n## Exact sparse top-k, CPU side: Lucene impact index on the same vectors - {stamp}\n\n"
                f"Machine: {machine}, {os.cpu_count()} cores; torch {torch.__version__}. "
                f"Command: `python {' '.join(sys.argv)}`\n\n{text}\n"
            )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--docs", default="1000000,8800000", help="synthetic collection sizes, comma-separated")
    r.add_argument("--nnz", type=int, default=120)
    r.add_argument("--vocab", type=int, default=30_522)
    r.add_argument("--batches", default="1,32,1000")
    r.add_argument("--k", type=int, default=1000)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--real", default=None, help="file from `export` (SciFact / NFCorpus encodings)")
    r.add_argument("--baseline-max-batch", type=int, default=1000)
    r.add_argument(
        "--block-bits", default="14", help="index block sizes (log2 docs) to sweep, comma-separated"
    )
    r.add_argument("--scatter-blocks", default="1024", help="postings per scatter iteration to sweep")
    r.add_argument(
        "--budgets-gib", default="0.03,0.25,2,8", help="kernel accumulators per wave (GiB), each measured"
    )
    r.add_argument(
        "--heads", default="128", help="dense head sizes (terms) of the hybrid, each measured beside no head"
    )
    r.add_argument("--no-append", action="store_true")
    lu = sub.add_parser("lucene")
    lu.add_argument("--real", default=None, help="file from `export` (SciFact / NFCorpus encodings)")
    lu.add_argument("--synthetic-docs", default="", help="synthetic collection sizes (the GPU run's vectors)")
    lu.add_argument("--nnz", type=int, default=120)
    lu.add_argument("--queries", type=int, default=200, help="queries timed per kind")
    lu.add_argument("--tmp", default=None, help="folder for the temporary Lucene index")
    lu.add_argument("--k", type=int, default=1000)
    lu.add_argument("--threads", type=int, default=2)
    lu.add_argument("--no-append", action="store_true")
    e = sub.add_parser("export")
    e.add_argument("--out", default=str(REPO / ".bench" / "sparse_real.pt"))
    e.add_argument("--datasets", default="scifact,nfcorpus")
    args = parser.parse_args()
    {"run": run, "lucene": lucene, "export": export}[args.cmd](args)


if __name__ == "__main__":
    main()
