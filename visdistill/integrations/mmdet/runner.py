"""mmengine's Runner on an mmdet config: the equivalent of mmdet's ``tools/train.py`` and
``tools/test.py``, which pip's mmdet does not ship (``visdistill mmdet train|test``)."""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError


def load_config(path: str, work_dir: str | None = None, cfg_options: list[str] | None = None):
    """The mmengine ``Config`` of ``path``, with ``KEY=VALUE`` overrides (the syntax of
    mmengine's ``--cfg-options``; ``visdistill mmdet --cfg_options``) and ``work_dir``
    (default: the config's, else ``work_dirs/<config name>``)."""
    import argparse

    from mmengine.config import Config, DictAction

    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path} (resolved: {Path(path).resolve()})")
    cfg = Config.fromfile(path)
    if cfg_options:
        # mmengine's own KEY=VALUE parser (nested keys, lists, tuples), as its tools use it.
        parser = argparse.ArgumentParser()
        parser.add_argument("--o", nargs="+", action=DictAction)
        cfg.merge_from_dict(parser.parse_args(["--o", *cfg_options]).o)
    cfg.work_dir = work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(path).stem)
    return cfg


def train(cfg) -> dict:
    """Train with mmengine's Runner; returns the last validation metrics (the student's for a
    ``DistillingDetector``)."""
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    runner.train()
    # the end-of-training validation's metrics, as RuntimeInfoHook logged them ("val/<metric>")
    scalars = runner.message_hub.log_scalars
    metrics = {
        k[4:]: v.current()
        for k, v in scalars.items()
        if k.startswith("val/") and k not in ("val/time", "val/data_time")
    }
    if not metrics and cfg.get("val_cfg"):
        metrics = runner.val()
    return metrics


def test(cfg, checkpoint: str, trusted: bool = False, prefix: str = "") -> dict:
    """Evaluate ``checkpoint`` (loaded weights-only unless ``trusted``) with the config's test set."""
    from mmengine.runner import Runner

    from .checkpoints import load_detector_weights
    from .detector import DistillingDetector

    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    # a distiller config is evaluated on its student, like its validation
    target = model.student if isinstance(model, DistillingDetector) else model
    load_detector_weights(target, checkpoint, trusted=trusted, prefix=prefix)
    return runner.test()
