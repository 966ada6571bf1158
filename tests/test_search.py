"""Student search: spaces, constraints, exhaustive ranking, regularised evolution, and
`visdistill search` end to end on digits."""

import json
import random
import re

import pytest
import timm
import torch
import yaml

from visdistill import ConfigError, UnknownModelError
from visdistill.commands import main
from visdistill.search import (
    Candidate,
    CandidateError,
    Constraints,
    Cost,
    Evaluated,
    GeneSpace,
    MobileNetV3Space,
    ModelListSpace,
    RegularizedEvolution,
    ResNetSpace,
    measure_cost,
    parse_space,
    search,
    select_parent,
)
from visdistill.search import evolution as evolution_module
from visdistill.search.spaces import parse_count


class Grid(GeneSpace):
    """Toy space: three genes in 0..n-1 (n^3 candidates); nothing is ever built."""

    def __init__(self, n: int = 10) -> None:
        self.genes = {g: tuple(range(n)) for g in "xyz"}
        self._check_genes()

    def decode(self, genome):
        return Candidate.of("toy", x=genome[0], y=genome[1], z=genome[2])


OPTIMUM = {"x": 7, "y": 3, "z": 5}


def known_score(c: Candidate) -> float:
    """Known landscape: best at (7, 3, 5) with score 0."""
    k = c.model_kwargs
    return -float(sum((k[g] - OPTIMUM[g]) ** 2 for g in "xyz"))


def toy_cost(c: Candidate, flops: bool = False, latency: bool = False) -> Cost:
    k = c.model_kwargs
    return Cost(params=100 + 10 * k["x"] + k["y"], flops=500 + 1000 * k["z"] if flops else None)


# ------------------------------------------------------------------------------ search
def test_exhaustive_ranking_finds_the_known_best_in_order():
    result = search(Grid(4), known_score, budget=64)
    assert result.method == "exhaustive" and len(result.history) == 64
    scores = [e.score for e in result.ranking]
    assert scores == sorted(scores, reverse=True)
    assert result.best.candidate.model_kwargs == {"x": 3, "y": 3, "z": 3}


def test_evolution_finds_the_known_best_with_a_fraction_of_the_space():
    """1,000 candidates, 150 evaluations: found on every one of 5 seeds."""
    for seed in range(5):
        evo = RegularizedEvolution(
            Grid(), known_score, population=20, sample=8, parent_top_k=3, seed=seed
        )
        result = evo.run(150)
        assert len(result.history) == 150
        assert result.best.candidate.model_kwargs == OPTIMUM, seed


def test_parent_selection_keeps_the_best_not_the_worst():
    """The NB201 script sorted the tournament ascending and bred from the worst 5."""
    sample = [Evaluated(Candidate.of("toy", i=i), float(i), order=i) for i in range(8)]
    rng = random.Random(0)
    assert {select_parent(sample, 1, rng).score for _ in range(20)} == {7.0}
    assert {select_parent(sample, 3, rng).score for _ in range(200)} == {5.0, 6.0, 7.0}


def test_worst_parent_selection_would_fail_where_ours_succeeds(monkeypatch):
    def run(seed):
        evo = RegularizedEvolution(Grid(), known_score, population=20, parent_top_k=3, seed=seed)
        return evo.run(150).best.score

    ours = [run(s) for s in range(3)]
    monkeypatch.setattr(
        evolution_module,
        "select_parent",
        lambda sample, k, rng: rng.choice(sorted(sample, key=lambda e: e.score)[:k]),
    )
    buggy = [run(s) for s in range(3)]
    assert ours == [0.0, 0.0, 0.0]
    assert max(buggy) < 0


def test_same_seed_same_result_other_seed_other_path():
    def history(seed):
        result = search(Grid(), known_score, budget=40, seed=seed)
        return [e.candidate for e in result.history]

    assert history(1) == history(1)
    assert history(1) != history(2)


def test_constraints_filter_candidates_and_impossible_ones_name_the_smallest():
    space = Grid(4)
    cons = Constraints(max_params=110)  # params = 100 + 10 x + y: x = 0 and y <= 3, or x=1 y=0
    result = search(space, known_score, budget=64, constraints=cons, cost_fn=toy_cost)
    feasible = {
        (e.candidate.model_kwargs["x"], e.candidate.model_kwargs["y"]) for e in result.ranking
    }
    assert feasible == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)}
    assert result.rejected == 64 - 20
    # Evolution over the same space respects them too.
    evo = search(space, known_score, budget=10, constraints=cons, cost_fn=toy_cost, seed=0)
    assert evo.method == "evolution"
    assert all(toy_cost(e.candidate).params <= 110 for e in evo.history)
    # Impossible: below the smallest candidate, for both methods.
    for budget in (64, 10):
        with pytest.raises(
            ConfigError, match=r"smallest candidate by params is toy\[x=0 y=0 z=0\] with 100 params"
        ):
            search(space, known_score, budget, Constraints(max_params=50), toy_cost)
    with pytest.raises(ConfigError, match=r"by FLOPs is toy\[x=0 y=0 z=0\] with 500 FLOPs") as e:
        search(space, known_score, 64, Constraints(max_params=500, max_flops=100), toy_cost)
    assert "max params 500, max FLOPs 100" in str(e.value) and "by params" not in str(e.value)


def test_candidates_that_cannot_run_are_skipped_with_a_warning():
    def score(c):
        if c.model_kwargs == {"x": 3, "y": 3, "z": 3}:  # the best of Grid(4): score -20
            raise CandidateError("cannot build or run it (AssertionError: input size)")
        return known_score(c)

    with pytest.warns(UserWarning, match=r"skipping toy\[x=3 y=3 z=3\]: cannot build"):
        result = search(Grid(4), score, budget=64)
    assert len(result.history) == 63 and result.best.score == -21.0  # (3, 2, 3)
    assert list(result.failed) == ["toy[x=3 y=3 z=3]"]
    with pytest.raises(ConfigError, match="no candidate of .* could be scored"):
        search(Grid(1), lambda c: score(Candidate.of("toy", x=3, y=3, z=3)), budget=1)


def test_bad_search_arguments():
    with pytest.raises(ConfigError, match="budget"):
        search(Grid(2), known_score, budget=0)
    with pytest.raises(ConfigError, match="method"):
        search(Grid(2), known_score, method="random")


# ------------------------------------------------------------------------------ spaces
def test_model_list_space_globs_names_and_errors():
    space = ModelListSpace("mobilenetv3_small_0*, resnet10t")
    labels = [c.label for c in space.candidates()]
    assert labels[:2] == ["mobilenetv3_small_050", "mobilenetv3_small_075"]
    assert labels[-1] == "resnet10t"
    with pytest.raises(UnknownModelError, match="Did you mean: resnet10t"):
        ModelListSpace("resnet_10t")
    with pytest.raises(ConfigError, match="matches no timm model"):
        ModelListSpace("nosuchnet_*")
    with pytest.raises(ConfigError, match="zoo entries are trained models"):
        ModelListSpace("zoo:fmnist_resnet10t")
    with pytest.raises(ConfigError, match="unknown search family 'resnt'.*family:resnet"):
        parse_space("family:resnt")


def test_resnet_space_builds_and_meta_costs_match_the_real_model():
    space = ResNetSpace(depths=(1, 2), widths=(0.25, 1.0))
    assert len(space) == 32 and len(space.candidates()) == 32
    small = space.smallest()
    assert small.model_kwargs == {
        "channels": [16, 32, 64, 128],
        "layers": [1, 1, 1, 1],
        "stem_width": 8,
    }
    model = small.build(10)
    cost = measure_cost(small, 10, 32, flops=True, latency=True, latency_runs=2)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.flops > 0 and cost.latency_ms > 0
    rng = random.Random(0)
    child = space.mutate(small, rng)
    diff = [a != b for a, b in zip(space.genome(small), space.genome(child), strict=True)]
    assert sum(diff) == 1
    with pytest.raises(ConfigError, match="4 stages"):
        ResNetSpace(channels=(16, 32, 64))


def test_mobilenetv3_space_depth_multiplier_changes_the_model():
    space = MobileNetV3Space(variants=("mobilenetv3_small_050",), depth_multipliers=(0.5, 1.0))
    half, full = space.candidates()
    assert half.model_kwargs == {"depth_multiplier": 0.5} and full.model_kwargs == {}
    assert measure_cost(half, 10, flops=False).params < measure_cost(full, 10, flops=False).params
    with pytest.raises(ConfigError, match="must be MobileNetV3"):
        MobileNetV3Space(variants=("resnet10t",))


def test_parse_count():
    assert parse_count("2.5M") == 2_500_000 and parse_count("300k") == 300_000
    assert parse_count("1G") == 10**9 and parse_count("1234") == 1234 and parse_count(None) is None
    with pytest.raises(ConfigError, match="not a count"):
        parse_count("lots")


# --------------------------------------------------------------------------------- CLI
TINY_SPACE = json.dumps({"depths": [1], "widths": [0.25, 0.5], "channels": [32, 32, 64, 64]})


def test_search_cli_end_to_end_on_digits(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "search", "--teacher", "zoo:fmnist_resnet10t", "--space", "family:resnet",
        "--space-args", TINY_SPACE, "--data", "digits", "--batch-size", "32",
        "--budget", "4", "--seed", "0", "--no-progress", "--epochs", "1",
    ]  # fmt: skip
    main(args + ["--out", "best.yaml", "--results", "r.json"])
    out = capsys.readouterr().out
    assert "DisWOT ranking (exhaustive, 2 scored)" in out and "best student: resnet10t[" in out
    results = json.loads((tmp_path / "r.json").read_text())
    ranking = results["ranking"]
    assert len(ranking) == 2 and ranking[0]["score"] >= ranking[1]["score"]
    assert ranking[0]["score"] == pytest.approx(ranking[0]["semantic"] + ranking[0]["relation"])
    assert results["teacher_init"] == "random" and results["method"] == "exhaustive"
    config = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert config["model"]["student"]["model_kwargs"] == ranking[0]["model_kwargs"]
    assert config["model"]["teachers"] == [{"name": "zoo:fmnist_resnet10t"}]
    assert config["model"]["terms"][0]["class_path"] == "visdistill.KD"
    assert config["data"]["class_path"] == "visdistill.DigitsDataModule"

    # The written config is ready for `visdistill fit`.
    main([
        "fit", "--config", "best.yaml", "--trainer.fast_dev_run=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--test_after_fit=false",
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--teacher", "resnet_10t"], "unknown timm model 'resnet_10t'. Did you mean: resnet10t"),
        (["--teacher", "zoo:fmnist_resnet"], "Did you mean: zoo:fmnist_resnet10t"),
        (["--teacher", "nowhere/model.safetensors"], "teacher nowhere/model.safetensors not found"),
        (
            ["--max-params", "1k"],
            "smallest candidate by params is resnet10t.* with [0-9.]+k params",
        ),
        (["--space", "nosuchnet_*"], "glob 'nosuchnet_\\*' matches no timm model"),
        (["--use", "semantic,colour"], "--use takes a comma list"),
        (["--teacher", "resnet10t", "--teacher-init", "trained"], "needs trained weights"),
    ],
)
def test_search_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    base = {
        "--teacher": "zoo:fmnist_resnet10t",
        "--space": "family:resnet",
        "--space-args": TINY_SPACE,
        "--data": "digits",
        "--batch-size": "16",
        "--out": str(tmp_path / "b.yaml"),
    }
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value
    if base["--space"] != "family:resnet":
        del base["--space-args"]
    args = ["search", "--no-progress"] + [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "b.yaml").exists()


def test_search_cli_with_a_trained_teacher_and_a_timm_name_space(tmp_path, capsys):
    torch.manual_seed(0)
    main([
        "search", "--teacher", "zoo:fmnist_resnet10t", "--teacher-init", "trained",
        "--space", "mobilenetv3_small_050,lcnet_050", "--max-params", "1M", "--data", "digits",
        "--batch-size", "16", "--out", str(tmp_path / "b.yaml"), "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "mobilenetv3_small_050" in out and "lcnet_050" in out
    assert (tmp_path / "b.yaml").is_file()


def test_teacher_from_an_export_folder_and_bad_teacher_paths(tmp_path):
    from safetensors.torch import save_file

    from visdistill.search.run import build_teacher

    kwargs = {"channels": [8, 8, 16, 16], "stem_width": 8}
    model = timm.create_model("resnet10t", num_classes=10, **kwargs)
    folder = tmp_path / "export"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    config = {
        "architecture": "resnet10t",
        "num_classes": 10,
        "model_args": kwargs,
        "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    teacher, entry, trained = build_teacher(str(folder), 10)
    assert trained and entry == {"name": f"local-dir:{folder.resolve()}", "pretrained": True}
    torch.testing.assert_close(teacher.model.state_dict(), model.state_dict())
    assert teacher.input_spec.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="predicts 10 classes, the data 5"):
        build_teacher(str(folder), 5)
    (tmp_path / "run.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="export its student first"):
        build_teacher(str(tmp_path / "run.ckpt"), 10)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="lacks config.json"):
        build_teacher(str(folder), 10)


def test_printed_table_shows_labels_with_brackets_verbatim():
    # Before: rich read "[channels=32,64 depths=1,1]" as markup and printed "resnet10t".
    import io

    from rich.console import Console

    from visdistill.search.evolution import SearchResult
    from visdistill.search.run import print_table

    candidates = [
        Candidate.of("resnet10t", channels=(32, 64), depths=(1, 1)),
        Candidate.of("mobilenetv3_small_050", depth_multiplier=0.5),
        Candidate("my[bold]model"),
    ]
    ranking = [
        Evaluated(c, score=-float(i), cost=Cost(params=10)) for i, c in enumerate(candidates)
    ]
    result = SearchResult(ranking, ranking, "exhaustive", 0.1, "test")
    console = Console(file=io.StringIO(), width=300, color_system=None)
    print_table(result, top=10, console=console)
    out = console.file.getvalue()
    for c in candidates:
        assert c.label in out, (c.label, out)


def test_unwritable_search_outputs_fail_before_any_scoring(tmp_path, capsys, monkeypatch):
    """An --out or --results that cannot be written is refused before the (long) scoring,
    never after it: the ranking is not computed only to be lost."""
    import visdistill.search.run as search_run

    scored = []
    monkeypatch.setattr(search_run, "score_batch", lambda *a: scored.append(1) or 1 / 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for flag in ("--out", "--results"):
        args = ["search", "--no-progress", "--teacher", "resnet10t", "--space", "resnet10t"]
        args += ["--out", str(tmp_path / "b.yaml"), flag, str(blocker / "x.json")]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert f"cannot write the {flag}" in err and str(blocker / "x.json") in err, err
        assert "Traceback" not in err
    assert not scored
