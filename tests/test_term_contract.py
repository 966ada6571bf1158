"""The contract every distillation term keeps, checked for every term class of the package
(``list_terms()``, after importing every module of ``visdistill.terms``) and for the
example in ``examples/custom_term.py``, so a term added later is checked without editing
this file:

- it is built from a YAML config, and its recorded config rebuilds it;
- a checkpoint (hyper-parameters + state dict, read with ``weights_only=True``) rebuilds a
  module whose losses are identical;
- the teachers get no gradient and stay in eval mode, while the student and every
  parameter of the term do get one;
- the loss and its gradients are finite at logits of +/-1e4 and with inputs at the top of
  the float16 range (teacher outputs in float16, as from a half-precision teacher);
- its documented zero case (``zero_parts``: the losses that are 0 when every teacher is the
  student itself) is zero.

A check that does not apply to a term is skipped only when the term says why, in
``contract_exempt``. A term whose state needs data before its first step (ND's class means)
gets it from ``PREPARE`` below; a new term of that kind fails until it is listed there.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import visdistill.terms
from visdistill import DistillationModule, ModelConfig
from visdistill.models import Backbone, ModelOutput
from visdistill.terms.base import DistillTerm, as_term_output, list_terms, term_from_config

CHECKS = ("yaml", "checkpoint", "gradients", "extreme_logits", "fp16_range", "zero_case")
ROOT = Path(__file__).resolve().parents[1]
# Tiny but real: a 4-stage timm ResNet, 8-16 channels, at 32 px.
TINY = dict(
    name="resnet10t", num_classes=10, model_kwargs=dict(channels=(8, 8, 16, 16), stem_width=8)
)


def _import_all_terms() -> list[type[DistillTerm]]:
    for info in pkgutil.iter_modules(visdistill.terms.__path__):
        importlib.import_module(f"visdistill.terms.{info.name}")
    spec = importlib.util.spec_from_file_location("custom_term", ROOT / "examples/custom_term.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["custom_term"] = example  # term_from_config finds imported modules only
    spec.loader.exec_module(example)
    return list_terms() + list_terms("custom_term")


TERMS = _import_all_terms()


def _set_nd_means(term, module, student: ModelOutput, teachers, target) -> None:
    """ND: teacher class means from this batch (one image per class, see ``_batch``)."""
    means = [torch.zeros(10, t.pooled.shape[1]) for t in teachers]
    for m, out in zip(means, teachers, strict=True):
        m[target] = out.pooled.float()
    term.set_class_means(means)


def _fit_adaptor_normalizers(term, module, student: ModelOutput, teachers, target) -> None:
    """AdaptorHeads: the teacher-feature normalisers' statistics from this batch."""
    term.reset_normalizers()
    term.accumulate_normalizers(teachers)
    term.finalize_normalizers()


# Terms whose state needs data before the first step: how the contract test provides it.
PREPARE: dict[str, Callable[..., None]] = {
    "ND": _set_nd_means,
    "AdaptorHeads": _fit_adaptor_normalizers,
}


def _id(cls: type) -> str:
    return cls.__name__


def _exempt(cls: type[DistillTerm], check: str) -> None:
    reason = cls.contract_exempt.get(check)
    if reason:
        pytest.skip(f"{cls.__name__}: {reason}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> list[str]:
    """Three weight files of the tiny model: student, teacher 1, teacher 2."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    files = []
    for seed in range(3):
        torch.manual_seed(seed)
        state = Backbone(**TINY).model.state_dict()
        files.append(str(folder / f"tiny{seed}.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items()}, files[-1])
    return files


def _yaml(cls: type[DistillTerm]) -> str:
    return yaml.safe_dump(
        {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {"weight": 1.0}}
    )


def _module(cls, weights, mirror: bool = False, ce_weight: float = 1.0) -> DistillationModule:
    """Student and two teachers, all the tiny ResNet; with ``mirror`` the teachers are the
    student itself (same weights, so the same outputs in eval mode)."""
    student = ModelConfig(**TINY, checkpoint=weights[0])
    teachers = [
        replace(student, checkpoint=weights[0 if mirror else i], alias=f"t{i}") for i in (1, 2)
    ]
    module = DistillationModule(
        student, teachers, [yaml.safe_load(_yaml(cls))], ce_weight=ce_weight
    )
    return module


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"image": torch.rand(4, 3, 32, 32), "target": torch.arange(4), "index": torch.arange(4)}


def _outputs(module: DistillationModule, batch) -> tuple[ModelOutput, list[ModelOutput]]:
    student = module.student(
        batch["image"],
        stages=module.student_stages,
        pooled=module.needs_pooled,
        prefix_tokens=module.needs_prefix_tokens,
    )
    teachers = module.teachers(
        batch["image"], stages=module.teacher_stages, pooled=module.needs_pooled
    )
    return student, teachers


def _prepare(module: DistillationModule, batch) -> None:
    term = module.terms[0]
    prepare = PREPARE.get(type(term).__name__)
    if prepare is not None:
        training = module.training
        module.eval()  # no BatchNorm statistics move while preparing
        with torch.no_grad():
            student, teachers = _outputs(module, batch)
        prepare(term, module, student, term.own(teachers), batch["target"])
        module.train(training)


def _losses(module: DistillationModule, batch, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # terms that sample (TRG's token positions) draw the same
    return module.compute_losses(batch)[1]


# ------------------------------------------------------------------ the registry


def test_every_term_class_is_checked():
    names = {cls.__name__ for cls in TERMS}
    assert {"KD", "DKD", "MEALV2", "UNIC", "MSTRouting", "OFA", "ND", "TRG", "DisWOT"} <= names
    assert "PooledHint" in names  # the documented example
    for cls in TERMS:
        unknown = set(cls.contract_exempt) - set(CHECKS)
        assert not unknown, f"{cls.__name__}.contract_exempt names unknown checks {unknown}"
        assert all(reason.strip() for reason in cls.contract_exempt.values()), cls.__name__


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("cls", TERMS, ids=_id)
def test_built_from_yaml_and_its_config_rebuilds_it(cls, weights):
    _exempt(cls, "yaml")
    module = _module(cls, weights)
    term = module.terms[0]
    assert type(term) is cls
    config = term.config()
    assert config is not None, (
        f"{cls.__name__} has no config: its __init__ must call self.save_config() after "
        "super().__init__(), with plain-valued arguments"
    )
    assert module.hparams["terms"] == [config]
    assert yaml.safe_load(yaml.safe_dump(config)) == config  # plain YAML types only
    rebuilt = term_from_config(config)
    assert type(rebuilt) is cls and rebuilt.config() == config


@pytest.mark.parametrize("cls", TERMS, ids=_id)
def test_checkpoint_round_trip_gives_identical_losses(cls, weights, tmp_path):
    _exempt(cls, "checkpoint")
    module, batch = _module(cls, weights), _batch()
    _prepare(module, batch)
    # One optimizer step, so parameters and running buffers are no longer their initial values.
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    total, _, _ = module.compute_losses(batch)
    total.backward()
    optimizer.step()
    module.eval()
    path = tmp_path / "term.ckpt"
    torch.save({"hparams": dict(module.hparams), "state_dict": module.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    loaded = DistillationModule(**saved["hparams"])
    loaded.load_state_dict(saved["state_dict"], strict=True)
    loaded.eval()
    with torch.no_grad():
        before, after = _losses(module, batch), _losses(loaded, batch)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize("cls", TERMS, ids=_id)
def test_teachers_get_no_gradient_and_the_student_and_term_do(cls, weights):
    _exempt(cls, "gradients")
    module, batch = _module(cls, weights, ce_weight=0.0), _batch()
    _prepare(module, batch)
    module.train()
    assert not any(m.training for m in module.teachers.modules())  # frozen in train mode too
    total, parts, _ = module.compute_losses(batch)
    assert parts and torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in module.teachers.parameters())
    assert not any(p.requires_grad for p in module.teachers.parameters())
    grads = [p.grad for p in module.student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "the student learns nothing"
    missing = [
        n for n, p in module.terms[0].named_parameters() if p.requires_grad and p.grad is None
    ]
    assert not missing, f"{cls.__name__} parameters without gradient: {missing}"


def _scaled(out: ModelOutput, scale: float, dtype: torch.dtype, leaf: bool) -> ModelOutput:
    """``out`` with every tensor scaled to max |value| = ``scale`` (logits: a +/- pattern) in
    ``dtype``; ``leaf``: detached copies that require grad."""

    def big(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        y = (x.detach().float() / x.detach().abs().amax().clamp_min(1e-12) * scale).to(dtype)
        return y.requires_grad_(True) if leaf else y

    return ModelOutput(
        logits=big(out.logits),
        pooled=big(out.pooled),
        stages={k: big(v) for k, v in out.stages.items()},
        prefix_tokens={k: big(v) for k, v in out.prefix_tokens.items()},
    )


def _extreme_logits(out: ModelOutput, sign: float) -> ModelOutput:
    """``out`` with logits of +/-1e4: class 0 gets ``sign * 1e4``, the others the opposite."""
    logits = torch.full_like(out.logits.detach().float(), -sign * 1e4)
    logits[:, 0] = sign * 1e4
    return replace(_scaled(out, 1.0, torch.float32, True), logits=logits.requires_grad_(True))


@pytest.mark.parametrize("case", ["extreme_logits", "fp16_range"])
@pytest.mark.parametrize("cls", TERMS, ids=_id)
def test_loss_and_gradients_are_finite_at_extreme_inputs(cls, case, weights):
    _exempt(cls, case)
    module, batch = _module(cls, weights), _batch()
    _prepare(module, batch)
    module.train()
    term = module.terms[0]
    with torch.no_grad():
        student, teachers = _outputs(module, batch)
    teachers = term.own(teachers)
    if case == "extreme_logits":  # student sure of class 0, teachers sure it is not
        student = _extreme_logits(student, 1.0)
        teachers = [replace(t, logits=_extreme_logits(t, -1.0).logits.detach()) for t in teachers]
    else:  # near the float16 maximum (65504); teachers in float16, as from a half teacher
        student = _scaled(student, 6e4, torch.float32, True)
        teachers = [_scaled(t, 6e4, torch.float16, False) for t in teachers]
    out = as_term_output(term, term(student, teachers, batch["target"]))
    total = sum(out.losses.values())
    assert torch.isfinite(total), {k: v.item() for k, v in out.losses.items()}
    total.backward()
    leaves = [student.logits, student.pooled, *student.stages.values()]
    leaves += list(student.prefix_tokens.values())
    for x in [*leaves, *term.parameters()]:
        if x is not None and x.grad is not None:
            assert torch.isfinite(x.grad).all(), f"{cls.__name__}: non-finite gradient ({case})"
    if out.teacher_weights is not None:
        assert torch.isfinite(out.teacher_weights).all()


@pytest.mark.parametrize("cls", TERMS, ids=_id)
def test_documented_zero_case_is_zero(cls, weights):
    if not cls.zero_parts:
        assert cls.contract_exempt.get("zero_case"), (
            f"{cls.__name__} declares no zero case: set zero_parts (the losses that are 0 when "
            "every teacher is the student itself), or say why in contract_exempt['zero_case']"
        )
        _exempt(cls, "zero_case")
    module, batch = _module(cls, weights, mirror=True), _batch()
    _prepare(module, batch)
    module.eval()
    with torch.no_grad():
        student, teachers = _outputs(module, batch)
        for t in teachers:  # the mirror: every teacher output is the student's
            assert torch.equal(t.logits, student.logits)
        term = module.terms[0]
        torch.manual_seed(1)
        out = as_term_output(term, term(student, term.own(teachers), batch["target"]))
    for key in cls.zero_parts:
        assert key in out.losses, f"{cls.__name__}.zero_parts names {key!r}, not a loss"
        # float32 rounding, scaled by the term's factors (DKD: beta * T^2 = 128) and by the
        # thread count's summation order: 1e-5 failed DKD at 1 thread (1.2e-5).
        assert out.losses[key].abs().item() < 1e-4, (key, out.losses[key].item())
