"""LightGCN training speed on Gowalla: Sparrow's Lightning path against torch-geometric's example loop.

Three steps, because the GPU machine has neither polars nor the data folder:

    # 1. here: export the Gowalla split (the paper's train/test) as tensors (not committed)
    python benchmarks/lightgcn_speed.py prepare --out .bench/gowalla.pt
    # 2. on the GPU: run both trainers in the same call, print the table, write results
    python benchmarks/lightgcn_speed.py gpu --data .bench/gowalla.pt --results $OUT/lightgcn_speed.md
    # 3. on a CPU box: epoch time on ML-100K, for users without a GPU
    python benchmarks/lightgcn_speed.py cpu

The anchor is ``torch_geometric.nn.models.LightGCN`` trained with the loop of PyG's own
LightGCN example: shuffled training edges in batches, full propagation per step, one uniform
random item as the negative, ``recommendation_loss`` (BPR + L2 on the batch's nodes).
Sparrow's side is what ``python -m recsys.train +experiment=lightgcn_gowalla`` runs: the
Lightning ``PairwiseRecommender`` around ``recsys.models.LightGCN``, each step replayed as one
CUDA graph (``model.cuda_graph=true``), negatives sampled on the device by ``PairwiseBatches``,
full-sort evaluation through the shared ``TopKEvaluator``.
Both use d = 64, 3 layers, Adam lr 1e-3, batch 2048, L2 1e-4. Test Recall@20 is measured
every ``--eval-every`` epochs only to time the reach of the target (it selects nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from _bench import cpu_model, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("lightgcn_speed")


def prepare(out: Path) -> None:
    """Export Gowalla's shipped train/test pairs as int64 tensors (needs polars and the data)."""
    from recsys.data import load_interactions, predefined_split

    data = load_interactions("lightgcn-gowalla")
    split = predefined_split(data.interactions, val_ratio=0.0)
    payload = {"num_users": data.num_users, "num_items": data.num_items}
    for part in ("train", "test"):
        df = getattr(split, part)
        payload[f"{part}_users"] = torch.from_numpy(df["user"].to_numpy().astype("int64"))
        payload[f"{part}_items"] = torch.from_numpy(df["item"].to_numpy().astype("int64"))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    log.info(
        "wrote %s: %d train, %d test pairs",
        out,
        payload["train_users"].numel(),
        payload["test_users"].numel(),
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def example_recall(model, edge_index, train_edges, test_edges, num_users: int, k: int, chunk: int) -> float:
    """Recall@k as the evaluation of PyG's LightGCN example computes it (its loop, timed as the anchor).

    One propagation, then per chunk of users: scores, training pairs set to ``-inf``, a dense
    boolean ground-truth block, ``topk`` and a gather; one host sync per chunk.
    """
    emb = model.get_embedding(edge_index)
    user_emb, item_emb = emb[:num_users], emb[num_users:]
    recall = total = 0.0
    for start in range(0, num_users, chunk):
        end = start + chunk
        logits = user_emb[start:end] @ item_emb.T  # (B, I)
        mask = (train_edges[0] >= start) & (train_edges[0] < end)
        logits[train_edges[0, mask] - start, train_edges[1, mask] - num_users] = float("-inf")
        truth = torch.zeros_like(logits, dtype=torch.bool)
        mask = (test_edges[0] >= start) & (test_edges[0] < end)
        truth[test_edges[0, mask] - start, test_edges[1, mask] - num_users] = True
        count = torch.bincount(test_edges[0, mask] - start, minlength=logits.size(0))  # (B,)
        hits = truth.gather(1, logits.topk(k, dim=-1).indices).sum(-1)  # (B,)
        recall += float((hits / count.clamp(min=1)).sum())
        total += int((count > 0).sum())
    return recall / total


def anchor(data: dict, epochs: int, device: torch.device) -> dict[str, float]:
    """PyG's LightGCN example loop; returns median epoch time, eval time, Recall@20, peak memory."""
    from torch_geometric.nn.models import LightGCN as PygLightGCN

    from retrieval.eval.topk_evaluator import TopKEvaluator
    from retrieval.types import ItemSets

    U, I = data["num_users"], data["num_items"]  # noqa: E741
    tu, ti = data["train_users"].to(device), data["train_items"].to(device)
    train_edges = torch.stack([tu, ti + U])  # (2, E) user -> item node
    edge_index = torch.cat([train_edges, train_edges.flip(0)], 1)  # (2, 2E) undirected
    torch.manual_seed(0)
    model = PygLightGCN(U + I, 64, 3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(range(train_edges.size(1)), shuffle=True, batch_size=2048)
    times = []
    for _ in range(epochs):
        _sync()
        start = time.perf_counter()
        for index in loader:
            pos = train_edges[:, index.to(device)]  # (2, B)
            neg = torch.stack([pos[0], torch.randint(U, U + I, (pos.size(1),), device=device)])
            label_index = torch.cat([pos, neg], 1)  # (2, 2B)
            opt.zero_grad()
            pos_rank, neg_rank = model(edge_index, label_index).chunk(2)
            loss = model.recommendation_loss(
                pos_rank, neg_rank, node_id=label_index.unique(), lambda_reg=1e-4
            )
            loss.backward()
            opt.step()
        _sync()
        times.append(time.perf_counter() - start)
    train_sets = ItemSets.from_pairs(data["train_users"], data["train_items"], U, I)
    test_sets = ItemSets.from_pairs(data["test_users"], data["test_items"], U, I)
    test_edges = torch.stack([data["test_users"], data["test_items"] + U]).to(device)  # (2, T)
    with torch.no_grad():
        example = lambda: example_recall(model, edge_index, train_edges, test_edges, U, 20, 2048)  # noqa: E731
        eval_time = median_time(example)
        # quality on the shared harness (untimed), so both sides are scored the same way
        emb = model.get_embedding(edge_index)
        user_emb, item_emb = emb[:U], emb[U:]
        scores_of = lambda users: user_emb[users] @ item_emb.T  # noqa: E731
        metrics = TopKEvaluator(ks=(20,), metrics=("recall", "ndcg"), chunk_size=4096)(
            scores_of, test_sets, train_sets, device=device
        )
    return {
        "epoch_s": sorted(times)[len(times) // 2],
        "eval_s": eval_time,
        "recall@20": metrics["recall@20"],
        "ndcg@20": metrics["ndcg@20"],
        "epochs": float(epochs),
    }


def sparrow(
    data: dict, max_epochs: int, budget_s: float, eval_every: int, target: float, device: torch.device
):
    """Sparrow's Lightning path; returns timings, time to target and the last metrics."""
    import lightning as L

    from recsys.data.sampling import PairwiseBatches
    from recsys.lit.pairwise import PairwiseRecommender
    from recsys.models.lightgcn import LightGCN
    from retrieval.eval.topk_evaluator import TopKEvaluator
    from retrieval.types import ItemSets

    U, I = data["num_users"], data["num_items"]  # noqa: E741
    train_sets = ItemSets.from_pairs(data["train_users"], data["train_items"], U, I)
    test_sets = ItemSets.from_pairs(data["test_users"], data["test_items"], U, I)

    class Tensors(L.LightningDataModule):
        """The Gowalla split as tensors (the library's DataModule reads the files with polars)."""

        def train_pairs(self):
            return data["train_users"], data["train_items"]

        def train_dataloader(self):
            batches = PairwiseBatches(
                data["train_users"],
                data["train_items"],
                train_sets,
                2048,
                1,
                2020,
                lambda: self.trainer.current_epoch,
                self.trainer.strategy.root_device,
                "uniform_users",
            )
            return torch.utils.data.DataLoader(batches, batch_size=None)

    evaluator = TopKEvaluator(ks=(20,), metrics=("recall", "ndcg"), chunk_size=4096)
    record: dict[str, float] = {"time_to_target_s": float("nan"), "epoch_to_target": float("nan")}
    curve: list[tuple[int, float, float, float]] = []

    class Monitor(L.Callback):
        def __init__(self):
            self.train_s = 0.0
            self.epoch_times: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            _sync()
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            _sync()
            took = time.perf_counter() - self.t0
            self.train_s += took
            self.epoch_times.append(took)
            epoch = trainer.current_epoch + 1
            if epoch % eval_every == 0 or epoch == max_epochs or self.train_s > budget_s:
                module.eval()
                m = evaluator(module.net.score_all, test_sets, train_sets, device=module.device)
                module.train()
                curve.append((epoch, self.train_s, m["recall@20"], m["ndcg@20"]))
                log.info(
                    "epoch %d  train %.0fs  recall@20 %.4f  ndcg@20 %.4f", epoch, self.train_s, *curve[-1][2:]
                )
                if m["recall@20"] >= target and not record.get("hit"):
                    record.update(hit=1.0, time_to_target_s=self.train_s, epoch_to_target=float(epoch))
            if self.train_s > budget_s:
                trainer.should_stop = True

    torch.manual_seed(2020)
    net = LightGCN(U, I, embedding_dim=64, num_layers=3)
    module = PairwiseRecommender(
        net, lambda params: torch.optim.Adam(params, lr=1e-3), evaluator, l2_weight=1e-4, cuda_graph=True
    )
    monitor = Monitor()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=Tensors())
    module.to(device).eval()  # Lightning's teardown moved it to the CPU at the end of fit

    def evaluate() -> None:
        torch.autograd.graph.increment_version(net.embedding.weight)  # drop the cached propagation
        evaluator(net.score_all, test_sets, train_sets, device=module.device)

    with torch.no_grad():
        eval_s = median_time(evaluate)
    epochs = len(monitor.epoch_times)
    steady = sorted(monitor.epoch_times[1:] or monitor.epoch_times)
    return {
        "epoch_s": steady[len(steady) // 2],
        "first_epoch_s": monitor.epoch_times[0],
        "eval_s": eval_s,
        "epochs": float(epochs),
        "train_s": monitor.train_s,
        "recall@20": curve[-1][2],
        "ndcg@20": curve[-1][3],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        **{k: v for k, v in record.items() if k != "hit"},
    }, curve


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def gpu_main(args: argparse.Namespace) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.load(args.data, weights_only=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    a = anchor(data, args.anchor_epochs, device)
    a["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    s, curve = sparrow(data, args.max_epochs, args.budget_s, args.eval_every, args.target, device)
    rows = [
        (
            "epoch time (s)",
            f"{a['epoch_s']:.2f}",
            f"{s['epoch_s']:.3f}",
            f"{a['epoch_s'] / s['epoch_s']:.1f}x faster",
        ),
        (
            f"full-sort eval, {data['num_users']:,} users (s)",
            f"{a['eval_s']:.3f}",
            f"{s['eval_s']:.3f}",
            f"{a['eval_s'] / s['eval_s']:.2f}x",
        ),
        (
            "GPU memory peak (GiB)",
            f"{a['peak_gib']:.2f}",
            f"{s['peak_gib']:.2f}",
            f"{s['peak_gib'] / a['peak_gib']:.2f}x",
        ),
        ("epochs trained", f"{a['epochs']:.0f}", f"{s['epochs']:.0f}", ""),
        (
            "Recall@20 / NDCG@20 at the end",
            f"{a['recall@20']:.4f} / {a['ndcg@20']:.4f}",
            f"{s['recall@20']:.4f} / {s['ndcg@20']:.4f}",
            "",
        ),
        (
            f"training time to Recall@20 >= {args.target}",
            "",
            f"{s['time_to_target_s']:.0f} s (epoch {s['epoch_to_target']:.0f})",
            "",
        ),
        ("total training time (s)", "", f"{s['train_s']:.0f}", ""),
    ]
    table = ["| measure | anchor: PyG LightGCN + example loop | Sparrow | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {a_} | {b} | {c} | {d} |" for a_, b, c, d in rows]
    curve_lines = ["| epoch | train s | Recall@20 | NDCG@20 |", "|---:|---:|---:|---:|"]
    curve_lines += [f"| {e} | {t:.0f} | {r:.4f} | {n:.4f} |" for e, t, r, n in curve]
    text = "\n".join(
        [
            f"## lightgcn_speed.py gpu, {dt.datetime.now().isoformat(timespec='seconds')}",
            "",
            f"- machine: {machine()}",
            f"- command: `python benchmarks/lightgcn_speed.py gpu --data gowalla.pt --anchor-epochs "
            f"{args.anchor_epochs} --max-epochs {args.max_epochs} --budget-s {args.budget_s:.0f}`",
            "- Gowalla (LightGCN split), d = 64, 3 layers, Adam 1e-3, batch 2048, L2 1e-4",
            f"- epoch times: anchor median of {args.anchor_epochs} epochs; Sparrow median of all but the 1st",
            "- full-sort eval: median of 5 after a warm-up; anchor = the evaluation loop of PyG's example "
            "(Recall@20 only, 2048 users per block); Sparrow = the shared TopKEvaluator (Recall and NDCG@20, "
            "exact id tie-break, 4096 users per block), propagation included on both sides",
            "",
            *table,
            "",
            "Sparrow's test metrics while training (for the time to target only; nothing selected on them):",
            "",
            *curve_lines,
            "",
        ]
    )
    return text


def cpu_main(args: argparse.Namespace) -> str:
    """Epoch time on ML-100K for BPR-MF and LightGCN through ``recsys.train`` on this CPU."""
    rows = []
    for exp in ("bpr_ml100k", "lightgcn_ml100k"):
        out = Path(args.tmp) / exp
        cmd = [
            sys.executable,
            "-m",
            "recsys.train",
            f"+experiment={exp}",
            f"trainer.max_epochs={args.epochs}",
            "trainer.enable_progress_bar=false",
            "callbacks.early_stopping.patience=1000",
            f"hydra.run.dir={out}",
        ]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        import json

        fit = json.loads((out / "metrics.json").read_text())["timings_s"]["fit"]
        rows.append((exp, fit / args.epochs))
    table = ["| experiment | s / epoch (incl. validation) |", "|---|---:|"]
    table += [f"| {e} | {t:.2f} |" for e, t in rows]
    return "\n".join(
        [
            f"## lightgcn_speed.py cpu, {dt.datetime.now().isoformat(timespec='seconds')}",
            "",
            f"- machine: {machine()}, CPU {cpu_model()}, torch threads {torch.get_num_threads()}",
            f"- command: `python benchmarks/lightgcn_speed.py cpu --epochs {args.epochs}`",
            "",
            *table,
            "",
        ]
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "gowalla.pt")
    g = sub.add_parser("gpu")
    g.add_argument("--data", type=Path, default=REPO / ".bench" / "gowalla.pt")
    g.add_argument("--anchor-epochs", type=int, default=3)
    g.add_argument("--max-epochs", type=int, default=1000)
    g.add_argument("--budget-s", type=float, default=420.0, help="stop Sparrow's training after this long")
    g.add_argument("--eval-every", type=int, default=25)
    g.add_argument("--target", type=float, default=0.18)
    g.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    c = sub.add_parser("cpu")
    c.add_argument("--epochs", type=int, default=5)
    c.add_argument("--tmp", type=Path, default=Path("/tmp/sparrow-bench"))
    c.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
        return
    text = gpu_main(args) if args.cmd == "gpu" else cpu_main(args)
    publish(text, args.results)


if __name__ == "__main__":
    main()
