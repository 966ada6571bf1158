"""Formula tests of the dense distillation losses and the mosaic set (no mmdet needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from visdistill.integrations.mosaic_coco import MosaicSpec, draw_mosaics, tight_crop
from visdistill.losses import kd_loss
from visdistill.losses.detection import (
    anchor_logits,
    binary_kd_loss,
    channel_wise_loss,
    fitnet_loss,
    nd_feature_loss,
    softmax_kd_loss,
)


def test_fitnet_hand_case_and_reductions():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # (1, 2, 1, 2)
    t = torch.zeros_like(s)
    assert fitnet_loss(s, t).item() == pytest.approx((1 + 4 + 0 + 1) / 4)
    assert fitnet_loss(s, t, "sum").item() == pytest.approx(6.0)
    two = torch.cat([s, 2 * s])
    assert fitnet_loss(two, torch.zeros_like(two), "none").tolist() == pytest.approx([1.5, 6.0])


def test_fitnet_gradient_does_not_reach_teacher():
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    fitnet_loss(s, t).backward()
    assert t.grad is None
    assert torch.allclose(s.grad, 2 * (s - t).detach() / s.numel())


def test_channel_wise_hand_case():
    # one channel, two positions, T = 1: p = (3/4, 1/4), q = (1/2, 1/2)
    t = torch.tensor([math.log(3.0), 0.0]).reshape(1, 1, 1, 2)
    s = torch.zeros(1, 1, 1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert channel_wise_loss(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2 divides the logits by 2 and multiplies the KL by 4
    p = np.array([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    expected_t2 = 4 * float((p * np.log(p / 0.5)).sum())
    assert channel_wise_loss(s, t, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)


def test_channel_wise_matches_numpy_reference_and_properties():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    temp = 3.0

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    ref = np.zeros(2)
    for b in range(2):
        for c in range(3):
            p = softmax(t[b, c].numpy().ravel() / temp)
            q = softmax(s[b, c].numpy().ravel() / temp)
            ref[b] += (p * np.log(p / q)).sum() * temp**2 / 3
    got = channel_wise_loss(s, t, temp, reduction="none")
    assert got.numpy() == pytest.approx(ref, rel=1e-5)
    assert channel_wise_loss(s, t, temp).item() == pytest.approx(ref.mean(), rel=1e-5)
    assert channel_wise_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)
    # a per-channel constant does not change a softmax over positions
    shift = torch.randn(2, 3, 1, 1, generator=g)
    assert channel_wise_loss(s + shift, t, temp).item() == pytest.approx(
        channel_wise_loss(s, t, temp).item(), rel=1e-5
    )


def test_nd_feature_hand_cases():
    t = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    assert nd_feature_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # longer than the teacher is not penalised
    assert nd_feature_loss(2 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert nd_feature_loss(0.5 * t, t).item() == pytest.approx(0.5, abs=1e-6)  # half the norm
    assert nd_feature_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)
    # orthogonal at every position: channels 0 vs 1
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a[:, 0], b[:, 1] = 1.0, 3.0
    assert nd_feature_loss(a, b).item() == pytest.approx(1.0)
    per_image = nd_feature_loss(torch.cat([t[:1], 0.5 * t[1:]]), t, reduction="none")
    assert per_image.tolist() == pytest.approx([0.0, 0.5], abs=1e-6)


def test_nd_feature_is_nd_loss_per_position():
    from visdistill.losses import nd_loss

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    rows_s, rows_t = s[0].flatten(1).T, t[0].flatten(1).T
    per = [
        nd_loss(rows_s[i : i + 1], rows_t[i : i + 1], rows_t[i : i + 1], torch.tensor([0]))
        for i in range(4)
    ]
    assert nd_feature_loss(s, t).item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-6)


def test_shape_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="1x1 conv"):
        fitnet_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same anchors"):
        binary_kd_loss(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="num_classes=4"):
        anchor_logits(torch.zeros(1, 9, 2, 2), 4)


def test_binary_kd_hand_case_and_properties():
    # teacher p = 1/2, student q = 3/4: KL = 1/2 log(2/3) + 1/2 log(2)
    s, t = torch.tensor([[math.log(3.0)]]), torch.tensor([[0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert binary_kd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert binary_kd_loss(b, b).item() == pytest.approx(0.0, abs=1e-6)
    assert (binary_kd_loss(a, b, reduction="none") >= 0).all()
    # summed over classes, averaged over rows; T^2 scaling at T = 2
    p, q = torch.sigmoid(b / 2), torch.sigmoid(a / 2)
    ref = 4 * (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1).mean()
    assert binary_kd_loss(a, b, temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)
    # no NaN for saturated logits
    assert torch.isfinite(binary_kd_loss(torch.full((2, 3), 80.0), torch.full((2, 3), -80.0)))


def test_softmax_kd_is_kd_loss():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert softmax_kd_loss(a, b, 2.0).item() == pytest.approx(
        kd_loss(a, torch.softmax(b / 2.0, -1), 2.0).item(), rel=1e-6
    )


def test_anchor_logits_layout():
    b, a, k, h, w = 2, 3, 4, 2, 5
    x = torch.arange(b * a * k * h * w, dtype=torch.float32).reshape(b, a * k, h, w)
    rows = anchor_logits(x, k)
    assert rows.shape == (b * h * w * a, k)
    # row (bi, hi, wi, ai) holds channels ai*K .. ai*K+K-1 at that position
    bi, hi, wi, ai = 1, 1, 3, 2
    row = rows[((bi * h + hi) * w + wi) * a + ai]
    assert row.tolist() == x[bi, ai * k : (ai + 1) * k, hi, wi].tolist()


def test_mosaic_boxes_are_exact_and_disjoint():
    rng = np.random.default_rng(0)
    items = np.zeros((5, 28, 28), dtype=np.uint8)
    for i in range(5):  # a filled rectangle per item, at a random place in its 28 px frame
        y0, x0 = rng.integers(0, 10, 2)
        items[i, y0 : y0 + 10 + i, x0 : x0 + 8 + i] = 50 + 40 * i
    labels = np.arange(5)
    spec = MosaicSpec(num_images=20, image_size=96, min_items=2, max_items=3, scales=(1, 2))
    canvases, objects = draw_mosaics(items, labels, spec, seed=0)
    for canvas, objs in zip(canvases, objects, strict=True):
        assert 2 <= len(objs) <= 3
        covered = np.zeros_like(canvas, dtype=bool)
        for o in objs:
            x, y, w, h = o["bbox"]
            patch = canvas[y : y + h, x : x + w]
            crop = tight_crop(items[o["item"]])
            scale = h // crop.shape[0]
            assert (patch == crop.repeat(scale, 0).repeat(scale, 1)).all()
            assert not covered[y : y + h, x : x + w].any()  # boxes never overlap
            covered[y : y + h, x : x + w] = True
            assert o["label"] == labels[o["item"]]
        assert not canvas[~covered].any()  # nothing outside the boxes


def test_mosaic_spec_errors():
    with pytest.raises(ValueError, match="larger than"):
        MosaicSpec(image_size=50, scales=(2,)).check()
    with pytest.raises(ValueError, match="min_items"):
        MosaicSpec(min_items=3, max_items=2).check()


def test_mosaic_coco_file(tmp_path):
    from visdistill.integrations.mosaic_coco import write_coco_split

    path = write_coco_split(tmp_path, "val", MosaicSpec(num_images=3, image_size=64, scales=(1,)))
    coco = json.loads(path.read_text())
    assert [c["name"] for c in coco["categories"]][:2] == ["T-shirt/top", "Trouser"]
    assert coco["info"]["source_split"] == "test"
    assert len(coco["images"]) == 3 and all(
        (tmp_path / "val" / im["file_name"]).is_file() for im in coco["images"]
    )
    for ann in coco["annotations"]:
        assert 1 <= ann["category_id"] <= 10 and ann["area"] == ann["bbox"][2] * ann["bbox"][3]


def test_core_never_imports_mmdet():
    import subprocess
    import sys

    code = (
        "import sys, visdistill, visdistill.losses.detection, visdistill.integrations.mosaic_coco\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmcv', 'mmengine'))\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
