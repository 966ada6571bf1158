"""MST-style routing: a router picks, per sample, which teachers the student learns from
(after Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025; adapted to one modality with heterogeneous teachers: see
``docs/methods/mst.md``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.kd import kd_loss
from ..losses.multi_teacher import fold_expert_weights, load_balancing_loss, topk_weights
from ..models import Backbone, ModelOutput
from .base import DistillTerm, TermOutput

ROUTER_INPUTS = ("student_logits", "student_embedding", "teacher_stats")
ROUTER_MODES = ("mst", "soft_mixture", "utility")
BALANCE_MODES = ("kl", "cv")


def mst_loss_weights(epoch: int) -> tuple[float, float]:
    """MST's schedule ``(w_kl, w_lb)``: after epoch 0, and then every 10 epochs, ``w_lb``
    shrinks by 0.9; after epoch 0, and then every 30 epochs, ``w_kl`` halves."""
    if epoch <= 0:
        return 1.0, 1.0
    return 0.5 ** ((epoch - 1) // 30 + 1), 0.9 ** ((epoch - 1) // 10 + 1)


def expert_descriptors(expert_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per expert ``[max p, entropy, margin, KL(p || mean p), KL(p || p_s)]``, flattened to
    ``(B, 5 E)``: label-free cues for the router (§3.8 option 3).

    Args:
        expert_logits: ``(B, E, K)``; read without gradient.
        student_logits: ``(B, K)``; read without gradient.
    """
    probs = expert_logits.detach().float().softmax(-1)  # (B, E, K)
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


class FeatureGate(nn.Module):
    """SE-style channel gate ``D -> max(D // r, 4) -> D``, ReLU, sigmoid (Hu et al.,
    "Squeeze-and-Excitation Networks", 2018): the cheap vision form of MST's MaskNet
    (§3.8; about ``2 D^2 / r`` parameters instead of MaskNet's ``~D^3 / f``).

    ``forward(f)`` maps ``(B, D)`` features to a mask in ``(0, 1)^{B x D}``. The last
    layer starts with zero weights and bias ``init_bias`` (3: mask 0.95 for every input),
    so a gated teacher starts as (almost) the original one.
    """

    def __init__(self, dim: int, reduction: int = 4, init_bias: float = 3.0) -> None:
        super().__init__()
        hidden = max(dim // reduction, 4)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, features: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(features))))


class MSTRouting(DistillTerm):
    """Per-sample routing over the teachers, trained alongside the student.

    The router (MST's GateNet: ``Linear(d, 2K) -> Linear(2K, E)``, softmax) reads the
    student's logits (MST), its pooled embedding, or label-free expert descriptors plus
    the student's logits, and outputs gate probabilities ``g`` ``(B, E)`` over the experts.
    Modes:

    - ``"mst"`` (faithful): the student distils from its top-``k`` experts, unweighted
      (``T^2 KL`` at ``temperature``, averaged over the k); the router learns only from
      the load-balancing loss, which also reaches the student through its logits unless
      ``detach_router_input``.
    - ``"soft_mixture"``: target ``sum_e g_e softmax(z_e / T)``; the router learns from the
      KD loss too (it tends to pick the expert nearest the student; keep the balancing).
    - ``"utility"`` (our recommendation): the router is supervised by which experts are
      right and confident on each sample, ``softmax_e(-CE(z_e, y) / utility_temperature)``,
      using labels on the teacher side only (never as router input); the student distils
      from the router's top-k.

    Experts are the teachers (``E = M``). With ``feature_gates`` each teacher also gets a
    "specialised" variant (``E = 2 M``): an SE-style :class:`FeatureGate` on its pre-logit
    features, re-classified by the teacher's own frozen classifier. The gates train with
    the student (one optimizer) on ``T^2 KL(softmax(z_s / T)^sg || softmax(z_gated / T))``,
    which pulls the gated teacher toward the student (MST's student-friendly teachers),
    plus ``gate_ce_weight`` times the gated teacher's CE on the labels, so a gate cannot
    wreck its teacher (our safeguard; MST has none). The student reads gated logits
    without gradient.

    The term provides per-sample teacher weights (top-k one-hot / k, or ``g`` for
    ``soft_mixture``; a gated expert's weight counts for its teacher), so other terms in
    the config follow the routing. Loss weights follow MST's per-epoch schedule
    (:func:`mst_loss_weights`) unless ``schedule=False``. Its output's ``metrics`` hold
    detached diagnostics (per-expert routing frequency, router entropy) for logging. Zero
    case: ``kd`` is 0 when the student's logits equal every teacher's (the balancing loss is
    not: it measures how the router uses the experts).

    Args:
        top_k: experts per sample (MST: 1); at most the number of experts.
        mode: ``"mst"``, ``"soft_mixture"`` or ``"utility"``.
        router_input: ``"student_logits"``, ``"student_embedding"`` or ``"teacher_stats"``.
        balance: ``"kl"`` (MST default) or ``"cv"`` load balancing.
        temperature: KD temperature (MST: 4).
        utility_temperature: softness of the utility target.
        detach_router_input: stop router gradients from reaching the student.
        schedule: apply MST's per-epoch loss-weight schedule.
        feature_gates: add one gated ("specialised") expert per teacher.
        gate_reduction: the gates' bottleneck ratio ``r``.
        gate_ce_weight: weight of the gated teacher's label CE in the gate loss.
        weight: multiplier of the term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "mst"
    needs_logits = True
    provides_teacher_weights = True
    zero_parts = ("kd",)

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
        feature_gates: bool = False,
        gate_reduction: int = 4,
        gate_ce_weight: float = 1.0,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if mode not in ROUTER_MODES:
            raise ConfigError(f"MSTRouting mode must be one of {ROUTER_MODES}, got {mode!r}")
        if router_input not in ROUTER_INPUTS:
            raise ConfigError(
                f"MSTRouting router_input must be one of {ROUTER_INPUTS}, got {router_input!r}"
            )
        if balance not in BALANCE_MODES:
            raise ConfigError(f"MSTRouting balance must be one of {BALANCE_MODES}, got {balance!r}")
        if top_k < 1:
            raise ConfigError(f"MSTRouting top_k must be at least 1, got {top_k}")
        if temperature <= 0 or utility_temperature <= 0:
            raise ConfigError(
                f"MSTRouting temperatures must be > 0, got temperature={temperature}, "
                f"utility_temperature={utility_temperature}"
            )
        if gate_reduction < 1:
            raise ConfigError(f"MSTRouting gate_reduction must be >= 1, got {gate_reduction}")
        self.top_k, self.mode, self.router_input, self.balance = (
            int(top_k),
            mode,
            router_input,
            balance,
        )
        self.temperature, self.utility_temperature = float(temperature), float(utility_temperature)
        self.detach_router_input, self.schedule = detach_router_input, schedule
        self.feature_gates, self.gate_reduction = feature_gates, int(gate_reduction)
        self.gate_ce_weight = float(gate_ce_weight)
        # Gates read the teachers' pooled features; the embedding router the student's.
        self.needs_pooled = router_input == "student_embedding" or feature_gates
        # Utility routing and the gates' anchor read the class labels.
        self.needs_labels = mode == "utility" or feature_gates
        self.n_teachers = self.n_experts = 0

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        m, k = len(teachers), student.num_classes
        self.n_teachers, self.n_experts = m, m * (2 if self.feature_gates else 1)
        if self.top_k > self.n_experts:
            what = (
                f"{self.n_experts} experts ({m} teachers and their gated variants)"
                if self.feature_gates
                else f"{m} teachers"
            )
            raise ConfigError(f"MSTRouting top_k={self.top_k} must be between 1 and the {what}")
        e = self.n_experts
        d = {"student_logits": k, "student_embedding": student.num_features}.get(
            self.router_input, k + 5 * e
        )
        self.router = nn.Sequential(nn.Linear(d, 2 * k), nn.Linear(2 * k, e))
        if self.feature_gates:
            heads = []
            for t in teachers:
                head = t.model.get_classifier()
                if not isinstance(head, nn.Linear) or head.in_features != t.num_features:
                    raise ConfigError(
                        f"MSTRouting feature_gates re-classify a teacher's pooled features with "
                        f"its classifier, but {t.name}'s classifier is {type(head).__name__}, "
                        f"not one Linear on its {t.num_features} pooled features; set "
                        "feature_gates: false"
                    )
                heads.append(head)
            self.gate_nets = nn.ModuleList(
                FeatureGate(t.num_features, self.gate_reduction) for t in teachers
            )
            # A plain list: the teachers own these frozen classifiers (not our parameters,
            # not in our state dict); they move devices with the teachers.
            self._heads = heads

    def experts(self, teachers: Sequence[ModelOutput]) -> tuple[Tensor, Tensor | None]:
        """Expert logits ``(B, E, K)`` without gradient, and the gated experts' logits
        ``(B, M, K)`` with gradient into the gates (``None`` without ``feature_gates``)."""
        base = torch.stack([o.logits.float() for o in teachers], 1)
        if not self.feature_gates:
            return base, None
        gated = []
        for out, gate, head in zip(teachers, self.gate_nets, self._heads, strict=True):
            if out.pooled is None:
                raise ConfigError("MSTRouting feature_gates need the teachers' pooled features")
            f = out.pooled.float()
            gated.append(F.linear(gate(f) * f, head.weight.float(), head.bias.float()))
        gated_logits = torch.stack(gated, 1)
        return torch.cat([base, gated_logits.detach()], 1), gated_logits

    def gates(self, student: ModelOutput, expert_logits: Tensor) -> Tensor:
        """Router probabilities ``(B, E)``."""
        if self.router_input == "student_embedding":
            x = student.pooled
        elif self.router_input == "teacher_stats":
            x = torch.cat([student.logits, expert_descriptors(expert_logits, student.logits)], -1)
        else:
            x = student.logits
        x = x.detach() if self.detach_router_input else x
        return self.router(x.float()).softmax(-1)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> TermOutput:
        experts, gated = self.experts(teachers)
        g = self.gates(student, experts)
        # Over the experts: the gates (soft_mixture) or 1/k on each sample's top-k experts.
        routed = g.detach() if self.mode == "soft_mixture" else topk_weights(g.detach(), self.top_k)
        # Over the teachers (a gated expert's weight counts for its teacher): for other terms.
        weights = fold_expert_weights(routed, self.n_teachers) if self.feature_gates else routed
        w_kl, w_lb = mst_loss_weights(int(self.epoch)) if self.schedule else (1.0, 1.0)
        t = self.temperature
        probs = (experts / t).softmax(-1)  # (B, E, K), no gradient
        if self.mode == "soft_mixture":
            kd = kd_loss(student.logits, (g.unsqueeze(-1) * probs).sum(1), t)
        else:
            per_expert = torch.stack(
                [
                    kd_loss(student.logits, probs[:, e], t, reduction="none")
                    for e in range(experts.shape[1])
                ],
                1,
            )
            kd = (routed * per_expert).sum(1).mean()
        out = {"kd": w_kl * kd, "balance": w_lb * load_balancing_loss(g, self.balance)}
        if self.mode == "utility":
            ce = F.cross_entropy(
                experts.flatten(0, 1), target.repeat_interleave(experts.shape[1]), reduction="none"
            ).view(experts.shape[:2])
            utility = (-ce / self.utility_temperature).softmax(-1)
            out["utility"] = -(utility * g.clamp_min(1e-12).log()).sum(-1).mean()
        if gated is not None:
            m = gated.shape[1]
            student_probs = (student.logits.detach().float() / t).softmax(-1)
            # Student as the target: pull each gated teacher toward the student (MST stage 2).
            pull = kd_loss(gated.flatten(0, 1), student_probs.repeat_interleave(m, 0), t)
            anchor = F.cross_entropy(gated.flatten(0, 1), target.repeat_interleave(m))
            out["gate"] = pull + self.gate_ce_weight * anchor
        with torch.no_grad():
            top1 = F.one_hot(g.argmax(-1), g.shape[-1]).float().mean(0)
            entropy = -(g * g.clamp_min(1e-12).log()).sum(-1).mean()
            metrics = {"router_entropy": entropy} | {
                f"route_frac/expert{e}": top1[e] for e in range(g.shape[-1])
            }
        return TermOutput(out, teacher_weights=weights, metrics=metrics)
