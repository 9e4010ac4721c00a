"""Read a timm VisionTransformer layer by layer: embedding, block outputs, final features and head.

States follow the Raptor notation: a_0 is the embedding output (patch embedding, cls and register
tokens, position embedding, pre-norm), a_l is the output of block l, before the final norm.
Tokens are ordered cls, registers, patches, as timm stores them.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def check_vit(model: nn.Module, name: str = "teacher") -> VisionTransformer:
    """Return `model` when it is a timm VisionTransformer with a cls token, else raise a one-line error."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer: Raptor reads per-layer "
            "tokens of a "
            "ViT, so pick a ViT model (e.g. vit_small_patch14_reg4_dinov2) or a checkpoint of the vit task."
        )
    if model.cls_token is None:
        raise TypeError(f"{name} has no cls token: use a ViT built with class_token=True.")
    return model


def embed(model: VisionTransformer, images: Tensor) -> Tensor:
    """Return a_0 (B, N, D): the tokens that enter the first block."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def run_blocks(model: VisionTransformer, state: Tensor, start: int, end: int) -> list[Tensor]:
    """Apply blocks start+1..end to a_start and return [a_start+1, ..., a_end]."""
    states = []
    for block in model.blocks[start:end]:
        state = block(state)
        states.append(state)
    return states


def hidden_states(model: VisionTransformer, images: Tensor, upto: int | None = None) -> list[Tensor]:
    """Return [a_0, a_1, ..., a_upto] (default upto = depth)."""
    upto = len(model.blocks) if upto is None else upto
    a0 = embed(model, images)
    return [a0, *run_blocks(model, a0, 0, upto)]


def token_groups(model: VisionTransformer, n_tokens: int) -> dict[str, Tensor]:
    """Return the token indices of the cls token, the registers and the patches."""
    n_reg = model.num_reg_tokens
    return {
        "cls": torch.tensor([0]),
        "reg": torch.arange(1, 1 + n_reg),
        "patch": torch.arange(1 + n_reg, n_tokens),
    }


def probe_features(model: VisionTransformer, state: Tensor) -> Tensor:
    """Return [cls ; mean patch] after the final norm, the linear-probe feature (B, 2D)."""
    normed = model.norm(state)
    patches = normed[:, model.num_prefix_tokens :]
    return torch.cat([normed[:, 0], patches.mean(dim=1)], dim=-1)


def head_logits(model: VisionTransformer, state: Tensor) -> Tensor:
    """Return the model's own class logits from a last-layer state (final norm, pooling, head)."""
    return model.forward_head(model.norm(state))


def depth(model: VisionTransformer) -> int:
    return len(model.blocks)
