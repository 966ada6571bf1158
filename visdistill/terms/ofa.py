"""OFA-KD: exit branches on student stages that imitate the teachers' logits (Hao et al.,
"One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation", NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from einops import rearrange
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.multi_teacher import teacher_weighted_mean
from ..losses.ofa import ofa_loss
from ..models import Backbone, ModelOutput
from .base import DistillTerm, uniform_or

_BRANCH_KINDS = ("auto", "cnn", "token")


class SepConvDown(nn.Sequential):
    """Depthwise-separable block that halves the resolution: dw3x3/2 -> pw -> BN -> ReLU
    -> dw3x3 -> pw -> BN -> ReLU (OFA's CNN branch unit). ``(B, C, H, W) -> (B, C_out, H/2, W/2)``."""

    def __init__(self, channels: int, out_channels: int) -> None:
        c = channels
        super().__init__(
            nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
            nn.Conv2d(c, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class CNNExit(nn.Module):
    """Stage map ``(B, C, H, W)`` -> logits ``(B, K)``: ``n_down`` SepConv halvings (channels
    doubling, the last one to ``width``), or one 1x1 conv when ``n_down`` is 0; then
    global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, n_down: int, width: int, num_classes: int) -> None:
        super().__init__()
        if n_down == 0:
            self.body = nn.Conv2d(in_channels, width, 1)
        else:
            blocks, c = [], in_channels
            for i in range(n_down):
                out = width if i == n_down - 1 else 2 * c
                blocks.append(SepConvDown(c, out))
                c = out
            self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class PatchMerge(nn.Module):
    """2x2 neighbour gather -> LayerNorm -> Linear (no bias) -> activation.
    ``(B, C, H, W) -> (B, C_out, H/2, W/2)``."""

    def __init__(self, channels: int, out_channels: int, act: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * channels)
        self.proj = nn.Linear(4 * channels, out_channels, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
        x = self.act(self.proj(self.norm(x.permute(0, 2, 3, 1))))
        return x.permute(0, 3, 1, 2)


class TokenExit(nn.Module):
    """Token-grid stage ``(B, C, g, g)`` -> logits ``(B, K)`` for ViT/MLP students: patch
    merging down to ``final_grid`` (the first merger to ``width``), ``n_blocks`` timm
    transformer blocks, mean over tokens, linear classifier.

    Our choices: the read-out is the token mean for every student (the reference takes the
    class token when there is one; stage maps here carry patch tokens only), and a linear
    map to ``width`` stands in for the merger when no merging is needed.
    """

    def __init__(
        self,
        in_channels: int,
        grid: int,
        width: int,
        n_blocks: int,
        num_classes: int,
        final_grid: int = 7,
    ) -> None:
        super().__init__()
        n_merge = max(int(math.floor(math.log2(grid / final_grid))), 0) if grid > 0 else 0
        merges, c = [], in_channels
        for i in range(n_merge):
            merges.append(PatchMerge(c, width, act=not (n_merge > 1 and i == n_merge - 1)))
            c = width
        self.merge = nn.Sequential(*merges)
        self.proj = nn.Linear(c, width) if c != width else nn.Identity()
        heads = 4 if width % 4 == 0 else 1
        self.blocks = nn.Sequential(*[Block(width, num_heads=heads) for _ in range(n_blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = rearrange(self.merge(x), "b c h w -> b (h w) c")
        return self.head(self.blocks(self.proj(tokens)).mean(dim=1))


def _init_exit(module: nn.Module) -> None:
    # The reference's initialisation: Kaiming (fan_out) convs, unit BN, trunc-normal linears.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def is_token_model(student: Backbone) -> bool:
    """Plain ViT / MLP-Mixer: every stage at the same reduction (a token grid)."""
    reductions = {f["reduction"] for f in student.feature_info}
    return len(student.feature_info) > 1 and len(reductions) == 1


def default_exit_stages(student: Backbone) -> tuple[int, ...]:
    """Four stages as in the paper: CNNs the last four stages of stride >= 4; token models
    the blocks at 1/6, 1/3, 5/6 and 1 of the depth (2, 4, 10, 12 of 12)."""
    n = len(student.feature_info)
    if is_token_model(student):
        return tuple(sorted({max(round(f * n) - 1, 0) for f in (1 / 6, 1 / 3, 5 / 6, 1.0)}))
    eligible = [i for i, f in enumerate(student.feature_info) if f["reduction"] >= 4]
    return tuple(eligible[-4:])


class OFA(DistillTerm):
    """OFA-KD: exit branches after student stages, each trained with the OFA loss against the
    teachers' final logits; the student's own logits get the OFA loss too.

    Branches are built from the student's ``feature_info`` at construction: a CNN branch
    (SepConv down-sampling to the last stage's resolution, width ``max(D_s, D_t)``) for
    convolutional students, a token branch (patch merging + transformer blocks of the
    student's width) for ViT/MLP students. Teachers contribute final logits only, so any
    CNN/ViT/MLP pair works. With several teachers the per-teacher losses are averaged with
    the per-sample teacher weights (uniform by default). Branches are training-only: the
    exported student does not contain them.

    No zero case: the OFA loss is a cross-entropy, whose minimum is the target's entropy.

    Returned losses (already scaled by ``branch_weight`` / ``logits_weight``):
    ``stage<i>`` per branch and ``logits`` for the student head.

    Args:
        stages: student stage indices to branch from (default: :func:`default_exit_stages`).
        eps: target-enhancement exponent, one value or ``len(stages) + 1`` values (the last
            for the student's logits). Reference: 1.0 (CIFAR CNN), 1.5 (ImageNet DeiT-T->R18).
        temperature: OFA temperature (reference 1).
        branch_weight: weight of each branch loss (reference 1 on ImageNet, 0.1 on CIFAR).
        logits_weight: weight of the loss on the student's own logits (reference ``kd`` 1).
        branch: ``"auto"`` (from the student's stage strides), ``"cnn"`` or ``"token"``.
        final_grid: token branches merge patches down to this grid side (reference 7).
        weight: multiplier of the whole term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "ofa"
    needs_logits = True
    needs_labels = True
    contract_exempt = {
        "zero_case": "the OFA loss is a cross-entropy against the (enhanced) teacher "
        "distribution, whose minimum is that distribution's entropy, not 0; the exits are "
        "freshly initialised branches"
    }

    def __init__(
        self,
        stages: Sequence[int] | None = None,
        eps: float | Sequence[float] = 1.0,
        temperature: float = 1.0,
        branch_weight: float = 1.0,
        logits_weight: float = 1.0,
        branch: str = "auto",
        final_grid: int = 7,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if branch not in _BRANCH_KINDS:
            raise ConfigError(f"OFA branch must be one of {_BRANCH_KINDS}, got {branch!r}")
        if temperature <= 0:
            raise ConfigError(f"OFA temperature must be > 0, got {temperature}")
        self.requested_stages = tuple(stages) if stages is not None else None
        self.eps_arg = eps
        self.temperature = float(temperature)
        self.branch_weight, self.logits_weight = float(branch_weight), float(logits_weight)
        self.branch, self.final_grid = branch, int(final_grid)
        self.exits = nn.ModuleDict()

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        stages = self.requested_stages or default_exit_stages(student)
        student.check_stages(stages)
        n = len(student.feature_info)
        stages = tuple(sorted({s % n for s in stages}))
        eps = (
            [float(self.eps_arg)] * (len(stages) + 1)
            if isinstance(self.eps_arg, int | float)
            else [float(e) for e in self.eps_arg]
        )
        if len(eps) != len(stages) + 1 and len(eps) != 1:
            raise ConfigError(
                f"OFA eps needs 1 or {len(stages) + 1} values (one per stage {list(stages)} plus "
                f"one for the student's logits), got {len(eps)}"
            )
        self.eps = eps * (len(stages) + 1) if len(eps) == 1 else eps
        if any(e < 1 for e in self.eps):
            raise ConfigError(f"OFA eps must be >= 1, got {self.eps}")
        self.student_stages = stages
        token = self.branch == "token" or (self.branch == "auto" and is_token_model(student))
        self.fixed_student_grid = token  # token exits merge patches of the configured grid
        width_s = student.num_features
        width = max([width_s] + [t.num_features for t in teachers])
        k, last = student.num_classes, student.feature_info[-1]["reduction"]
        for pos, s in enumerate(stages):
            info = student.feature_info[s]
            if token:
                grid = _token_grid(student, info["reduction"])
                exit_ = TokenExit(
                    info["num_chs"],
                    grid,
                    width_s,
                    max(len(stages) - 1 - pos, 1),
                    k,
                    self.final_grid,
                )
            else:
                n_down = max(round(math.log2(last / info["reduction"])), 0)
                exit_ = CNNExit(info["num_chs"], n_down, width, k)
            _init_exit(exit_)
            self.exits[str(s)] = exit_

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        weights = uniform_or(teacher_weights, len(target), len(teachers), student.logits)
        probs = [(t.logits.float() / self.temperature).softmax(-1) for t in teachers]

        def loss(logits: Tensor, eps: float) -> Tensor:
            per_teacher = [
                ofa_loss(logits, p, target, eps, self.temperature, "none") for p in probs
            ]
            return teacher_weighted_mean(per_teacher, weights)

        out = {}
        for i, s in enumerate(self.student_stages):
            branch_logits = self.exits[str(s)](student.stages[s])
            out[f"stage{s}"] = self.branch_weight * loss(branch_logits, self.eps[i])
        out["logits"] = self.logits_weight * loss(student.logits, self.eps[-1])
        return out


def _token_grid(student: Backbone, reduction: int) -> int:
    size = student.input_spec.size
    return size[0] // reduction if size is not None else 0
