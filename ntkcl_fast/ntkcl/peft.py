"""NTK-CL's PEFT modules: channel adapter, patch-prompt generator, attention fusion, cosine head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelAdapter(nn.Module):
    """AdaptFormer bottleneck ``scale * up(dropout(relu(down(x))))``; ``up`` starts at zero."""

    def __init__(self, dim: int, bottleneck: int = 16, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.scale, self.dropout = scale, dropout
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down_proj(x)), self.dropout, self.training)
        return self.up_proj(h) * self.scale


class PatchPrompt(nn.Module):
    """Prompt tokens generated from the image tokens: a Linear over the token axis, then LayerNorm.

    ``num_tokens`` is the class token plus the image tokens (197 for ViT-B/16 at 224 px). The
    Linear and the LayerNorm's weight and bias all start at zero, so the prompts start at zero;
    note that with a zero LayerNorm input only the LayerNorm bias receives gradient at first
    (the official initialization, kept as is). From the second block on, the previous block's
    prompts are removed from the sequence and added back, times ``scale``, to the new ones.
    """

    def __init__(self, dim: int, num_tokens: int, num_prompts: int = 10, scale: float = 0.1):
        super().__init__()
        self.num_tokens, self.num_prompts, self.scale = num_tokens, num_prompts, scale
        self.global_patch_prompt = nn.Linear(num_tokens, num_prompts)
        self.prompt_norm = nn.LayerNorm(dim, eps=1e-6)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        residual = None
        if x.shape[1] == self.num_tokens + self.num_prompts:
            residual = x[:, 1:1 + self.num_prompts]
            x = torch.cat((x[:, :1], x[:, 1 + self.num_prompts:]), dim=1)
        prompts = self.prompt_norm(self.global_patch_prompt(x.transpose(1, 2)).transpose(1, 2))
        if residual is not None:
            prompts = prompts + self.scale * residual
        return torch.cat((x[:, :1], prompts, x[:, 1:]), dim=1), self.num_prompts


class AttentionFusion(nn.Module):
    """f_mix = 0.5 * MHA(q = W_q f_pa, k = W_k f_ch, v = W_v f_ch) + f_ch + 0.1 * f_pa.

    Each feature is a single token, so the softmax over one key is 1 and the attention reduces to
    ``dropout(1) * W_v f_ch`` (the query and key weights get no gradient from it; they are kept so
    the module, its L2 anchor and its state dict have the official layout).
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, f_ch: torch.Tensor, f_pa: torch.Tensor) -> torch.Tensor:
        b = f_ch.shape[0]
        q = self.query(f_pa).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(f_ch).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(f_ch).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        attn = self.dropout(torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1))
        fused = (attn @ v).transpose(1, 2).reshape(b, -1)
        return 0.5 * fused + f_ch + 0.1 * f_pa


class CosineLinear(nn.Module):
    """``sigma * cos(x, w_c)`` with a learnable scale ``sigma`` (starts at 1)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sigma = nn.Parameter(torch.ones(1))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def reweighted_cosine(x: torch.Tensor, weight: torch.Tensor, multipliers, sigma=1.0) -> torch.Tensor:
    """``sigma * sum_s m_s * cos(x_s, w_s)`` over equal feature sections s (the official eval logits)."""
    n = len(multipliers)
    xs, ws = x.chunk(n, dim=1), weight.chunk(n, dim=1)
    out = sum(m * F.linear(F.normalize(a, dim=1), F.normalize(w, dim=1)) for m, a, w in zip(multipliers, xs, ws))
    return sigma * out
