"""Training throughput of the sequence recommenders: SASRec (the baseline) vs M2TRec.

    python benchmarks/sequential_throughput.py                       # CPU, ML-100K sequences
    python benchmarks/sequential_throughput.py --device cuda --batches 200
    python benchmarks/sequential_throughput.py --experiment-suffix diginetica

Each model trains through Lightning exactly as ``python -m recsys.train +experiment=<model>_<data>``
would (same configs, full-softmax loss, the same datamodule), for ``--warmup`` batches that are not
timed and then ``--batches`` timed ones; validation is off. Reported: training sequences per second,
milliseconds per step, the ratio to SASRec in the same run and, on CUDA, the peak memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from _bench import publish, torch_section  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = {
    "SASRec": ("sasrec", []),
    "M2TRec": ("m2trec", []),
    "M2TRec hybrid": ("m2trec", ["model.net.use_item_ids=true"]),
}


class StepClock(L.Callback):
    """Wall time of the training batches after the first ``warmup`` (synchronised on CUDA)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.sequences, self.batches = warmup, None, None, 0, 0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.batches == self.warmup:  # counted across epochs: a small dataset has few batches each
            self._sync(module)
            self.start = time.perf_counter()
        if self.batches >= self.warmup:
            self.sequences += batch["items"].shape[0]
        self.batches += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        self.end = time.perf_counter()


def fit_timed(
    experiment: str, overrides: list[str], device: str, warmup: int, batches: int, out: Path
) -> tuple[dict, L.LightningModule, L.LightningDataModule]:
    """Train ``warmup + batches`` steps of an experiment; (the timing row, the module, the datamodule)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={experiment}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, evaluator=instantiate(cfg.evaluator))
    clock = StepClock(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=-1,
        max_steps=warmup + batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        default_root_dir=str(out),
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=datamodule)
    seconds = clock.end - clock.start
    steps = trainer.global_step - warmup
    row = {
        "sequences/s": clock.sequences / seconds,
        "ms/step": 1000 * seconds / steps,
        "steps": steps,
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
        "parameters": sum(p.numel() for p in module.net.parameters()),
    }
    return row, module, datamodule


def measure(experiment: str, overrides: list[str], device: str, warmup: int, batches: int, out: Path) -> dict:
    """The timing row of :func:`fit_timed`."""
    return fit_timed(experiment, overrides, device, warmup, batches, out)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["ml100k", "diginetica"], default="ml100k")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--work", type=Path, default=Path("outputs/sequential_throughput"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every model, e.g. data.batch_size=512")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {
        name: measure(
            f"{model}_{args.data}",
            [*extra, *args.overrides],
            args.device,
            args.warmup,
            args.batches,
            args.work / name.replace(" ", "_"),
        )
        for name, (model, extra) in MODELS.items()
    }
    base = rows["SASRec"]["sequences/s"]
    lines = [
        "| model | parameters | sequences/s | ms/step | vs SASRec | peak GiB |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {n} | {r['parameters']:,} | {r['sequences/s']:,.0f} | {r['ms/step']:.1f} | "
            f"{r['sequences/s'] / base:.2f}x | {r['peak GiB']:.2f} |"
            for n, r in rows.items()
        ],
    ]
    text = torch_section(
        f"Sequential training throughput, {args.data}, {args.device}",
        f"Through Lightning with the experiments' configs (full softmax), {args.warmup} warm-up batches, "
        f"then {args.batches} timed.",
        lines,
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
