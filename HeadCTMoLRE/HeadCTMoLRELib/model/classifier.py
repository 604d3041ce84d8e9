"""HeadCTClassifier: the paper's Algorithm 1 (backbone + LoRA -> MoLRE -> attention pooling -> linear head).

2-D backbones, per volume with S slices (inferior -> superior):

    f_s = backbone_LoRA(slice_s)                         (S, d)   only slices with slice_mask True are encoded
    h_s, g_s = MoLRE(f_s)                                (S, d), (S, K)   identity when use_molre=False
    alpha = softmax(q . h_s / sqrt(d)) over valid slices (S,)     masked slices get exactly 0
    v = sum_s alpha_s h_s;  logits = W v + b;  p = sigmoid(logits)

Because the head is linear, logit_c = sum_s alpha_s (w_c . h_s) + b_c exactly: `contributions[b, s, c]`
is that per-slice term.

``pooling="per_finding"`` (an option; the paper's is the single query above) pools each finding's slice
logits instead, with a smooth maximum over valid slices:

    z_sc = w_c . h_s + b_c;  alpha_sc = softmax_s(r_c z_sc);  logit_c = sum_s alpha_sc z_sc
                                                                  = sum_s alpha_sc (w_c . h_s) + b_c

(r_c = exp(log_sharpness_c) > 0, learned, starting at 1). A finding seen on two slices of forty then is not
averaged away by the slices that do not show it; `contributions[b, s, c]` = alpha_sc (w_c . h_s) keeps the
exact decomposition, and `attention` is the mean of alpha_sc over the findings (still (B, S), summing to 1).
3-D backbones encode the whole volume: MoLRE routes once per volume, there is
no attention over slices (`attention` is None) and `router_weights`/`contributions` have one entry
(axis 1 of length 1) standing for the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec, SliceEncoder, VolumeEncoder, build_backbone
from .manifest_schema import POOLINGS
from .molre import MoLRE, MoLREConfig
from ..settings import reject_unknown_settings


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the classifier's architecture (weights are stored separately)."""

    backbone: BackboneSpec
    num_findings: int
    use_molre: bool = True
    molre: MoLREConfig = field(default_factory=MoLREConfig)
    #: How slice features become volume logits (2-D backbones): "attention", the paper's single learned query
    #: over slices, or "per_finding", a smooth maximum of each finding's slice logits (module docstring).
    pooling: str = "attention"

    def __post_init__(self) -> None:
        if not isinstance(self.num_findings, int) or self.num_findings < 1:
            raise ValueError(f"num_findings must be a positive integer, got {self.num_findings!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}.")
        if self.backbone.volumetric and self.pooling != "attention":
            raise ValueError(f"pooling {self.pooling!r} pools slices; the {self.backbone.family} backbone encodes whole "
                             "volumes (no slices to pool). Leave pooling at its default.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.to_dict(),
            "num_findings": self.num_findings,
            "use_molre": self.use_molre,
            "molre": self.molre.to_dict(),
            "pooling": self.pooling,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        reject_unknown_settings(cls, data, "model")
        return cls(
            backbone=BackboneSpec.from_dict(data["backbone"]),
            num_findings=data["num_findings"],
            use_molre=data.get("use_molre", True),
            molre=MoLREConfig.from_dict(data.get("molre", {})),
            pooling=data.get("pooling", "attention"),  # bundles written before the option: the paper's
        )


@dataclass
class ClassifierOutput:
    """Model outputs for a batch of B volumes, S slices, C findings, K experts, feature size d.

    logits, probabilities: (B, C).
    attention: (B, S) pooling weights, 0 on masked slices, summing to 1; None for 3-D backbones.
    router_weights: (B, S, K) per-slice expert gates (0 on masked slices), (B, 1, K) for 3-D
        backbones, None without MoLRE.
    contributions: (B, S, C) with contributions.sum(1) == logits - classifier bias; (B, 1, C) for 3-D.
    slice_features: (B, S, d) features after MoLRE (0 on masked slices); (B, 1, d) for 3-D.
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    attention: torch.Tensor | None
    router_weights: torch.Tensor | None
    contributions: torch.Tensor
    slice_features: torch.Tensor | None = None


class AttentionPool(nn.Module):
    """Single learned query over slices: alpha = softmax(q h_s^T / sqrt(d)) over valid slices, v = sum alpha h.

    The query starts at zero, i.e. as the mean over valid slices.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, features: torch.Tensor, slice_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, S, d), slice_mask (B, S) bool -> (pooled (B, d), attention (B, S))."""
        scores = features @ self.query.to(features.dtype) / math.sqrt(self.dim)
        scores = scores.masked_fill(~slice_mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        return (attention.unsqueeze(-1) * features).sum(dim=1), attention


class FindingPool(nn.Module):
    """Per-finding smooth maximum of slice logits: alpha_sc = softmax over valid slices of r_c z_sc,
    volume logit_c = sum_s alpha_sc z_sc, with r_c = exp(log_sharpness_c) learned (starting at 1: slices
    whose logit is a few units above the rest take nearly all the weight; when all slices agree it is
    their mean)."""

    def __init__(self, num_findings: int) -> None:
        super().__init__()
        self.log_sharpness = nn.Parameter(torch.zeros(num_findings))

    def forward(self, slice_logits: torch.Tensor, slice_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slice_logits (B, S, C), slice_mask (B, S) bool -> (volume logits (B, C), weights (B, S, C): 0 on
        masked slices, summing to 1 over slices for each finding)."""
        scores = slice_logits * self.log_sharpness.exp().to(slice_logits.dtype)
        scores = scores.masked_fill(~slice_mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return (weights * slice_logits).sum(dim=1), weights


class HeadCTClassifier(nn.Module):
    """Backbone + LoRA -> MoLRE (or identity) -> attention pooling -> Linear(d, C) (or, with
    ``pooling="per_finding"``, Linear(d, C) on every slice -> per-finding smooth maximum over slices).

    forward(pixels (B, S, 3, H, W) in 0..1, slice_mask (B, S) bool or None, *, chunk_size) -> ClassifierOutput.
    """

    def __init__(self, config: ModelConfig, encoder: SliceEncoder | VolumeEncoder) -> None:
        super().__init__()
        if encoder.spec != config.backbone:
            raise ValueError("The encoder was built from a different BackboneSpec than the model config names.")
        self.config = config
        self.encoder = encoder
        dim = encoder.feature_dim
        self.molre = MoLRE.from_config(dim, config.molre) if config.use_molre else None
        if encoder.volumetric:
            self.pool = None
        else:
            self.pool = FindingPool(config.num_findings) if config.pooling == "per_finding" else AttentionPool(dim)
        self.classifier = nn.Linear(dim, config.num_findings)

    @property
    def volumetric(self) -> bool:
        return self.encoder.volumetric

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    @property
    def num_findings(self) -> int:
        return self.config.num_findings

    def forward(
        self,
        pixels: torch.Tensor,
        slice_mask: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> ClassifierOutput:
        """Classify B volumes of S slices.

        pixels: (B, S, C, H, W) float in 0..1 (C HU windows as channels: 3, Pillar0 headct 11; slices
            inferior -> superior).
        slice_mask: (B, S) bool, True for slices inside the scanned volume (None: all). Masked slices are
            never fed to the backbone, get zero attention and cannot change any output.
        chunk_size: at most this many slices per backbone call (bounds memory; same results up to float
            rounding). For 3-D backbones it is converted to whole volumes per call (at least one).
        """
        slice_mask = _checked_mask(pixels, slice_mask)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of slices, got {chunk_size}.")
        if self.volumetric:
            return self._forward_volumes(pixels, slice_mask, chunk_size)
        return self._forward_slices(pixels, slice_mask, chunk_size)

    # 2-D: one feature per slice -------------------------------------------------------------------

    def _encode_slices(self, pixels: torch.Tensor, slice_mask: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """(B, S, 3, H, W) -> (B, S, d), running the backbone on valid slices only, chunk_size at a time.

        Under CUDA-graph capture or torch.compile every slice is encoded and the invalid ones are zeroed
        afterwards: the same result without the data-dependent shapes that force a host sync.
        """
        if _static_shapes_required():
            flat = pixels.flatten(0, 1)  # (B*S, 3, H, W)
            step = chunk_size or flat.shape[0]
            encoded = torch.cat([self.encoder(flat[i : i + step]) for i in range(0, flat.shape[0], step)])
            encoded = encoded.view(*slice_mask.shape, encoded.shape[-1])
            return torch.where(slice_mask.unsqueeze(-1), encoded, torch.zeros_like(encoded))
        valid_pixels = pixels[slice_mask]  # (N, 3, H, W)
        step = chunk_size or valid_pixels.shape[0]
        encoded = torch.cat([self.encoder(valid_pixels[i : i + step]) for i in range(0, valid_pixels.shape[0], step)])
        features = encoded.new_zeros(*slice_mask.shape, encoded.shape[-1])
        features[slice_mask] = encoded
        return features

    def _forward_slices(self, pixels: torch.Tensor, slice_mask: torch.Tensor, chunk_size: int | None) -> ClassifierOutput:
        features = self._encode_slices(pixels, slice_mask, chunk_size)
        router_weights = None
        if self.molre is not None:
            features, router_weights = self.molre(features)
            keep = slice_mask.unsqueeze(-1)
            features = torch.where(keep, features, torch.zeros_like(features))
            router_weights = torch.where(keep, router_weights, torch.zeros_like(router_weights))
        # Pooling and head in float32 even under autocast: attention and contributions are read by people.
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if isinstance(self.pool, FindingPool):
                terms = features @ self.classifier.weight.T  # (B, S, C): w_c . h_s
                logits, weights = self.pool(terms + self.classifier.bias, slice_mask)
                contributions = weights * terms
                attention = weights.mean(dim=-1)
            else:
                pooled, attention = self.pool(features, slice_mask)
                logits = self.classifier(pooled)
                contributions = attention.unsqueeze(-1) * (features @ self.classifier.weight.T)
        return ClassifierOutput(
            logits=logits,
            probabilities=torch.sigmoid(logits),
            attention=attention,
            router_weights=None if router_weights is None else router_weights.float(),
            contributions=contributions,
            slice_features=features,
        )

    # 3-D: one feature per volume ------------------------------------------------------------------

    def _forward_volumes(self, pixels: torch.Tensor, slice_mask: torch.Tensor, chunk_size: int | None) -> ClassifierOutput:
        frames = self.encoder.num_frames
        step = max(1, (chunk_size or pixels.shape[0] * frames) // frames)  # volumes per backbone call
        features = torch.cat(
            [self.encoder(pixels[i : i + step], slice_mask[i : i + step]) for i in range(0, pixels.shape[0], step)]
        )
        router_weights = None
        if self.molre is not None:
            features, router_weights = self.molre(features)  # one routing decision per volume
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            logits = self.classifier(features)
            contributions = (features @ self.classifier.weight.T).unsqueeze(1)
        return ClassifierOutput(
            logits=logits,
            probabilities=torch.sigmoid(logits),
            attention=None,
            router_weights=None if router_weights is None else router_weights.float().unsqueeze(1),
            contributions=contributions,
            slice_features=features.unsqueeze(1),
        )


def _static_shapes_required() -> bool:
    """True while a CUDA graph is being captured or torch.compile traces: no host syncs allowed."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return bool(compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def _checked_mask(pixels: torch.Tensor, slice_mask: torch.Tensor | None) -> torch.Tensor:
    if pixels.dim() != 5 or pixels.shape[2] < 1:  # the backbone checks its own channel count (3; Pillar0: 11)
        raise ValueError(f"Expected pixels of shape (B, S, C, H, W), got {tuple(pixels.shape)}.")
    batch, num_slices = pixels.shape[:2]
    if slice_mask is None:
        return torch.ones(batch, num_slices, dtype=torch.bool, device=pixels.device)
    if tuple(slice_mask.shape) != (batch, num_slices):
        raise ValueError(f"slice_mask must have shape ({batch}, {num_slices}), got {tuple(slice_mask.shape)}.")
    slice_mask = slice_mask.to(device=pixels.device, dtype=torch.bool)
    if _static_shapes_required():  # reading values back to the host is impossible while capturing
        return slice_mask
    empty = (~slice_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"Volumes {empty} of the batch have no valid slice (slice_mask all False).")
    return slice_mask


# --------------------------------------------------------------------------------------------------
# Building, weights, parameter bookkeeping


def build_classifier(
    config: ModelConfig,
    *,
    backbone_weights_dir: str | None = None,
    backbone_transformers_config: dict[str, Any] | None = None,
) -> HeadCTClassifier:
    """Backbone (local weights folder, or random init of the spec's size / of a stored transformers config)
    + LoRA + MoLRE + pooling + head. New MoLRE experts are zero, so the model starts as its LoRA-only twin."""
    encoder = build_backbone(
        config.backbone, weights_dir=backbone_weights_dir, transformers_config=backbone_transformers_config
    )
    return HeadCTClassifier(config, encoder)


def _adapter_buffers(model: HeadCTClassifier) -> dict[str, torch.Tensor]:
    """Frozen MoLRE buffers (a given W0) belong with the adapter weights, not with the backbone."""
    if model.molre is None:
        return {}
    return {f"molre.{name}": buffer for name, buffer in model.molre.named_buffers()}


def _is_backbone_base(name: str) -> bool:
    """True for a parameter name of the backbone's own (non-LoRA) weights."""
    return name.startswith("encoder.") and "lora_" not in name


def unfreeze_backbone(model: HeadCTClassifier) -> int:
    """Make the backbone's own weights trainable (a stand-in for foundation pre-training when no
    pretrained weights exist); returns how many parameters were unfrozen. They stay out of
    `trainable_state_dict` (they are backbone weights, bundled as such) and get their own optimiser
    group in `param_groups`."""
    count = 0
    for name, parameter in model.named_parameters():
        if _is_backbone_base(name):
            parameter.requires_grad_(True)
            count += parameter.numel()
    return count


def backbone_is_trainable(model: HeadCTClassifier) -> bool:
    """True when `unfreeze_backbone` was applied (some backbone base weight requires a gradient)."""
    return any(p.requires_grad for name, p in model.named_parameters() if _is_backbone_base(name))


def trainable_state_dict(model: HeadCTClassifier) -> dict[str, torch.Tensor]:
    """LoRA A/B, MoLRE, pooling query and head (plus a given MoLRE W0), detached, with stable names.
    Backbone base weights are never included, even when `unfreeze_backbone` made them trainable."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad and not _is_backbone_base(name)}
    state.update({name: b.detach() for name, b in _adapter_buffers(model).items()})
    return state


def _check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], strict: bool, what: str, hint: str) -> None:
    """Raise KeyError (names) or ValueError (shapes) naming the offending keys, before anything is copied."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"{what} do not fit {hint}: missing {_short(missing)}, unexpected {_short(unexpected)}.")
    wrong_shape = [
        f"{name}: file {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(state))
        if tuple(state[name].shape) != tuple(expected[name].shape)
    ]
    if wrong_shape:
        raise ValueError(f"{what} have the wrong shape: {_short(wrong_shape)}.")


def load_trainable_state_dict(model: HeadCTClassifier, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load weights saved by `trainable_state_dict`; with strict, the key sets must match exactly."""
    targets = {name: p for name, p in model.named_parameters() if p.requires_grad and not _is_backbone_base(name)}
    targets.update(_adapter_buffers(model))
    _check_fits(targets, state, strict, "Adapter weights",
                "this model (different backbone, LoRA targets, MoLRE or findings?)")
    with torch.no_grad():
        for name in set(targets) & set(state):
            targets[name].copy_(state[name])


def full_state_dict(model: HeadCTClassifier) -> dict[str, torch.Tensor]:
    """Every weight, frozen backbone included (for self-contained tiny/random-backbone bundles)."""
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def load_full_state_dict(model: HeadCTClassifier, state: dict[str, torch.Tensor], strict: bool = True, *,
                         assign: bool = False) -> None:
    """Load weights saved by `full_state_dict`; names and shapes are checked before anything is copied.
    ``assign``: the tensors of ``state`` become the model's (no copy; for a model built under
    meta_init.parameters_on_meta)."""
    expected = model.state_dict()
    _check_fits(expected, state, strict, "Model weights",
                "this architecture (different backbone family/size, LoRA, MoLRE or findings?)")
    if assign:
        from .meta_init import assign_state_dict

        assign_state_dict(model, {k: v for k, v in state.items() if k in expected})
        return
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _head_parameters(model: HeadCTClassifier) -> list[nn.Parameter]:
    modules = [model.classifier] + ([model.pool] if model.pool is not None else [])
    return [p for module in modules for p in module.parameters()]


def _adapter_parameters(model: HeadCTClassifier) -> list[nn.Parameter]:
    lora = [p for name, p in model.encoder.named_parameters() if p.requires_grad and "lora_" in name]
    molre = list(model.molre.parameters()) if model.molre is not None else []
    return lora + molre


def count_parameters(model: HeadCTClassifier) -> dict[str, int]:
    """Parameter counts: total (frozen backbone included), trainable, and its parts molre / lora / head."""
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    return {
        "total": count(model.parameters()),
        "trainable": count(p for p in model.parameters() if p.requires_grad),
        "molre": count(model.molre.parameters()) if model.molre is not None else 0,
        "lora": count(p for name, p in model.encoder.named_parameters() if "lora_" in name),
        "head": count(_head_parameters(model)),
    }


def param_groups(model: HeadCTClassifier, lr_heads: float = 1e-3, lr_adapters: float = 1e-4,
                 lr_backbone: float = 1e-4) -> list[dict[str, Any]]:
    """AdamW parameter groups: "heads" (pooling + classifier), "adapters" (LoRA + MoLRE) and, only after
    `unfreeze_backbone`, "backbone" (the backbone's own weights at ``lr_backbone``)."""
    groups = [
        {"name": "heads", "params": _head_parameters(model), "lr": lr_heads},
        {"name": "adapters", "params": _adapter_parameters(model), "lr": lr_adapters},
    ]
    backbone = [p for name, p in model.named_parameters() if p.requires_grad and _is_backbone_base(name)]
    if backbone:
        groups.append({"name": "backbone", "params": backbone, "lr": lr_backbone})
    grouped = {id(p) for group in groups for p in group["params"]}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise RuntimeError(f"Trainable parameters outside the optimiser groups: {_short(stray)}.")
    return groups
