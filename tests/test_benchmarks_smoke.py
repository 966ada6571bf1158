"""benchmarks/image_folder_path.py and benchmarks/image_folder_kd.py in their smoke mode:
every measurement runs on a real (tiny) PNG folder, and the JSON holds what the full runs
report, never in benchmarks/results/."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _script(name: str, monkeypatch):
    """Load ``benchmarks/<name>.py`` (the scripts import their neighbours by name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_image_folder_path_smoke_measures_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the cwd would show up here
    bench = _script("image_folder_path", monkeypatch)
    out, chart = tmp_path / "r.json", tmp_path / "c.png"
    argv = ["--smoke", "--folder", str(tmp_path / "f"), "--out", str(out), "--chart", str(chart)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    config = report["config"]

    assert report["smoke"] is True and report["command"].endswith(" ".join(argv))
    assert len(report["machine_start"]["load_avg"]) == len(report["machine_end"]["load_avg"]) == 3
    assert report["machine_start"]["torch_threads"] >= 1
    rounds = report["rounds"]
    assert len(rounds) == config["rounds"] == 2
    for r in rounds:
        assert set(r) == {*bench.MEASUREMENTS, bench.SERIAL}
        assert all(_positive(m["images_per_s"]) for m in r.values())
        for fit in bench.FITS:  # every timed step of every fit counted
            assert _positive(r[fit]["cpu_ms_per_step"]) and _positive(r[fit]["ms_per_step"])
    ratios = report["summary"]["ratios"]
    assert set(ratios) == set(bench.RATIOS)
    # The ratios are the per-round ratios of the measured images/s.
    paired = [r["student_only"]["images_per_s"] / r["cached"]["images_per_s"] for r in rounds]
    assert ratios["cached_step_vs_student_only"]["per_round"]["median"] == pytest.approx(
        sorted(paired)[0] / 2 + sorted(paired)[1] / 2
    )
    assert all(_positive(v["per_round"]["median"]) for v in ratios.values())
    targets = report["summary"]["targets"]
    assert set(targets) == set(bench.TARGETS)
    assert all(isinstance(t["met"], bool) for t in targets.values())

    caches = report["caches"]
    # 3 teachers x top-10 fp16 log-probabilities + classes + rest + index: ~140 bytes; the
    # features (pooled + a stage map per teacher, fp16) are far more.
    assert 100 < caches["logits"]["bytes_per_image_epoch"] < 200
    assert (
        caches["features"]["bytes_per_image_epoch"] > 10 * caches["logits"]["bytes_per_image_epoch"]
    )
    assert caches["logits"]["feature_shapes"] == {}
    assert len(caches["features"]["feature_shapes"]) == 6  # pooled + one stage, 3 teachers
    assert _positive(report["png_bytes_per_image"])
    fkd = report["fkd"]
    assert fkd["fkd_epoch_over_vanilla"] == pytest.approx(486.8 / 579.4, abs=1e-4)
    assert (
        fkd["ours_cached_over_student_only"]
        == ratios["cached_step_vs_student_only"]["per_round"]["median"]
    )
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "f", "r.json"]


def test_image_folder_kd_smoke_runs_every_variant_and_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = _script("image_folder_kd", monkeypatch)
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--folder", str(tmp_path / "f"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    assert report["smoke"] is True and report["config"]["seeds"] == [0, 1]
    assert set(report["runs"]) == {"0", "1"}
    assert set(report["teachers_top1"]) == {*bench.TEACHERS, "ensemble (mean probability)"}
    # The zoo teachers know these images: well above chance even on 24 test images.
    assert report["teachers_top1"]["zoo:fmnist_resnet10t"] > 50
    for seed, runs in report["runs"].items():
        assert set(runs) == set(bench.VARIANTS)
        for run in runs.values():
            assert 0 <= run["top1"] <= 100 and _positive(run["fit_s"]) and _positive(run["test_s"])
            assert run["train_steps"] == 4  # 32 images, batch 8, 1 epoch
        assert _positive(runs["cached"]["build_s"]) and runs["cached"]["cache_bytes"] > 0
        assert "build_s" not in runs["live"]
        # The exact cache: the cached fit trains on the live teachers' targets (fp16-rounded).
        # The loss parts are logged on the first step (then every log_every_n_steps): same
        # student, same batch, so the KD losses agree to fp16 rounding; no KD has none.
        live, cached = runs["live"]["last_train_metrics"], runs["cached"]["last_train_metrics"]
        assert cached["train/kd"] == pytest.approx(live["train/kd"], rel=1e-3)
        assert "train/kd" not in runs["no_kd"]["last_train_metrics"]
        per_seed = report["summary"]["per_seed"][seed]
        assert per_seed["cached_minus_live_top1"] == pytest.approx(
            runs["cached"]["top1"] - runs["live"]["top1"]
        )
        assert per_seed["build_plus_cached_fit_over_live_fit"] == pytest.approx(
            (runs["cached"]["build_s"] + runs["cached"]["fit_s"]) / runs["live"]["fit_s"]
        )
    table = report["markdown"]
    assert "| KD, exact teacher cache |" in table and "| cached − live (points) |" in table
    assert table.count("\n| 0 |") == table.count("\n| 1 |") == 1  # a wall-time row per seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "r.json"]


@pytest.mark.parametrize("name", ["image_folder_path", "image_folder_kd"])
def test_smoke_results_never_go_to_the_results_folder(name, monkeypatch):
    args = _script(name, monkeypatch).parse_args(["--smoke"])
    assert RESULTS not in Path(args.out).parents and not str(args.folder).startswith(str(ROOT))
    full = _script(name, monkeypatch).parse_args([])
    assert Path(full.out).parent == RESULTS


def test_the_folder_is_written_once_and_reused(tmp_path, monkeypatch):
    common = _script("image_folder_common", monkeypatch)
    folder, seconds = common.prepare_folder(tmp_path, 24, 20)
    assert seconds > 0 and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    assert sorted(p.name for p in (folder / "val").iterdir()) == [str(c) for c in range(10)]
    assert len(list((folder / "train").rglob("*.png"))) == 24
    assert common.prepare_folder(tmp_path, 24, 20) == (folder, 0.0)
    # 10 test images miss classes: ImageFolder would renumber the rest, so it is refused.
    with pytest.raises(ValueError, match="not all 10: write more images"):
        common.prepare_folder(tmp_path, 24, 10)
    assert not (tmp_path / "fashion_mnist_64px_24_10").exists()
