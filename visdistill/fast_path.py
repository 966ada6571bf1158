"""Speed-ups of a fit that change no result a checkpoint or export records (beyond float
rounding).

``channels_last`` memory format lets cuDNN pick the faster NHWC convolution kernels on
tensor cores, and oneDNN the faster ones on CPU (teachers 1.2-1.6x in eval on 2 cores,
measured on the zoo's models; depthwise-heavy networks gain most); ``torch.compile``
compiles the student and each teacher in place (``nn.Module.compile``), so state-dict keys
keep their names (no ``_orig_mod.`` prefix). Teacher bf16 autocast lives with the teachers'
outputs (:func:`visdistill.teacher_source.teacher_autocast`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def use_channels_last(module: nn.Module, device: torch.device, channels_last: bool = True) -> None:
    """Put ``module``'s parameters and buffers in ``channels_last`` when ``channels_last`` is
    on and ``device`` is CUDA or CPU.

    Call it before DDP wraps the model (a fit does it in ``setup``): DDP's gradient buckets
    keep the layout the parameters had when it was built, and converting afterwards made
    2-process gradients wrong (weights 1.9e-3 off one process's after 3 SGD steps, against
    6e-8 in either format without DDP)."""
    if channels_last and device.type in ("cuda", "cpu"):
        module.to(memory_format=torch.channels_last)


def compile_models(
    student: nn.Module, teachers: Any, compile: bool | dict[str, Any] = False
) -> None:
    """``torch.compile`` the ``student`` and each of ``teachers`` (an iterable of modules, or
    ``None``) in place when ``compile`` is ``True`` or a dict of ``torch.compile`` kwargs
    (e.g. ``{"mode": "max-autotune"}``)."""
    if compile:
        kwargs = compile if isinstance(compile, dict) else {}
        student.compile(**kwargs)
        for teacher in teachers or []:
            teacher.compile(**kwargs)


def apply_fast_path(
    module: nn.Module,
    device: torch.device,
    student: nn.Module,
    teachers: Any,
    channels_last: bool = True,
    compile: bool | dict[str, Any] = False,
) -> None:
    """Both speed-ups at once, for a model used outside a distributed fit (benchmarks,
    parity checks): :func:`use_channels_last` on ``module``, then :func:`compile_models`."""
    use_channels_last(module, device, channels_last)
    compile_models(student, teachers, compile)


def leave_fast_path(module: nn.Module) -> None:
    """Give ``module``'s parameters and buffers the default memory format back after a fit,
    so the trained model computes exactly what its checkpoint and export compute (the
    NHWC kernels round differently, ~1e-6); a no-op for a model never in ``channels_last``."""
    module.to(memory_format=torch.contiguous_format)
