"""Where a LightGCN training step spends its time on a GPU (Gowalla, d = 64, 3 layers, batch 2048).

    python benchmarks/lightgcn_speed.py prepare --out .bench/gowalla.pt     # on a box with the data
    python benchmarks/lightgcn_profile.py --data .bench/gowalla.pt         # on the GPU

Prints the epoch time of Sparrow's model, sampler and loss in a bare PyTorch loop (no
Lightning), with Adam's foreach and fused kernels, then torch.profiler's table of 50 steps.
Compare with ``lightgcn_speed.py``'s Lightning epoch time to see the trainer's host overhead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.data.sampling import PairwiseBatches  # noqa: E402
from recsys.losses import bpr_loss, l2_penalty  # noqa: E402
from recsys.models.lightgcn import LightGCN  # noqa: E402
from retrieval.types import ItemSets  # noqa: E402


def step(net: LightGCN, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    items = torch.cat([batch["pos"].unsqueeze(1), batch["neg"]], 1)  # (B, 2)
    scores = net(batch["users"], items)  # (B, 2)
    loss = bpr_loss(scores[:, 0], scores[:, 1]) + 1e-4 * l2_penalty(
        *net.ego_embeddings(batch["users"], items)
    )
    opt.zero_grad()
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path(".bench/gowalla.pt"))
    args = parser.parse_args()
    data = torch.load(args.data, weights_only=True)
    n_users, n_items, device = data["num_users"], data["num_items"], torch.device("cuda")
    sets = ItemSets.from_pairs(data["train_users"], data["train_items"], n_users, n_items)
    for fused in (False, True):
        torch.manual_seed(0)
        net = LightGCN(n_users, n_items, 64, 3).to(device)
        net.set_graph(data["train_users"], data["train_items"])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
        batches = PairwiseBatches(
            data["train_users"], data["train_items"], sets, 2048, 1, 0, lambda: 0, device, "uniform_users"
        )
        for epoch in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                step(net, opt, batch)
            torch.cuda.synchronize()
            sys.stdout.write(
                f"bare loop, fused Adam={fused}, epoch {epoch}: {time.perf_counter() - start:.3f} s\n"
            )
    it = iter(batches)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            step(net, opt, next(it))
        torch.cuda.synchronize()
    sys.stdout.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18) + "\n")


if __name__ == "__main__":
    main()
