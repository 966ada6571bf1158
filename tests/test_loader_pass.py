import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from visdistill.loader_pass import run_over_loader, shard_loader


class Numbers(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"image": torch.full((3, 2, 2), float(i)), "index": torch.tensor(i)}


class Probe(nn.Module):
    """Records the grad mode and its own train flag at every call."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Dropout(0.5)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.is_grad_enabled(), self.training, self.inner.training))
        return x.flatten(1).mean(1)


def test_runs_in_eval_and_no_grad_then_restores_the_modes():
    model = Probe().train()
    model.inner.eval()  # a mixed state comes back exactly
    loader = DataLoader(Numbers(), batch_size=4)
    got = [(batch["index"].tolist(), out.tolist()) for batch, out in
           run_over_loader(model, loader, progress=False)]  # fmt: skip
    assert got == [([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0]), ([4, 5, 6, 7], [4.0, 5.0, 6.0, 7.0]),
                   ([8, 9], [8.0, 9.0])]  # fmt: skip
    assert model.seen == [(False, False, False)] * 3
    assert model.training and not model.inner.training
    assert torch.is_grad_enabled()


def test_an_abandoned_pass_restores_the_modes_too():
    model = Probe().train()
    passes = run_over_loader(model, DataLoader(Numbers(), batch_size=4), progress=False)
    next(passes)
    passes.close()
    assert model.training and model.inner.training


def test_custom_forward_max_batches_and_device():
    loader = DataLoader(Numbers(), batch_size=3)
    outs = list(
        run_over_loader(
            Probe(), loader, lambda m, b: b["index"] * 2, device="cpu", max_batches=2,
            progress=False,
        )
    )  # fmt: skip
    assert [o.tolist() for _, o in outs] == [[0, 2, 4], [6, 8, 10]]


def test_rank_shards_cover_the_data_exactly_once():
    loader = DataLoader(Numbers(), batch_size=4)
    seen = []
    for rank in range(3):
        for batch, _ in run_over_loader(Probe(), loader, rank=rank, world_size=3, progress=False):
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(10))
    assert len(shard_loader(loader, 1, 3).dataset) == 3  # 1, 4, 7
    with pytest.raises(ValueError, match="rank 3 is not in"):
        shard_loader(loader, 3, 3)
    with pytest.raises(TypeError, match="shards a DataLoader only"):
        next(run_over_loader(Probe(), iter(loader), rank=0, world_size=2))
