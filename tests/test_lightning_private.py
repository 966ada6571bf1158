"""Each private-Lightning helper against the installed Lightning: when an upgrade moves a
private name, these fail here, not somewhere deep in a fit."""

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visdistill import lightning_private as lp


def _loader(n=12, batch_size=2):
    return DataLoader(TensorDataset(torch.randn(n, 3), torch.randn(n, 1)), batch_size=batch_size)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.seen = {"logs": [], "epoch_starts": 0, "loader": None}

    def training_step(self, batch, batch_idx):
        self.seen["logs"].append(lp.logs_reach_loggers(self.trainer))
        lp.repair_epoch_progress(self.trainer)  # a no-op in an uninterrupted run
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def on_train_epoch_start(self):
        self.seen["epoch_starts"] += 1

    def on_fit_start(self):
        self.seen["loader"] = lp.fit_train_dataloader(self.trainer)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    kw = {"logger": False, **kw}
    return L.Trainer(
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def test_attached_trainer_logs_reach_loggers_loader_and_epoch_hooks(tmp_path):
    module, loader = Tiny(), _loader()
    assert lp.attached_trainer(module) is None
    trainer = _trainer(tmp_path, max_epochs=2, log_every_n_steps=3)
    assert lp.uses_distributed_sampler(trainer)
    trainer.fit(module, train_dataloaders=loader)
    assert lp.attached_trainer(module) is trainer
    # Steps 2, 5, 8 and 11 of 12 are the logging steps of log_every_n_steps=3.
    assert module.seen["logs"] == [(s + 1) % 3 == 0 for s in range(12)]
    assert module.seen["epoch_starts"] == 2
    assert module.seen["loader"] is loader  # passed straight to fit(): no data module
    assert not lp.uses_distributed_sampler(_trainer(tmp_path, use_distributed_sampler=False))


def test_fit_train_dataloader_of_a_data_module(tmp_path):
    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return _loader(4)

    module = Tiny()
    _trainer(tmp_path, max_steps=1).fit(module, datamodule=Data())
    assert len(module.seen["loader"].dataset) == 4


def test_logger_version_is_read_and_set(tmp_path):
    fixed, numbered = CSVLogger(tmp_path, name="a", version="run"), CSVLogger(tmp_path, name="b")
    assert lp.logger_fixed_version(fixed) == "run"
    assert lp.logger_fixed_version(numbered) is None
    assert lp.logger_version_settable(fixed) and not lp.logger_version_settable(object())
    lp.set_logger_version(fixed, "run/version_2")
    assert fixed.version == "run/version_2"
    assert fixed.log_dir == str(tmp_path / "a" / "run" / "version_2")


def test_fit_loop_checkpoint_state_reads_a_real_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(Tiny(), train_dataloaders=_loader())
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    checkpoint = torch.load(tmp_path / "end.ckpt", weights_only=True)
    last, states = lp.fit_loop_checkpoint_state(checkpoint)
    assert last is True and isinstance(states, list)
    assert lp.fit_loop_checkpoint_state({}) == (False, [])
    assert isinstance(bool(lp.RICH_AVAILABLE), bool)
