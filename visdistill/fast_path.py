"""GPU speed-ups of a fit that change no result a checkpoint or export records.

``channels_last`` memory format lets cuDNN pick the faster NHWC convolution kernels on
tensor cores; ``torch.compile`` compiles the student and each teacher in place
(``nn.Module.compile``), so state-dict keys keep their names (no ``_orig_mod.`` prefix).
Teacher bf16 autocast lives with the teachers' outputs
(:func:`visdistill.teacher_source.teacher_autocast`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def apply_fast_path(
    module: nn.Module,
    device: torch.device,
    student: nn.Module,
    teachers: Any,
    channels_last: bool = True,
    compile: bool | dict[str, Any] = False,
) -> None:
    """Put ``module`` (student, teachers, terms) in ``channels_last`` when ``device`` is CUDA,
    and ``torch.compile`` the ``student`` and each of ``teachers`` (an iterable of modules,
    or ``None``) in place when ``compile`` is ``True`` or a dict of ``torch.compile``
    kwargs (e.g. ``{"mode": "max-autotune"}``)."""
    if channels_last and device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    if compile:
        kwargs = compile if isinstance(compile, dict) else {}
        student.compile(**kwargs)
        for teacher in teachers or []:
            teacher.compile(**kwargs)
