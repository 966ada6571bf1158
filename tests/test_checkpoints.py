import pickle

import pytest
import torch
from safetensors.torch import save_file

from visdistill import Backbone, CheckpointError, load_state_dict_file, load_weights_into
from visdistill.checkpoints import clean_state_dict


@pytest.fixture
def model():
    return Backbone("resnet10t", num_classes=10).model


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "student.model."])
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "lightning"])
def test_prefixes_and_formats_load(tmp_path, model, prefix, fmt):
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": state, "epoch": 3} if fmt == "lightning" else state, path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(model.state_dict())
    fresh = Backbone("resnet10t", num_classes=10, checkpoint=str(path)).model
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_prefix_stripped_only_when_every_key_has_it():
    state = {"model.a": torch.zeros(1), "b": torch.zeros(1)}
    assert set(clean_state_dict(state)) == {"model.a", "b"}


def test_missing_and_unexpected_keys_are_listed(tmp_path, model):
    state = dict(model.state_dict())
    state.pop("fc.weight")
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_weights_into(model, state, source="x.pt")
    msg = str(e.value)
    assert "missing keys: fc.weight" in msg and "unexpected keys: extra.weight" in msg


def test_shape_mismatch_names_the_layer(model):
    other = Backbone("resnet10t", num_classes=7).model
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(7, 512\) vs model \(10, 512\)"):
        load_weights_into(model, other.state_dict())


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        Backbone("resnet10t", checkpoint=str(tmp_path / "nope.safetensors"))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(path)
    assert "pwned" not in capsys.readouterr().out


def test_truncated_file_is_a_clear_error(tmp_path, model):
    path = tmp_path / "w.safetensors"
    save_file(dict(model.state_dict()), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict_file(path)


def test_pretrained_true_goes_through_timms_loader(tmp_path, model):
    """`pretrained: true` uses timm's own loading (hub, cache or a pretrained_cfg file)."""
    path = tmp_path / "w.safetensors"
    save_file(dict(model.state_dict()), str(path))
    overlay = {"file": str(path), "num_classes": 10}
    loaded = Backbone(
        "resnet10t",
        num_classes=10,
        pretrained=True,
        model_kwargs={"pretrained_cfg_overlay": overlay},
    ).model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_unreachable_pretrained_weights_are_explained(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(
        CheckpointError, match=r"pretrained weights for 'resnet10t'.*checkpoint: <file>"
    ):
        Backbone("resnet10t", pretrained=True)
