"""``python -m visdistill.integrations.mmdet {train,test,convert}``: mmengine's Runner on an mmdet config
(the equivalent of mmdet's ``tools/train.py`` / ``tools/test.py``, which pip's mmdet does not ship),
and checkpoint conversion for torch >= 2.6.

    python -m visdistill.integrations.mmdet train configs/mmdet/retinanet_r18_mosaic_distill_cwd.py
    python -m visdistill.integrations.mmdet test CONFIG work_dirs/.../student.safetensors
    python -m visdistill.integrations.mmdet convert work_dirs/x/epoch_12.pth teacher.safetensors --trusted
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...errors import VisdistillError


def _config(path: str, work_dir: str | None, options: list[str] | None):
    from mmengine.config import Config, DictAction

    if not Path(path).is_file():
        raise VisdistillError(f"config file not found: {path}")
    cfg = Config.fromfile(path)
    if options:
        parser = argparse.ArgumentParser()
        parser.add_argument("--o", nargs="+", action=DictAction)
        cfg.merge_from_dict(parser.parse_args(["--o", *options]).o)
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

    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    from .detector import DistillingDetector

    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    # a distiller config is evaluated on its student, like its validation
    target = model.student if isinstance(model, DistillingDetector) else model
    load_detector_weights(target, checkpoint, trusted=trusted, prefix=prefix)
    return runner.test()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m visdistill.integrations.mmdet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config with mmengine's Runner")
    t.add_argument("config")
    t.add_argument("--work-dir")
    t.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    e = sub.add_parser("test", help="evaluate a checkpoint on the config's test set")
    e.add_argument("config")
    e.add_argument("checkpoint")
    e.add_argument("--work-dir")
    e.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    e.add_argument(
        "--trusted", action="store_true", help="unpickle a Runner checkpoint (trusted files only)"
    )
    e.add_argument("--prefix", default="", help="load only keys with this prefix, e.g. 'student.'")
    c = sub.add_parser(
        "convert", help="write a checkpoint's weights as safetensors (loads weights-only)"
    )
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument(
        "--trusted", action="store_true", help="unpickle a Runner checkpoint (trusted files only)"
    )
    c.add_argument(
        "--prefix", default="", help="keep only keys with this prefix, stripped ('student.')"
    )
    a = p.parse_args(argv)
    try:
        if a.command == "convert":
            from .checkpoints import convert_checkpoint

            print(convert_checkpoint(a.src, a.dst, trusted=a.trusted, prefix=a.prefix))
            return 0
        import visdistill.integrations.mmdet  # noqa: F401  (registers the modules)

        cfg = _config(a.config, a.work_dir, a.cfg_options)
        if a.command == "train":
            metrics = train(cfg)
        else:
            metrics = test(cfg, a.checkpoint, trusted=a.trusted, prefix=a.prefix)
        print(json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))
        return 0
    except VisdistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
