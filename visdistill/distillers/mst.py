"""MST-style routing: a router picks, per sample, which teachers the student learns from
(after Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025; adapted to one modality with heterogeneous teachers as in
``shared/methods/multi-teacher.md`` §3.8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.kd import kd_loss
from ..losses.multi_teacher import load_balancing_loss, topk_weights
from ..models import Backbone, ModelOutput
from .base import DistillTerm

ROUTER_INPUTS = ("student_logits", "student_embedding", "teacher_stats")
ROUTER_MODES = ("mst", "soft_mixture", "utility")


def mst_loss_weights(epoch: int) -> tuple[float, float]:
    """MST's schedule ``(w_kl, w_lb)``: after epoch 0, and then every 10 epochs, ``w_lb``
    shrinks by 0.9; after epoch 0, and then every 30 epochs, ``w_kl`` halves."""
    if epoch <= 0:
        return 1.0, 1.0
    return 0.5 ** ((epoch - 1) // 30 + 1), 0.9 ** ((epoch - 1) // 10 + 1)


def teacher_descriptors(teachers: Sequence[ModelOutput], student_logits: Tensor) -> Tensor:
    """Per teacher ``[max p, entropy, margin, KL(p || mean p), KL(p || p_s)]``, flattened to
    ``(B, 5 M)``: label-free cues for the router (§3.8 option 3)."""
    probs = torch.stack([o.logits.float().softmax(-1) for o in teachers], 1)  # (B, M, K)
    log_p = probs.clamp_min(1e-12).log()
    mean = probs.mean(1, keepdim=True)
    log_s = F.log_softmax(student_logits.detach().float(), -1).unsqueeze(1)
    top2 = probs.topk(2, -1).values
    feats = [
        top2[..., 0],
        -(probs * log_p).sum(-1),
        top2[..., 0] - top2[..., 1],
        (probs * (log_p - mean.clamp_min(1e-12).log())).sum(-1),
        (probs * (log_p - log_s)).sum(-1),
    ]
    return torch.stack(feats, -1).flatten(1)


class MSTRouting(DistillTerm):
    """Per-sample routing over the teachers, trained alongside the student.

    The router (MST's GateNet: ``Linear(d, 2K) -> Linear(2K, M)``, softmax) reads the
    student's logits (MST), its pooled embedding, or label-free teacher descriptors plus
    the student's logits, and outputs gate probabilities ``g`` ``(B, M)``. Modes:

    - ``"mst"`` (faithful): the student distils from its top-``k`` teachers, unweighted
      (``T^2 KL`` at ``temperature``, averaged over the k); the router learns only from
      the load-balancing loss, which also reaches the student through its logits.
    - ``"soft_mixture"``: target ``sum_e g_e softmax(z_e / T)``; the router learns from the
      KD loss too (it tends to pick the teacher nearest the student; keep the balancing).
    - ``"utility"`` (our recommendation): the router is supervised by which teachers are
      right and confident on each sample, ``softmax_e(-CE(z_e, y) / utility_temperature)``,
      using labels on the teacher side only; the student distils from the router's top-k.

    The term provides per-sample teacher weights (top-k one-hot / k, or ``g`` for
    ``soft_mixture``), so other terms in the config follow the routing. Loss weights follow
    MST's schedule (:func:`mst_loss_weights`) unless ``schedule=False``. The masked
    "specialised teacher" experts of MST are not implemented: experts are the teachers.

    Args:
        top_k: experts per sample (MST: 1).
        mode: ``"mst"``, ``"soft_mixture"`` or ``"utility"``.
        router_input: ``"student_logits"``, ``"student_embedding"`` or ``"teacher_stats"``.
        balance: ``"kl"`` (MST default) or ``"cv"`` load balancing.
        temperature: KD temperature (MST: 4).
        utility_temperature: softness of the utility target.
        detach_router_input: stop router gradients from reaching the student.
        schedule: apply MST's per-epoch loss-weight schedule.
        weight: multiplier of the term.
    """

    name = "mst"
    provides_teacher_weights = True

    def __init__(
        self,
        top_k: int = 1,
        mode: str = "mst",
        router_input: str = "student_logits",
        balance: str = "kl",
        temperature: float = 4.0,
        utility_temperature: float = 1.0,
        detach_router_input: bool = False,
        schedule: bool = True,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if mode not in ROUTER_MODES:
            raise ConfigError(f"MSTRouting mode must be one of {ROUTER_MODES}, got {mode!r}")
        if router_input not in ROUTER_INPUTS:
            raise ConfigError(
                f"MSTRouting router_input must be one of {ROUTER_INPUTS}, got {router_input!r}"
            )
        if balance not in ("kl", "cv"):
            raise ConfigError(f"MSTRouting balance must be 'kl' or 'cv', got {balance!r}")
        self.top_k, self.mode, self.router_input, self.balance = (
            int(top_k),
            mode,
            router_input,
            balance,
        )
        self.temperature, self.utility_temperature = float(temperature), float(utility_temperature)
        self.detach_router_input, self.schedule = detach_router_input, schedule
        self.needs_pooled = router_input == "student_embedding"
        self._gates: Tensor | None = None

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        m, k = len(teachers), student.num_classes
        if not 1 <= self.top_k <= m:
            raise ConfigError(
                f"MSTRouting top_k={self.top_k} must be between 1 and the {m} teachers"
            )
        d = {"student_logits": k, "student_embedding": student.num_features}.get(
            self.router_input, k + 5 * m
        )
        self.router = nn.Sequential(nn.Linear(d, 2 * k), nn.Linear(2 * k, m))

    def gates(self, student: ModelOutput, teachers: Sequence[ModelOutput]) -> Tensor:
        """Router probabilities ``(B, M)``."""
        if self.router_input == "student_embedding":
            x = student.pooled
        elif self.router_input == "teacher_stats":
            x = torch.cat([student.logits, teacher_descriptors(teachers, student.logits)], -1)
        else:
            x = student.logits
        x = x.detach() if self.detach_router_input else x
        return self.router(x.float()).softmax(-1)

    def teacher_weights(
        self, student: ModelOutput, teachers: Sequence[ModelOutput], target: Tensor
    ) -> Tensor:
        g = self.gates(student, teachers)
        self._gates = g
        if self.mode == "soft_mixture":
            return g.detach()
        return topk_weights(g.detach(), self.top_k)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        g = self._gates if self._gates is not None else self.gates(student, teachers)
        self._gates = None
        w_kl, w_lb = mst_loss_weights(int(self.epoch)) if self.schedule else (1.0, 1.0)
        t = self.temperature
        probs = torch.stack([(o.logits.float() / t).softmax(-1) for o in teachers], 1)
        if self.mode == "soft_mixture":
            kd = kd_loss(student.logits, (g.unsqueeze(-1) * probs).sum(1), t)
        else:
            chosen = topk_weights(g.detach(), self.top_k)  # (B, M), 1/k on the chosen
            per_teacher = torch.stack(
                [
                    kd_loss(student.logits, probs[:, e], t, reduction="none")
                    for e in range(len(teachers))
                ],
                1,
            )
            kd = (chosen * per_teacher).sum(1).mean()
        out = {"kd": w_kl * kd, "balance": w_lb * load_balancing_loss(g, self.balance)}
        if self.mode == "utility":
            ce = torch.stack(
                [F.cross_entropy(o.logits.float(), target, reduction="none") for o in teachers], 1
            )
            utility = (-ce / self.utility_temperature).softmax(-1)
            out["utility"] = -(utility * g.clamp_min(1e-12).log()).sum(-1).mean()
        return out
