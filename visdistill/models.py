"""Backbone: one timm model with its own input preprocessing and feature taps.

Every model in visdistill (student or teacher) is a :class:`Backbone`. It receives
the *canonical* batch, ``(B, 3, H, W)`` floats in ``[0, 1]`` and un-normalised, and
adapts it itself (resize, channels, mean/std) according to its :class:`InputSpec`.
That is what lets a ViT teacher at 224 px with ``(0.5, 0.5, 0.5)`` statistics and a
CNN student at 32 px with ImageNet statistics take the same batch.

Intermediate features come from timm's ``forward_intermediates`` (timm >= 1.0): only
the requested stage indices are kept, and every stage is returned as NCHW (ViT and
MLP tokens are reshaped to their patch grid).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import zoo
from .checkpoints import load_state_dict_file, load_weights_into
from .errors import CheckpointError, ConfigError, UnknownModelError, close_matches

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "timm/")
_ALIAS = re.compile(r"[A-Za-z0-9_.-]+")


def short_name(name: str) -> str:
    """The name a user recognises in logs: ``zoo:fmnist_resnet10t`` -> ``fmnist_resnet10t``,
    ``hf-hub:timm/vit_small_patch14_dinov2.lvd142m`` -> ``vit_small_patch14_dinov2.lvd142m``,
    ``local-dir:/models/my_vit/`` -> ``my_vit``; a plain timm name stays as it is."""
    short = name.split(":", 1)[1] if ":" in name else name
    short = short.rstrip("/").rsplit("/", 1)[-1] or name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", short)


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its input.

    Args:
        size: ``(H, W)`` the model runs at; ``None`` keeps the data's size
            (fine for fully convolutional models).
        mean, std: per-channel normalisation applied after resizing.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (``"nearest"`` also works).
        in_chans: 3, or 1 for grayscale models (the canonical RGB batch is averaged).
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    in_chans: int = 3

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(
                f"InputSpec mean {self.mean} and std {self.std} need {self.in_chans} values "
                f"(one per input channel)"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"InputSpec std must be positive, got {self.std}")
        if self.in_chans not in (1, 3):
            raise ConfigError(
                f"in_chans must be 1 or 3 (canonical batches are RGB), got {self.in_chans}"
            )

    def apply(self, x: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """Adapt a canonical ``(B, 3, H, W)`` batch in ``[0, 1]`` to this spec."""
        if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
            shrinking = x.shape[-1] > self.size[1] or x.shape[-2] > self.size[0]
            align = None if self.interpolation == "nearest" else False
            x = F.interpolate(
                x,
                size=self.size,
                mode=self.interpolation,
                align_corners=align,
                antialias=shrinking and self.interpolation != "nearest",
            )
        if self.in_chans == 1 and x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if mean is None:
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass
class ModelOutput:
    """What a :class:`Backbone` returns.

    Attributes:
        logits: ``(B, K)``; ``None`` for a headless model (``num_classes=0``), which has no
            classifier. Its features are never passed off as logits: they are in ``pooled``.
        pooled: ``(B, D)`` pre-logits features, when asked for, and always for a headless
            model (they are its output).
        stages: ``{stage index: (B, C, h, w)}`` for the requested stages.
        prefix_tokens: ``{stage index: (B, P, C)}`` class/register tokens of ViT-like
            models, only when asked for.
    """

    logits: Tensor | None
    pooled: Tensor | None = None
    stages: dict[int, Tensor] = field(default_factory=dict)
    prefix_tokens: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A model as a user names it in YAML (a teacher or the student), and the one list of
    :class:`Backbone`'s options.

    Attributes:
        name: any ``timm.create_model`` name (``resnet18``, ``hf-hub:timm/...``,
            ``local-dir:/path``), or ``zoo:<entry>`` for visdistill's zoo. A zoo entry *is*
            its weights: they load (sha256-verified) unless ``checkpoint`` is given, and its
            input spec and ``model_kwargs`` are the defaults.
        num_classes: classifier width; ``None`` keeps timm's default.
        pretrained: load timm's default weights (hub or cache).
        checkpoint: a local ``.safetensors`` or torch state dict to load (wins over
            ``pretrained``); ``module.``/``model.`` prefixes are stripped.
        input_size: side (or ``(H, W)``) the model runs at. Default: the fixed
            size of models that have one (:func:`fixed_input_size`: ViT, Swin, MLP-Mixer,
            LeViT ...), else the data's own size.
        mean, std, interpolation: default from timm's ``pretrained_cfg``.
        in_chans: 3, or 1 for grayscale models.
        model_kwargs: extra ``timm.create_model`` kwargs (``img_size``, ``patch_size``,
            ``depth``, ``drop_path_rate`` ...).
        allow_unverified: accept a zoo entry whose manifest has no sha256.
        allow_new_head: accept pretrained or zoo weights whose classifier has another
            ``num_classes`` as a *teacher* (its new classifier is random, so its soft targets
            are noise; fine when only its features are used). Students always accept it.
        alias: a short name for logs, metric keys and summaries (``val/<alias>_acc``);
            default: :func:`short_name` of ``name``.
        stage_norm: apply the model's final norm to the stage features it returns (timm's
            ``forward_intermediates(norm=True)``): how foundation ViTs' patch features are
            usually read (DINOv2's normalised patch tokens), and the targets RADIO-style
            adaptor heads are trained on. Off: the raw block outputs. Models without a final
            norm (most CNNs) return the same features either way.
    """

    name: str
    num_classes: int | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    input_size: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    in_chans: int = 3
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    allow_unverified: bool = False
    allow_new_head: bool = False
    alias: str | None = None
    stage_norm: bool = False


def model_config(name: str | ModelConfig, **fields: Any) -> ModelConfig:
    """``name`` as a :class:`ModelConfig`, with ``fields`` replacing its values; an unknown
    field is a :class:`ConfigError` naming the close matches."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        hints = {k: close_matches(k, known) for k in unknown}
        raise ConfigError(
            "unknown model option(s) "
            + ", ".join(
                f"{k!r}" + (f" (did you mean {', '.join(h)}?)" if h else "")
                for k, h in hints.items()
            )
            + f"; a model takes {sorted(known)}"
        )
    if isinstance(name, ModelConfig):
        return dataclasses.replace(name, **fields) if fields else name
    return ModelConfig(name=name, **fields)


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` with close matches if timm (or, for ``zoo:``
    names, the zoo) does not know ``name``."""
    if name.startswith(zoo.PREFIX):
        zoo.get_entry(name)
        return
    if name.startswith(_HUB_PREFIXES) or timm.is_model(name):
        return
    base = name.split(".")[0]  # "resnet18.a1_in1k" -> "resnet18"
    if timm.is_model(base):
        return
    hints = close_matches(base, timm.list_models())
    hint = f" Did you mean: {', '.join(hints)}?" if hints else ""
    raise UnknownModelError(
        f"unknown timm model {name!r}.{hint} `timm.list_models('*pattern*')` lists all names."
    )


def _pair(value: Any) -> tuple[int, int] | None:
    """``224`` or ``(224, 224)`` (or ``(3, 224, 224)``) -> ``(224, 224)``; else ``None``."""
    if isinstance(value, int) and value > 0:
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        hw = tuple(value[-2:])
        if all(isinstance(v, int) and v > 0 for v in hw):
            return hw
    return None


def fixed_input_size(
    model: nn.Module, model_kwargs: dict[str, Any] | None = None
) -> tuple[int, int] | None:
    """``(H, W)`` a timm model must run at, or ``None`` when it takes any size.

    A model is fixed when timm's ``pretrained_cfg`` says ``fixed_input_size`` (ViT, DeiT,
    Swin, CaiT, BEiT, EVA, MLP-Mixer, ResMLP, gMLP, LeViT, PiT, TNT, CoaT, ConViT, VOLO,
    MaxViT, CoAtNet, Hiera, EfficientFormer, ...) or its patch embedding checks the size
    (``strict_img_size``). The size is the one the model was built for, in this order: the
    ``img_size`` of its ``patch_embed``, ``stem`` or the model itself (these follow an
    ``img_size`` in ``model_kwargs``), ``model_kwargs["img_size"]``, then the
    ``pretrained_cfg``'s ``input_size``. A patch embedding built with
    ``strict_img_size=False`` (``dynamic_img_size=True``) means any size.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "strict_img_size", None) is False:
        return None  # dynamic image size
    strict = getattr(patch_embed, "strict_img_size", None) is True
    if not (cfg.get("fixed_input_size") or strict):
        return None
    for owner in (patch_embed, getattr(model, "stem", None), model):
        size = _pair(getattr(owner, "img_size", None)) if owner is not None else None
        if size is not None:
            return size
    return _pair((model_kwargs or {}).get("img_size")) or _pair(cfg.get("input_size"))


class Backbone(nn.Module):
    """A timm classifier that preprocesses its own input and exposes stage features.

    Args:
        name: a :class:`ModelConfig`, or the model's name (any ``timm.create_model`` name,
            ``hf-hub:timm/...``, ``local-dir:/path`` or ``zoo:<entry>``) with
            :class:`ModelConfig`'s other fields as keywords:
            ``Backbone("resnet18", num_classes=10)``.
    """

    def __init__(self, name: str | ModelConfig, **fields: Any) -> None:
        super().__init__()
        config = model_config(name, **fields)
        self.config = config
        name, num_classes, pretrained = config.name, config.num_classes, config.pretrained
        checkpoint, input_size, in_chans = config.checkpoint, config.input_size, config.in_chans
        mean, std, interpolation = config.mean, config.std, config.interpolation
        model_kwargs, alias = config.model_kwargs, config.alias
        allow_unverified, allow_new_head = config.allow_unverified, config.allow_new_head
        check_model_name(name)
        self.name = name
        if alias is not None and not _ALIAS.fullmatch(alias):
            raise ConfigError(
                f"alias {alias!r} of {name}: use letters, digits, '_', '-' or '.' "
                "(it becomes part of metric names such as val/<alias>_acc)"
            )
        self.alias = alias or short_name(name)
        self.model_kwargs = dict(model_kwargs or {})
        kwargs = dict(self.model_kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_chans != 3:
            kwargs["in_chans"] = in_chans
        # The timm architecture and kwargs that rebuild this model (export writes them).
        self.arch, self.arch_kwargs = name, dict(self.model_kwargs)
        entry = zoo.get_entry(name) if name.startswith(zoo.PREFIX) else None
        try:
            if entry is not None:
                self.arch, self.arch_kwargs = entry.arch, {**entry.model_kwargs, **kwargs}
                self.arch_kwargs.pop("num_classes", None)
                if input_size is None:
                    input_size = entry.input.get("size")
                self.model = zoo.create_model(
                    name, pretrained=checkpoint is None, allow_unverified=allow_unverified, **kwargs
                )
            else:
                self.model = timm.create_model(
                    name, pretrained=pretrained and checkpoint is None, **kwargs
                )
        except TypeError as e:
            raise ConfigError(
                f"timm.create_model({name!r}) rejected model_kwargs {self.model_kwargs}: {e}. "
                "Some kwargs are fixed by the named variant; choose a variant that differs only "
                "in what you override."
            ) from e
        except Exception as e:
            if entry is not None or not (pretrained and checkpoint is None):
                raise
            # Hub/network/cache failures surface from deep inside huggingface_hub.
            raise CheckpointError(
                f"could not load timm's pretrained weights for {name!r}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Offline? Download them elsewhere and "
                "set `checkpoint: <file>`, or point HF_HOME at a cache that has them."
            ) from e
        if checkpoint is not None:
            load_weights_into(self.model, load_state_dict_file(checkpoint), source=checkpoint)
        self.checkpoint = checkpoint
        # Pretrained/zoo weights of another num_classes: the classifier is newly initialised.
        self.allow_new_head, self.new_head = allow_new_head, False
        self.weights_classes: int | None = None  # classes of the loaded classifier
        if checkpoint is None and num_classes:
            if entry is not None:
                self.weights_classes = entry.num_classes
            elif pretrained:
                cfg = getattr(self.model, "pretrained_cfg", None) or {}
                self.weights_classes = cfg.get("num_classes")
            self.new_head = bool(self.weights_classes) and self.weights_classes != num_classes
        self.input_spec = self._resolve_input_spec(input_size, mean, std, interpolation, in_chans)
        self.register_buffer(
            "_mean", torch.tensor(self.input_spec.mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(self.input_spec.std).view(1, -1, 1, 1), persistent=False
        )
        self.feature_info: list[dict[str, Any]] = [
            dict(num_chs=f["num_chs"], reduction=f["reduction"], module=f["module"])
            for f in getattr(self.model, "feature_info", [])
        ]

    @classmethod
    def from_config(cls, config: ModelConfig) -> Backbone:
        """Build from a :class:`ModelConfig` (what YAML files hold)."""
        return cls(config)

    def _resolve_input_spec(self, input_size, mean, std, interpolation, in_chans) -> InputSpec:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if input_size is None:
            input_size = fixed_input_size(self.model, self.model_kwargs)
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        in_chans_default = (0.5,) * in_chans
        mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", in_chans_default))
        std = tuple(std) if std is not None else tuple(cfg.get("std", in_chans_default))
        if in_chans == 1 and len(mean) == 3:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        interpolation = interpolation or cfg.get("interpolation", "bilinear")
        return InputSpec(
            size=tuple(input_size) if input_size is not None else None,
            mean=mean,
            std=std,
            interpolation=interpolation,
            in_chans=in_chans,
        )

    @property
    def num_classes(self) -> int:
        """Classifier width; 0 for a headless model."""
        return self.model.num_classes

    @property
    def headless(self) -> bool:
        """``num_classes=0``: no classifier; ``forward`` gives pooled features, no logits."""
        return self.model.num_classes == 0

    @property
    def num_features(self) -> int:
        """Width of ``pooled`` (pre-logits) features."""
        return getattr(self.model, "head_hidden_size", None) or self.model.num_features

    def check_stages(self, stages: tuple[int, ...] | list[int]) -> None:
        """Raise a :class:`ConfigError` naming the valid stages if any index is out of range."""
        if not stages:
            return
        if not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(
                f"{self.name} has no forward_intermediates in timm, so its stage features "
                "cannot be tapped; choose another architecture or request no stages"
            )
        if (
            self.config.stage_norm
            and "norm" not in inspect.signature(self.model.forward_intermediates).parameters
        ):
            raise ConfigError(
                f"{self.name}: stage_norm is set, but timm's forward_intermediates of "
                f"{type(self.model).__name__} has no norm option; set stage_norm: false"
            )
        n = len(self.feature_info)
        bad = [s for s in stages if not -n <= s < n]
        if bad:
            listing = ", ".join(
                f"{i}: {f['module']} ({f['num_chs']} ch, /{f['reduction']})"
                for i, f in enumerate(self.feature_info)
            )
            raise ConfigError(f"{self.name} has no stage(s) {bad}; available stages: {listing}")

    def preprocess(self, x: Tensor) -> Tensor:
        """Canonical ``(B, 3, H, W)`` in ``[0, 1]`` -> this model's input."""
        return self.input_spec.apply(x, self._mean.to(x.dtype), self._std.to(x.dtype))

    def forward(
        self,
        x: Tensor,
        stages: tuple[int, ...] | list[int] = (),
        pooled: bool = False,
        prefix_tokens: bool = False,
        preprocessed: bool = False,
    ) -> ModelOutput:
        """Run the model on a canonical batch.

        Args:
            x: ``(B, 3, H, W)`` in ``[0, 1]`` (or already preprocessed with
                ``preprocessed=True``).
            stages: stage indices into ``feature_info``; only these are kept.
            pooled: also return ``(B, D)`` pre-logits features (a headless model always
                does, and its ``logits`` are ``None``).
            prefix_tokens: also return class/register tokens (ViT-like models).
        """
        if not preprocessed:
            x = self.preprocess(x)
        out_stages: dict[int, Tensor] = {}
        out_prefix: dict[int, Tensor] = {}
        if stages:
            n = len(self.feature_info)
            indices = sorted({s % n for s in stages})
            kwargs: dict[str, Any] = {"return_prefix_tokens": True} if prefix_tokens else {}
            if self.config.stage_norm:
                kwargs["norm"] = True
            final, inter = self.model.forward_intermediates(x, indices=indices, **kwargs)
            for s in stages:
                feat = inter[indices.index(s % n)]
                if prefix_tokens:
                    feat, out_prefix[s] = feat
                out_stages[s] = feat
        else:
            final = self.model.forward_features(x)
        if self.headless:  # timm's headless forward_head gives the pooled features
            logits, pre = None, self.model.forward_head(final, pre_logits=True)
        else:
            logits = self.model.forward_head(final)
            pre = self.model.forward_head(final, pre_logits=True) if pooled else None
        return ModelOutput(logits=logits, pooled=pre, stages=out_stages, prefix_tokens=out_prefix)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_spec={self.input_spec}"


def create_backbone(name: str, **kwargs: Any) -> Backbone:
    """``timm.create_model`` for visdistill: returns a :class:`Backbone`."""
    return Backbone(name, **kwargs)
