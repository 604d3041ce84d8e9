"""MoLRE: Mixture of Low-Rank Experts on top of a frozen feature projection.

For a feature x in R^d (one slice embedding, or one volume embedding for 3-D backbones):

    h = W0 x + sum_i g_i(x) * (B_i A_i x + b_i),     g(x) = softmax(W2 relu(W1 x + b1) + b2)

with K experts of rank r (A_i: d -> r without bias, B_i: r -> d with bias b_i), a router MLP of hidden
size d_h, and W0 frozen (the identity unless a projection is given). B_i and b_i start at zero and A_i
random (as peft initialises LoRA), so a fresh MoLRE is exactly W0: adding it to a trained model changes
nothing until it is trained.

Trainable parameters: K (2r + 1) d + (d + 1) d_h + (d_h + 1) K, which with K=6, r=8, d_h=256 gives the
paper's 0.28 M (d=768), 0.37 M (d=1024) and 0.41 M (d=1152).

The paper describes no load-balancing loss; a soft router without one can collapse onto one expert,
so `router_entropy` and `expert_usage` are provided for logging and `load_balance_loss` (a balance of
the mean expert usage over a batch) as an optional auxiliary term, weighted by
``MoLREConfig.load_balance_weight`` (0 by default, as in the paper; training.train adds it to the loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..settings import reject_unknown_settings


@dataclass(frozen=True)
class MoLREConfig:
    """Hyper-parameters of a MoLRE layer (paper: K=6 experts, rank 8, router hidden 256) and the weight
    of its load-balancing term in training (see `load_balance_loss`; 0 = none, the paper's default)."""

    num_experts: int = 6
    rank: int = 8
    router_hidden: int = 256
    load_balance_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_experts", "rank", "router_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoLREConfig.{name} must be a positive integer, got {value!r}.")
        if self.load_balance_weight < 0:
            raise ValueError(
                f"MoLREConfig.load_balance_weight must be >= 0, got {self.load_balance_weight!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoLREConfig":
        reject_unknown_settings(cls, data, "MoLRE")
        return cls(**data)


def molre_parameter_count(dim: int, num_experts: int = 6, rank: int = 8, router_hidden: int = 256) -> int:
    """Trainable parameters of a MoLRE layer on features of size `dim` (W0 frozen, not counted)."""
    experts = num_experts * (2 * rank + 1) * dim
    router = (dim + 1) * router_hidden + (router_hidden + 1) * num_experts
    return experts + router


class LowRankExpert(nn.Module):
    """One expert B A x + b: `down` (A, d -> r, no bias) then `up` (B, r -> d, zero at initialisation)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class MoLRE(nn.Module):
    """Mixture of K low-rank experts added to a frozen projection W0.

    forward(x: (..., d)) -> (h: (..., d), router_weights: (..., K)); router weights sum to 1 over K.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 6,
        rank: int = 8,
        router_hidden: int = 256,
        base_projection: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if base_projection is not None and tuple(base_projection.shape) != (dim, dim):
            raise ValueError(
                f"base_projection must have shape ({dim}, {dim}), got {tuple(base_projection.shape)}."
            )
        self.dim = dim
        self.num_experts = num_experts
        self.rank = rank
        # W0 is frozen: a buffer, never a parameter. None means the identity (no d x d matmul needed).
        self.register_buffer(
            "base_projection",
            None if base_projection is None else base_projection.detach().clone(),
        )
        self.router = nn.Sequential(
            nn.Linear(dim, router_hidden), nn.ReLU(), nn.Linear(router_hidden, num_experts)
        )
        self.experts = nn.ModuleList(LowRankExpert(dim, rank) for _ in range(num_experts))

    @classmethod
    def from_config(
        cls, dim: int, config: MoLREConfig, base_projection: torch.Tensor | None = None
    ) -> "MoLRE":
        return cls(dim, config.num_experts, config.rank, config.router_hidden, base_projection)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoLRE expects features of size {self.dim} in the last axis, got {tuple(x.shape)}.")
        # routing in float32 even under autocast: bf16 softmax gates do not sum to 1 (error ~1e-3)
        router_weights = torch.softmax(self.router(x).float(), dim=-1)
        base = x if self.base_projection is None else F.linear(x, self.base_projection.to(x.dtype))
        expert_outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (..., K, d)
        mixed = (router_weights.unsqueeze(-1).to(expert_outputs.dtype) * expert_outputs).sum(dim=-2)
        return base + mixed, router_weights

    def extra_repr(self) -> str:
        w0 = "identity" if self.base_projection is None else "frozen projection"
        return f"dim={self.dim}, num_experts={self.num_experts}, rank={self.rank}, W0={w0}"


def _valid_router_weights(router_weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Router weights (..., K) of the valid positions only, flattened to (N, K), in float32."""
    flat = router_weights.reshape(-1, router_weights.shape[-1]).float()
    if mask is not None:
        if tuple(mask.shape) != tuple(router_weights.shape[:-1]):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match router weights {tuple(router_weights.shape)}."
            )
        flat = flat[mask.reshape(-1).bool()]
    if flat.shape[0] == 0:
        raise ValueError("No valid positions under the mask: cannot summarise router weights.")
    return flat


def expert_usage(router_weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean gate per expert over valid positions: (K,), sums to 1. Uniform usage is 1/K each.

    router_weights: (..., K); mask: (...) bool, True where the position (slice) is real.
    """
    return _valid_router_weights(router_weights, mask).mean(dim=0)


def router_entropy(router_weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-position routing entropy in nats (0 = hard one-expert routing, log K = uniform)."""
    gates = _valid_router_weights(router_weights, mask)
    return -(gates * torch.log(gates.clamp_min(1e-12))).sum(dim=-1).mean()


def load_balance_loss(router_weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Balance of the MEAN expert usage over a batch: K * sum_i P_i^2 over valid positions.

    P_i is the mean gate of expert i over every valid slice of the batch. The term is 1 when the
    experts are used equally on average and K when one expert takes everything; it constrains only the
    batch mean, so each slice may still route sharply to the expert of its region (the per-slice
    specialisation a soft router is for), unlike a per-slice entropy bonus. Fully differentiable (no
    argmax). Weight ``MoLREConfig.load_balance_weight`` (0 = the paper's unsupervised routing).
    """
    gates = _valid_router_weights(router_weights, mask)
    mean_gate = gates.mean(dim=0)
    return gates.shape[-1] * (mean_gate * mean_gate).sum()


def max_router_entropy(num_experts: int) -> float:
    """Entropy of uniform routing over `num_experts` experts, in nats (for normalised logging)."""
    return math.log(num_experts)
