"""RunInfo's per-epoch history: validation metrics only in the epochs whose validation ran."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from recsys.checkpoint import RunInfo

CONFIG = {"model": {"net": {"_target_": "toy"}}, "data": {"dataset": "toy", "num_users": 1, "num_items": 1}}


class Counting(L.LightningModule):
    """Logs train/loss each epoch and val/epoch = the epoch of the validation that logged it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w - batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/epoch", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epochs_without_validation_have_no_stale_val_rows(tmp_path) -> None:
    data = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    info = RunInfo(CONFIG)
    trainer = L.Trainer(
        max_epochs=5,
        check_val_every_n_epoch=2,
        callbacks=[info],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(Counting(), train_dataloaders=data, val_dataloaders=data)
    assert sorted(info.history) == [0, 1, 2, 3, 4]
    assert all("train/loss" in row for row in info.history.values())
    assert {e: row.get("val/epoch") for e, row in info.history.items()} == {
        0: None,
        1: 1.0,
        2: None,
        3: 3.0,
        4: None,
    }
