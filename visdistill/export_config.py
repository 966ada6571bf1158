"""Reading the ``config.json`` that ``visdistill export`` writes beside ``model.safetensors``
(timm's own layout: ``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError


def read_export_config(folder: str | os.PathLike, fix: str) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict (``num_classes`` an int), ``None`` when there is no
    such file. A file that is not a timm config is a :class:`ConfigError` ending in ``fix``
    (what the caller's user can do instead)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise TypeError(f"expected a JSON object, got {type(config).__name__}")
        if "num_classes" in config:
            config["num_classes"] = int(config["num_classes"])
        if not isinstance(config.get("architecture", ""), str):
            raise TypeError("architecture is not a string")
        if not isinstance(config.get("model_args", {}), dict):
            raise TypeError("model_args is not an object")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a usable timm config ({e}); {fix}") from e
    return config
