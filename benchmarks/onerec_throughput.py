"""OneRec speed: training throughput of the sparse-MoE decoder against the dense control, and
generation throughput of trie-constrained beam search.

    python benchmarks/onerec_throughput.py                          # CPU, ML-100K
    python benchmarks/onerec_throughput.py --device cuda --data diginetica

Training: each variant pre-trains through Lightning as ``python -m recsys.train
+experiment=onerec_<data>`` would (same configs and datamodule; the reward model is fitted for one
step only, it is not timed), ``--warmup`` untimed batches then ``--batches`` timed ones. A row of
a batch is cut ``model.cuts_per_row`` times, so examples/s = sequences/s x that.

Generation: the trained model's beam search over the validation histories, in batches of
``--users``: the next item (width ``model.eval_beam``, one item, what the next-item metrics rank)
and a whole list (width ``model.session_beam``, ``data.horizon`` items). Reported in users (histories)
per second after one untimed batch; the ratio column compares with the dense control.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _bench import publish, torch_section  # noqa: E402
from sequential_throughput import fit_timed  # noqa: E402

VARIANTS = {"OneRec, sparse MoE": [], "OneRec, dense control": ["model.net.ffn=dense"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_rate(module, datamodule, list_len: int, width: int, users: int, rounds: int) -> float:
    """Histories per second of beam search for ``list_len`` items at ``width``, over ``rounds`` batches."""
    net = module.net.eval()
    device = next(net.parameters()).device
    trie = net.trie(module.generable.to(device))
    histories = datamodule.histories("val").to(device)
    batches = [histories[i * users : (i + 1) * users] for i in range(rounds + 1)]
    batches = [b for b in batches if b.shape[0]]
    net.beam_search(batches[0], trie, list_len, width)  # warm-up
    _sync(device)
    start, done = time.perf_counter(), 0
    for b in batches[1:] or batches:
        net.beam_search(b, trie, list_len, width)
        done += b.shape[0]
    _sync(device)
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["ml100k", "diginetica"], default="ml100k")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--users", type=int, default=256, help="histories per generation batch")
    p.add_argument("--rounds", type=int, default=3, help="timed generation batches")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--work", type=Path, default=Path("outputs/onerec_throughput"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every variant")
    args = p.parse_args()
    rows = {}
    for name, extra in VARIANTS.items():
        overrides = ["model.reward_steps=1", *extra, *args.overrides]
        row, module, dm = fit_timed(
            f"onerec_{args.data}", overrides, args.device, args.warmup, args.batches, args.work / name[:12]
        )
        hp = module.hparams
        with torch.no_grad():
            row["next users/s"] = generation_rate(module, dm, 1, hp.eval_beam, args.users, args.rounds)
            row["list users/s"] = generation_rate(
                module, dm, hp.list_len, hp.session_beam, args.users, args.rounds
            )
        row["cuts"], row["widths"] = hp.cuts_per_row, (hp.eval_beam, hp.session_beam, hp.list_len)
        rows[name] = row
    dense = rows["OneRec, dense control"]
    lines = [
        "| decoder | parameters | train sequences/s | ms/step | vs dense | peak GiB | next-item users/s "
        "| list users/s | vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {n} | {r['parameters']:,} | {r['sequences/s']:,.0f} | {r['ms/step']:.1f} | "
            f"{r['sequences/s'] / dense['sequences/s']:.2f}x | {r['peak GiB']:.2f} | "
            f"{r['next users/s']:,.0f} | "
            f"{r['list users/s']:,.0f} | {r['list users/s'] / dense['list users/s']:.2f}x |"
            for n, r in rows.items()
        ],
    ]
    cuts, (w_next, w_list, n) = rows[name]["cuts"], rows[name]["widths"]
    text = torch_section(
        f"OneRec throughput, {args.data}, {args.device}",
        f"Training: {args.warmup} warm-up batches, then {args.batches} timed, each row cut {cuts} times. "
        f"Generation: batches of {args.users} validation histories, next item at beam width {w_next}, lists "
        f"of {n} at width {w_list}, trie-constrained, KV-cached.",
        lines,
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
