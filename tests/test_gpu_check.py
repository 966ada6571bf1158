"""benchmarks/gpu_check.py in its CPU smoke mode: every path it times on a GPU (student only,
live teachers, teacher cache, loss parity) runs, and its JSON has the fields a GPU run
reports."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_a_complete_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the cwd would show up here
    gpu_check = _gpu_check()
    out = tmp_path / "report.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    assert report["smoke"] is True and report["errors"] == {}
    assert report["config"]["image_size"] == 64 and report["config"]["compile"] is False
    assert set(report["variants"]) == {"student_only", "live", "cached"}
    for variant in report["variants"].values():
        assert variant["images_per_s"] > 0 and variant["ms_per_step"] > 0
        assert variant["timed_steps"] == report["config"]["steps"]
        assert variant["channels_last"] is True  # the fast path's NHWC, on CPU too
    ratios = report["step_time_vs_student_only"]
    assert ratios["student_only"] == pytest.approx(1.0)
    assert all(r > 0 and math.isfinite(r) for r in ratios.values())
    assert report["cache_build"]["images_per_s"] > 0
    assert report["loader"]["images_per_s"] > 0

    parity = report["loss_parity"]
    assert parity["batches"] == report["config"]["parity_batches"]
    for key in ("fast_vs_fp32", "cached_vs_live_fp32"):
        row = parity[key]
        assert math.isfinite(row["max_abs_total"]) and math.isfinite(row["max_rel_total"])
        assert set(row["by_part"]) == {"total", "ce", "kd"}
        assert all(math.isfinite(v) for part in row["by_part"].values() for v in part.values())
        assert all(math.isfinite(t) and t > 0 for t in row["reference_total"])
    # bf16 teachers move the loss a little, not a lot; with top_k >= classes the cache is
    # exact up to its fp16 storage.
    assert parity["fast_vs_fp32"]["max_rel_total"] < 0.05
    assert parity["cached_vs_live_fp32"]["max_rel_total"] < 1e-3

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_smoke_results_never_go_to_the_results_folder():
    args = _gpu_check().parse_args(["--smoke"])
    assert Path(args.out).parent != ROOT / "benchmarks" / "results"
    assert args.device == "cpu" and args.image_size == 64
