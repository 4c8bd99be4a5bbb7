"""COMET's permutation local search on a bad initialisation of trained OneRec MoE gates.

    python benchmarks/onerec_table.py --dataset ml100k --variants "OneRec, sparse MoE" \\
        "OneRec, COMET gate" "OneRec, hash gate"                              # the trained runs
    python benchmarks/moe_local_search.py outputs/onerec_table/ml100k/OneRec__sparse_MoE_2020 \\
        outputs/onerec_table/ml100k/OneRec__COMET_gate_2020 outputs/onerec_table/ml100k/OneRec__hash_gate_2020

Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with Trees and Local
Search", KDD 2023 (:func:`recsys.models.gates.local_search`). For each finished run (its selected
checkpoint, as ``recsys.train`` tested it):

1. **trained**: validation metrics and the next-token loss (NLL) on fixed training batches
   (``--batches`` batches of the training rows, each cut once with a fixed generator);
2. **scrambled** (the bad initialisation): in every decoder MoE block, each slot-to-expert map
   (top-k: router row -> expert; hash: bucket -> expert; COMET: each tree's leaf -> expert) is
   rotated by one expert, so every token is sent to an expert trained for other tokens; the
   experts' weights are unchanged;
3. **after local search**: greedy transpositions of those maps, kept when the training-batch NLL
   strictly drops (at most ``--max-moves`` tried per block), blocks searched in order.

Validation only (never test). Rotation and search change the routing alone, so a search that
finds the trained assignment restores the trained numbers exactly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import machine, publish  # noqa: E402

METRICS = ["val/ndcg@10", "val/recall@10"]


def restored(run: Path):
    """(trainer, datamodule, GenerativeRecommender with the run's tested weights)."""
    import lightning as L

    from recsys import checkpoint

    ckpt = json.loads((run / "metrics.json").read_text())["protocol"]["selected checkpoint"]
    _, datamodule, model = checkpoint.rebuild(checkpoint.load_info(ckpt))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)  # sets up, loads
    return trainer, datamodule, model


def fixed_batches(model, datamodule, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` training batches cut once each with a fixed generator: [(histories, futures)]."""
    from recsys.data.sequences import cut_rows

    g = torch.Generator().manual_seed(0)
    out = []
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == n:
            break
        hist, fut, _ = cut_rows(batch["items"], model.net.max_len, model.hparams.list_len, g)
        out.append((hist, fut))
    return out


def state(trainer, datamodule, model, loss_fn) -> dict[str, float]:
    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {k: val[k] for k in METRICS} | {"nll": float(loss_fn())}


def scramble(moe) -> None:
    """Rotate every slot-to-expert map of ``moe`` by one expert (transpositions a <-> a + 1)."""
    for group in range(moe.router.groups):
        for a in range(moe.num_experts - 1):
            moe.router.swap(group, a, a + 1)


def study(run: Path, batches: int, max_moves: int) -> dict:
    trainer, datamodule, model = restored(run)
    data = fixed_batches(model, datamodule, batches)
    net = model.net

    @torch.no_grad()
    def loss_fn() -> torch.Tensor:
        net.eval()
        return torch.stack([net.losses(h, f)["nll"] for h, f in data]).mean()

    blocks = [b.ffn for b in net.decoder if hasattr(getattr(b.ffn, "router", None), "swap")]
    row = {
        "gate": net.decoder[0].ffn.router.__class__.__name__,
        "trained": state(trainer, datamodule, model, loss_fn),
    }
    for moe in blocks:
        scramble(moe)
    row["scrambled"] = state(trainer, datamodule, model, loss_fn)
    from recsys.models.gates import local_search

    tried = accepted = 0
    for i, moe in enumerate(blocks):
        found = local_search(moe, loss_fn, max_moves, seed=i)
        tried, accepted = tried + found["moves_tried"], accepted + found["moves_accepted"]
    row["searched"] = state(trainer, datamodule, model, loss_fn)
    row["moves"] = f"{accepted} / {tried}"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished OneRec run folders (metrics.json inside)")
    p.add_argument("--batches", type=int, default=4, help="fixed training batches for the search loss")
    p.add_argument("--max-moves", type=int, default=150, help="most swaps tried per MoE block")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args()
    rows = [(run.name, study(run, args.batches, args.max_moves)) for run in args.runs]
    lines = [
        "| run | gate | stage | val NDCG@10 | val Recall@10 | training-batch NLL | swaps kept / tried |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, row in rows:
        for stage in ("trained", "scrambled", "searched"):
            s = row[stage]
            moves = row["moves"] if stage == "searched" else ""
            lines.append(
                f"| {name} | {row['gate']} | {stage} | {s['val/ndcg@10']:.4f} | {s['val/recall@10']:.4f} | "
                f"{s['nll']:.4f} | {moves} |"
            )
    cmd = "python benchmarks/moe_local_search.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "## MoE gates: permutation local search from a bad initialisation - "
            f"{dt.datetime.now():%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}, torch {torch.__version__}. "
            f"Command: `{cmd}`. Bad initialisation: every slot-to-expert map of every decoder MoE block "
            f"rotated by one expert; search: greedy transpositions on {args.batches} fixed training "
            f"batches' NLL, at most {args.max_moves} tried per block. Validation only.",
            "",
            *lines,
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
