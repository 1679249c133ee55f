"""A small pure-PyTorch Vision Transformer with timm's parameter names.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.norm2``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``, ``head``), so a timm
state dict of a class-token ViT loads with ``load_state_dict`` and nothing here needs timm
(which pulls torchvision, whose build may not match the installed torch).

Every block can run one of NTK-CL's two PEFT modules (see ``peft.py``):

- ``mode="channel"``: an AdaptFormer adapter in parallel with the MLP, fed the token after the
  attention residual: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x)) + adapter(x)``;
- ``mode="patch"``: after the attention residual, the patch-prompt generator maps the image
  tokens to prompt tokens inserted after the class token; the MLP runs over all tokens and
  the residual is added to the class and image tokens only (prompt tokens carry none; the
  previous block's prompts enter the new ones through the generator's own residual).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, adapter: nn.Module | None = None, prompt: nn.Module | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if prompt is not None:
            x, n_prompt = prompt(x)  # class token, prompt tokens, image tokens
            out = self.mlp(self.norm2(x))
            keep = torch.ones(x.shape[1], 1, dtype=x.dtype, device=x.device)
            keep[1:1 + n_prompt] = 0  # prompt tokens carry no residual
            return out + x * keep
        out = x + self.mlp(self.norm2(x))
        if adapter is not None:
            out = out + adapter(x)
        return out


class VisionTransformer(nn.Module):
    """Class-token ViT (timm names). ``num_classes=0`` gives an identity head."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor, adapters=None, prompts=None, *, tokens: bool = False) -> torch.Tensor:
        """Final-norm class token (all tokens when ``tokens``); ``adapters``/``prompts``: one module per block."""
        x = self.embed(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, adapters[i] if adapters is not None else None, prompts[i] if prompts is not None else None)
        x = self.norm(x)
        return x if tokens else x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
