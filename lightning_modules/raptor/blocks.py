"""Raptor blocks: pre-norm transformer blocks with LayerScale and multiplicative depth conditioning.

A block is applied once per layer of its phase; `t` is the absolute 1-based index of the layer it
produces, fed raw (not normalised) to a small MLP that scales channels:
    (s_attn, s_mlp, s_out) = 1 + g(t),  g: 1 -> 16 -> SiLU -> 3d
    x <- x + s_attn * gamma_1 * MHSA(LN_1(x))
    x <- x + s_mlp  * gamma_2 * MLP(LN_2(x))
    out = s_out * x
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DepthScaling = Literal["small", "zero", "none"]


class DepthScale(nn.Module):
    """Per-channel scales (s_attn, s_mlp, s_out) = 1 + g(t) from the raw layer index t.

    init="small" draws the last layer's weight and bias from N(0, 1e-4^2), so every scale starts near 1;
    init="zero" zeroes them, so the block starts exactly unscaled.
    """

    def __init__(self, dim: int, hidden: int = 16, init: Literal["small", "zero"] = "small"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 3 * dim))
        last = self.net[2]
        if init == "zero":
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        else:
            nn.init.normal_(last.weight, std=1e-4)
            nn.init.normal_(last.bias, std=1e-4)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scales = 1.0 + self.net(t.reshape(-1, 1).to(self.net[0].weight.dtype))
        s_attn, s_mlp, s_out = scales[:, None, :].chunk(3, dim=-1)
        return s_attn, s_mlp, s_out


class SwiGLU(nn.Module):
    """W_out(SiLU(u) * v) with [u, v] = W_in x."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden)
        self.w_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        u, v = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(u) * v)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and scaled dot-product attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide the width {dim}: pick a divisor of {dim}."
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = (
            self.qkv(x)
            .reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class RaptorBlock(nn.Module):
    """A pre-norm block trained from scratch, shared by every layer of one phase."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        mlp_ratio: float = 4.0,
        ln_eps: float = 1e-5,
        init_values: float = 1e-5,
        depth_scaling: DepthScaling = "small",
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = SelfAttention(dim, num_heads)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        if mlp == "swiglu":
            self.mlp = SwiGLU(dim, hidden)
        elif mlp == "gelu":
            self.mlp = GeluMLP(dim, hidden)
        else:
            raise ValueError(f"mlp={mlp!r} is invalid: choose swiglu or gelu.")
        self.gamma2 = nn.Parameter(torch.full((dim,), float(init_values)))
        if depth_scaling not in ("small", "zero", "none"):
            raise ValueError(f"depth_scaling={depth_scaling!r} is invalid: choose small, zero or none.")
        self.depth = DepthScale(dim, init=depth_scaling) if depth_scaling != "none" else None

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.depth is None:
            x = x + self.gamma1 * self.attn(self.norm1(x))
            return x + self.gamma2 * self.mlp(self.norm2(x))
        s_attn, s_mlp, s_out = self.depth(t)
        x = x + s_attn * self.gamma1 * self.attn(self.norm1(x))
        x = x + s_mlp * self.gamma2 * self.mlp(self.norm2(x))
        return s_out * x


class TeacherArchBlock(nn.Module):
    """A block of the teacher's own architecture (a copy of one teacher block), ignoring the layer index.

    init="copy" keeps the teacher block's weights; init="random" re-draws them with the block's own
    initialisers (LayerScale keeps the teacher's initial value when the block has one).
    """

    def __init__(self, teacher_block: nn.Module, init: Literal["copy", "random"] = "copy"):
        super().__init__()
        self.block = copy.deepcopy(teacher_block)
        for param in self.block.parameters():
            param.requires_grad_(True)
        if init == "random":
            for module in self.block.modules():
                if module is not self.block and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        elif init != "copy":
            raise ValueError(f"block_init={init!r} is invalid: choose copy or random.")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.block(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
