import pytest
import torch
import torch.nn.functional as F
from conftest import CNN, MLP, VIT

from visdistill import Backbone, ConfigError, InputSpec, UnknownModelError


@pytest.mark.parametrize(
    "cfg, n_stages, last_grid",
    [(CNN, 5, 1), (VIT, 2, 4), (MLP, 8, 2), (dict(name="convnext_atto", num_classes=10), 4, 1)],
    ids=["cnn", "vit", "mlp", "convnext"],
)
def test_stages_are_nchw_and_match_feature_info(cfg, n_stages, last_grid, batch):
    model = Backbone(**cfg)
    # Known before any forward pass, so projectors can be built at construction.
    assert len(model.feature_info) == n_stages
    out = model(batch, stages=(0, -1), pooled=True)
    assert out.logits.shape == (2, 10)
    assert out.pooled.shape == (2, model.num_features)
    assert set(out.stages) == {0, -1}  # only what was asked for
    for idx, feat in out.stages.items():
        info = model.feature_info[idx]
        assert feat.ndim == 4 and feat.shape[1] == info["num_chs"]
        assert feat.shape[-1] == 32 // info["reduction"]
    assert out.stages[-1].shape[-1] == last_grid


def test_plain_forward_computes_no_features(batch):
    out = Backbone(**CNN)(batch)
    assert out.stages == {} and out.pooled is None


def test_stage_logits_equal_plain_logits(batch):
    model = Backbone(**VIT).eval()
    assert torch.allclose(model(batch).logits, model(batch, stages=(1,)).logits, atol=1e-5)


def test_vit_prefix_tokens_on_request(batch):
    out = Backbone(**VIT)(batch, stages=(1,), prefix_tokens=True)
    assert out.prefix_tokens[1].shape == (2, 1, 192)
    assert out.stages[1].shape == (2, 192, 4, 4)


def test_input_spec_defaults_follow_the_model():
    vit = Backbone(**VIT)
    assert vit.input_spec.size == (32, 32)  # fixed img_size of the ViT
    assert vit.input_spec.mean == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg
    cnn = Backbone(**CNN)
    assert cnn.input_spec.size is None  # convolutional: runs at the data's size
    assert cnn.input_spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_preprocess_resizes_and_normalises():
    model = Backbone(**CNN, input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 32, 32)
    expected = (
        F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True) - 0.5
    ) / 0.25
    spec = InputSpec(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic")
    assert torch.allclose(spec.apply(x), expected)
    assert model.preprocess(x).shape == (2, 3, 16, 16)


def test_grayscale_model_averages_channels():
    model = Backbone(name="resnet10t", num_classes=10, in_chans=1)
    x = torch.rand(2, 3, 32, 32)
    y = model.preprocess(x)
    assert y.shape == (2, 1, 32, 32)
    spec = model.input_spec
    assert torch.allclose(y, (x.mean(1, keepdim=True) - spec.mean[0]) / spec.std[0])
    assert model(x).logits.shape == (2, 10)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(UnknownModelError, match="resnet18") as e:
        Backbone("resnet181")
    assert "Did you mean" in str(e.value)


def test_bad_stage_lists_available_stages():
    with pytest.raises(ConfigError, match=r"available stages: 0: act1"):
        Backbone(**CNN).check_stages((7,))


def test_rejected_model_kwargs_are_explained():
    with pytest.raises(ConfigError, match="model_kwargs"):
        Backbone("mixer_s16_224", model_kwargs=dict(patch_size=4))


def test_bad_input_spec():
    with pytest.raises(ConfigError, match="std must be positive"):
        InputSpec(std=(0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="3 values"):
        InputSpec(mean=(0.5,))


# One tiny configuration per family with a fixed input size (timm's named variants fix some
# kwargs, so the MLP families keep theirs): (name, model_kwargs, the size they must run at).
FIXED_SIZE_FAMILIES = [
    ("vit_tiny_patch16_224", dict(depth=1), 224),
    ("eva02_tiny_patch14_224", dict(depth=1), 224),
    ("beit_base_patch16_224", dict(depth=1, embed_dim=64, num_heads=2), 224),
    ("mixer_s16_224", {}, 224),  # stem.img_size
    ("resmlp_12_224", {}, 224),  # stem.img_size
    ("gmlp_ti16_224", {}, 224),  # stem.img_size
    ("levit_128s", dict(depth=(1, 1, 1)), 224),  # pretrained_cfg only
    ("swin_tiny_patch4_window7_224", dict(depths=(1,) * 4, embed_dim=24, num_heads=(1,) * 4), 224),
    ("cait_xxs24_224", dict(depth=1, depth_token_only=1), 224),
    ("pit_ti_224", dict(depth=(1, 1, 1)), 224),
    ("tnt_s_patch16_224", dict(depth=1), 224),
    ("coat_lite_tiny", dict(serial_depths=(1,) * 4), 224),
    ("convit_tiny", dict(depth=1, local_up_to_layer=1), 224),
    ("efficientformer_l1", dict(depths=(1,) * 4), 224),
    ("maxvit_tiny_tf_224", dict(depths=(1,) * 4, embed_dim=(32,) * 4), 224),  # model.img_size
    ("crossvit_tiny_240", dict(depth=((1, 1, 0),)), 240),
    ("hiera_tiny_224", dict(stages=(1,) * 4), 224),
    ("test_vit3", {}, 160),
]


def test_every_fixed_size_family_runs_on_32px_data_as_student_and_teacher():
    # Before: only patch_embed was looked at; MLP-Mixer, ResMLP, gMLP (stem), LeViT, MaxViT,
    # CrossViT, TNT, CoaT, EfficientFormer and Hiera ran at 32 px and crashed inside timm.
    from visdistill import KD, DistillationModule, ModelConfig

    batch = {"image": torch.rand(2, 3, 32, 32), "target": torch.tensor([0, 1])}
    for name, kwargs, side in FIXED_SIZE_FAMILIES:
        cfg = ModelConfig(name=name, num_classes=10, model_kwargs=kwargs)
        module = DistillationModule(student=cfg, teachers=[cfg], terms=[KD()])
        assert module.student.input_spec.size == (side, side), name
        assert module.teachers[0].input_spec.size == (side, side), name
        total, parts, out = module.compute_losses(batch)
        total.backward()
        assert out.logits.shape == (2, 10) and torch.isfinite(total), name


def test_fixed_size_follows_img_size_kwargs_and_dynamic_sizes_stay_free():
    assert Backbone(**MLP).input_spec.size == (32, 32)  # stem built at 32
    levit = Backbone("levit_128s", num_classes=10, model_kwargs=dict(img_size=64, depth=(1, 1, 1)))
    assert levit.input_spec.size == (64, 64)  # no img_size attribute: the kwarg
    assert levit(torch.rand(2, 3, 32, 32)).logits.shape == (2, 10)
    dynamic = Backbone(**{**VIT, "model_kwargs": dict(VIT["model_kwargs"], dynamic_img_size=True)})
    assert dynamic.input_spec.size is None
    assert Backbone(**CNN).input_spec.size is None
    assert Backbone("test_vit", num_classes=10).input_spec.size is None  # strict_img_size=False


def test_export_records_a_fixed_size_without_patch_embed(tmp_path):
    # Before: config.json said fixed_input_size false for MLP-Mixer (it has a stem, no patch_embed).
    import json

    import lightning as L

    from visdistill import DigitsDataModule, DistillationModule, ModelConfig, export_student

    module = DistillationModule(student=ModelConfig(**MLP))
    trainer = L.Trainer(
        fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = export_student(tmp_path / "m.ckpt", tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["fixed_input_size"] is True and cfg["input_size"] == [3, 32, 32]


def test_backbone_takes_a_model_config_or_its_fields_and_names_a_misspelt_one():
    from visdistill.errors import ConfigError
    from visdistill.models import ModelConfig

    fields = dict(num_classes=3, input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    by_fields = Backbone("resnet10t", **fields)
    torch.manual_seed(0)
    by_config = Backbone(ModelConfig(name="resnet10t", **fields))
    assert by_fields.config == by_config.config
    assert by_fields.input_spec == by_config.input_spec
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(by_fields.eval()(x).logits, by_config.eval()(x).logits)
    # Keywords override a config's values.
    assert Backbone(by_config.config, num_classes=5).num_classes == 5
    with pytest.raises(ConfigError, match=r"'num_clases' \(did you mean num_classes\?\)"):
        Backbone("resnet10t", num_clases=3)


def test_stage_norm_applies_the_final_norm_to_stage_features(batch):
    from visdistill.teachers import teacher_fingerprint

    torch.manual_seed(0)
    raw = Backbone(**VIT)
    normed = Backbone(**VIT, stage_norm=True)
    normed.load_state_dict(raw.state_dict())
    with torch.no_grad():
        # give the norm a visible effect (timm initialises it to the identity affine)
        for m in (raw, normed):
            m.model.norm.weight.fill_(2.0)
            m.model.norm.bias.fill_(0.5)
        a, b = raw(batch, stages=[0, -1]), normed(batch, stages=[0, -1])
    for s in (0, -1):
        expected = raw.model.norm(a.stages[s].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(b.stages[s], expected)
        assert not torch.allclose(a.stages[s], b.stages[s])
    torch.testing.assert_close(a.logits, b.logits)  # the head's input is normed either way
    # other features, another fingerprint (caches keyed on it are not reused)
    assert teacher_fingerprint([raw]) != teacher_fingerprint([normed])
