"""Terms record their constructor arguments, so checkpoints rebuild them."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CNN, VIT

from visdistill import KD, ND, OFA, ConfigError, DigitsDataModule, DistillationModule, ModelConfig
from visdistill.terms.base import DistillTerm, term_from_config


class _Scaled(KD):
    """A subclass whose __init__ calls KD's: its own arguments are the record."""

    def __init__(self, scale: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_config()
        self.scale = scale


class _Unrecorded(KD):
    """A subclass with its own __init__ that forgets save_config()."""

    def __init__(self, scale: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale


class _WithTensor(DistillTerm):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.save_config()
        self.register_buffer("table", table)


class _Inherits(DistillTerm):
    name = "inherits"


def test_config_records_every_argument_with_its_default():
    cfg = KD(temperature=2.0).config()
    assert cfg == {
        "class_path": "visdistill.KD",  # the public path: survives moving the class's file
        "init_args": {"temperature": 2.0, "warmup_epochs": 0.0, "weight": 1.0, "teachers": None},
    }
    rebuilt = term_from_config(cfg)
    assert type(rebuilt) is KD and rebuilt.temperature == 2.0
    # A term of one's own keeps its module path.
    assert _Scaled(scale=1.0).config()["class_path"] == f"{__name__}._Scaled"


def test_checkpoints_from_before_the_terms_folder_rename_still_load():
    # Checkpoints written before visdistill/distillers/ became visdistill/terms/ name the old
    # module path; they must rebuild the same term.
    old = {"class_path": "visdistill.distillers.kd.KD", "init_args": {"temperature": 3.0}}
    rebuilt = term_from_config(old)
    assert type(rebuilt) is KD and rebuilt.temperature == 3.0


def test_subclass_record_is_the_outermost_call_and_paths_become_strings(tmp_path):
    cfg = _Scaled(scale=3.0, temperature=1.5).config()
    assert cfg["init_args"] == {"scale": 3.0, "temperature": 1.5}  # **kwargs are flattened
    assert _Inherits(weight=0.5).config()["init_args"] == {"weight": 0.5, "teachers": None}
    nd = ND(class_means_file=tmp_path / "means.pt", cache_dir="")
    assert nd.config()["init_args"]["class_means_file"] == str(tmp_path / "means.pt")
    assert isinstance(OFA(stages=(1, 2)).config()["init_args"]["stages"], list)


def test_the_record_is_the_arguments_as_given_not_the_parents_call():
    # KD's own save_config() (reached through super().__init__) records nothing for a
    # subclass: a forgotten call leaves no config rather than KD's arguments under
    # the subclass's name, which would rebuild it with another `scale`.
    assert _Unrecorded(scale=3.0).config() is None
    assert _Scaled(3.0).config()["init_args"] == {"scale": 3.0}  # positional, by name
    rebuilt = term_from_config(_Scaled(scale=5.0, temperature=2.0).config())
    assert (rebuilt.scale, rebuilt.temperature) == (5.0, 2.0)
    # No constructor rewriting: the classes keep the __init__ they define.
    assert "__init_subclass__" not in vars(DistillTerm)
    assert not hasattr(KD.__init__, "__wrapped__")


def test_a_term_with_a_non_plain_argument_has_no_config():
    assert _WithTensor(torch.zeros(3)).config() is None
    module = DistillationModule(
        ModelConfig(**CNN), [ModelConfig(**CNN)], [_WithTensor(torch.zeros(3))]
    )
    assert "terms" not in module.hparams  # must be passed to load_from_checkpoint again


def test_only_visdistill_modules_are_imported_from_a_checkpoint():
    with pytest.raises(ConfigError, match="only visdistill modules are imported"):
        term_from_config({"class_path": "some_plugin.terms.Evil", "init_args": {}})
    with pytest.raises(ConfigError, match="is not a DistillTerm class"):
        term_from_config({"class_path": "visdistill.ModelConfig"})
    with pytest.raises(ConfigError, match="class_path"):
        term_from_config({"init_args": {}})
    # An already imported module (a user's own term) is found without importing anything.
    assert type(term_from_config({"class_path": f"{__name__}._Scaled"})) is _Scaled


def test_load_from_checkpoint_rebuilds_terms_with_their_state(tmp_path):
    module = DistillationModule(
        ModelConfig(**CNN), [ModelConfig(**VIT)], [OFA(eps=1.2), {"class_path": "visdistill.KD"}]
    )
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=16))
    ckpt = Path(tmp_path) / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = DistillationModule.load_from_checkpoint(ckpt, weights_only=True)
    assert [type(t).__name__ for t in loaded.terms] == ["OFA", "KD"]
    assert loaded.terms[0].config()["init_args"]["eps"] == 1.2
    state, saved = loaded.state_dict(), module.state_dict()
    branch_keys = [k for k in saved if k.startswith("terms.0.")]
    assert branch_keys and all(torch.equal(state[k], saved[k]) for k in branch_keys)
