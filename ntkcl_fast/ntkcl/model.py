"""The NTK-CL learner: PEFT modules on a frozen ViT, the loss, the per-task steps, evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ema import ModelEMA
from . import losses
from .peft import AttentionFusion, ChannelAdapter, CosineLinear, PatchPrompt, reweighted_cosine

RESIDUALS = ("signed_sum", "sumsq", "projection")


@dataclass
class NTKCLConfig:
    """Every weight and switch of the method; defaults are the official ones (see the package doc)."""
    bottleneck: int = 16           # channel adapter width (768 -> 16 -> 768)
    adapter_scale: float = 0.1
    num_prompts: int = 10
    prompt_scale: float = 0.1
    dropout: float = 0.1           # adapter and fusion dropout
    fusion_heads: int = 8
    ce_weights: tuple = (1.0, 1.0, 1.0)  # f_ch, f_pa, f_mix
    nce_weight: float = 0.2        # official default (0.03 for CIFAR-100)
    nce_temperature: float = 0.1
    contrastive_sign: float = -1.0  # official: the term is subtracted; +1.0 adds it (InfoNCE-style)
    dis_weight: float = 1e-4       # projection residual weight
    residual: str = "signed_sum"   # official; "sumsq" or "projection" are the conventional variants
    basis_rank: int = 40
    reg_weight: float = 1e-3       # L2 anchor to the previous task's PEFT weights
    alpha: float = 0.1             # eval weight of the current-PEFT feature section
    gamma: float = 0.3             # eval weight of the EMA-PEFT feature section
    ema_after_last_task: bool = False  # the official code skips the EMA update after the last task
    fused: bool = True             # ntkcl_fast ops (True) or eager PyTorch (False) for the regularizers

    def __post_init__(self):
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")


class NTKCL(nn.Module):
    """NTK-CL on a frozen class-token ViT with timm parameter names.

    Usage per task ``t`` with class list ``classes``::

        learner.begin_task(classes)
        for x, y in batches: loss, parts = learner.loss(x, y); ...optimizer step...
        learner.end_task(prototype_batches)
    """

    def __init__(self, backbone: nn.Module, config: NTKCLConfig | None = None):
        super().__init__()
        self.cfg = config or NTKCLConfig()
        cfg = self.cfg
        self.backbone = backbone.requires_grad_(False).eval()
        dim, n_tok, depth = backbone.embed_dim, backbone.num_tokens, len(backbone.blocks)
        self.feature_dim = 2 * dim  # [EMA section, current section]
        self.peft = nn.ModuleDict(dict(
            channel=nn.ModuleList(ChannelAdapter(dim, cfg.bottleneck, cfg.adapter_scale, cfg.dropout)
                                  for _ in range(depth)),
            patch=nn.ModuleList(PatchPrompt(dim, n_tok, cfg.num_prompts, cfg.prompt_scale) for _ in range(depth))))
        self.ema = ModelEMA(self.peft, decay=0.0)
        self.fusion = AttentionFusion(self.feature_dim, cfg.fusion_heads, cfg.dropout)
        self.head: CosineLinear | None = None  # per-task cosine classifier with its own learnable scale
        self.register_buffer("prototypes", torch.zeros(0, self.feature_dim))
        self.register_buffer("basis", torch.zeros(self.feature_dim, 0))
        self.task = -1
        self.known = 0      # classes of finished tasks
        self.classes: list[int] = []  # global class ids in order of arrival (index = logit column)
        self.anchors: list[torch.Tensor] = [p.detach().clone() for p in self.anchored_parameters()]

    # ---------------------------------------------------------------- parameters
    def anchored_parameters(self) -> list[nn.Parameter]:
        """The L2-anchored weights: every ``weight`` of the PEFT modules and of the fusion's q/k/v."""
        named = [(n, p) for n, p in self.peft.named_parameters()]
        named += [(n, p) for n, p in self.fusion.named_parameters() if n.split(".")[0] in ("query", "key", "value")]
        return [p for n, p in named if "weight" in n and p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.peft.parameters()) + list(self.fusion.parameters())
        return params + (list(self.head.parameters()) if self.head is not None else [])

    # ---------------------------------------------------------------- features
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Four passes (channel/patch x EMA copy/current) -> f_ch, f_pa [B, 2D]; fusion -> f_mix."""
        bb, ema = self.backbone, self.ema.module
        with torch.no_grad():  # the EMA copy and the backbone are frozen
            ch_ema = bb.forward_features(x, adapters=ema["channel"])
            pa_ema = bb.forward_features(x, prompts=ema["patch"])
        ch = bb.forward_features(x, adapters=self.peft["channel"])
        pa = bb.forward_features(x, prompts=self.peft["patch"])
        f_ch, f_pa = torch.cat((ch_ema, ch), 1), torch.cat((pa_ema, pa), 1)
        return f_ch, f_pa, self.fusion(f_ch, f_pa)

    # ---------------------------------------------------------------- tasks
    def begin_task(self, classes) -> None:
        """New cosine head for ``classes``; zero prototype rows for them; cache the residual basis."""
        classes = [int(c) for c in classes]
        self.task += 1
        self.classes += classes
        dev = self.prototypes.device
        self.head = CosineLinear(self.feature_dim, len(classes)).to(dev)
        self.prototypes = torch.cat((self.prototypes, torch.zeros(len(classes), self.feature_dim, device=dev)))
        # The official basis: all prototype rows (the current task's are still zero), rank 40.
        rank = min(self.cfg.basis_rank, self.feature_dim)
        with torch.no_grad():
            self.basis = losses.prototype_basis(self.prototypes, rank, fused=self.cfg.fused).contiguous()
        self.class_index = torch.full((max(self.classes) + 1,), -1, dtype=torch.long, device=dev)
        self.class_index[torch.tensor(self.classes, device=dev)] = torch.arange(len(self.classes), device=dev)

    def regularizers(self, f_ch, f_pa, f_mix, index, *, fused: bool | None = None) -> dict[str, torch.Tensor]:
        """Contrastive, projection-residual and L2-anchor terms (unweighted); ``index`` = logit column of y."""
        cfg = self.cfg
        fused = cfg.fused if fused is None else fused
        old = self.prototypes[:self.known]
        sel = torch.randperm(old.shape[0], device=old.device)[:f_mix.shape[0]]
        emb = torch.cat((f_mix, old[sel]))
        lab = torch.cat((index, sel))
        nce = losses.ntkcl_contrastive(emb, lab, temperature=cfg.nce_temperature, fused=fused)
        dis = 0.0
        for f in (f_ch, f_pa):
            if cfg.residual == "signed_sum":
                dis = dis + losses.projection_residual(f, self.basis, reduction="sum", fused=fused)
            else:
                sq = losses.projection_residual(f, self.basis, reduction="sumsq", fused=fused)
                # |f|^2 = |f B|^2 + |r|^2 for unit rows, so the energy in the old span is B - sumsq
                dis = dis + (sq if cfg.residual == "sumsq" else f.shape[0] - sq)
        reg = losses.l2_anchor(self.anchored_parameters(), self.anchors, fused=fused)
        fix = lambda v: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # as the official code
        return dict(nce=fix(nce), dis=fix(dis), reg=fix(reg))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch of the current task (``y``: global class ids)."""
        cfg = self.cfg
        f_ch, f_pa, f_mix = self.features(x)
        index = self.class_index[y]
        local = index - self.known
        parts = {f"ce_{k}": F.cross_entropy(self.head(f), local) for k, f in
                 (("ch", f_ch), ("pa", f_pa), ("mix", f_mix))}
        parts.update(self.regularizers(f_ch, f_pa, f_mix, index))
        w = cfg.ce_weights
        total = (w[0] * parts["ce_ch"] + w[1] * parts["ce_pa"] + w[2] * parts["ce_mix"]
                 + cfg.contrastive_sign * cfg.nce_weight * parts["nce"]
                 + cfg.dis_weight * parts["dis"] + cfg.reg_weight * parts["reg"])
        return total, parts

    @torch.no_grad()
    def end_task(self, batches, *, last: bool = False) -> None:
        """EMA of the PEFT modules (mean of end-of-task weights), prototypes, L2 anchors."""
        if not last or self.cfg.ema_after_last_task:
            self.ema.update(self.peft, decay=ModelEMA.task_mean_decay(self.task))
        self.refresh_prototypes(batches)
        self.anchors = [p.detach().clone() for p in self.anchored_parameters()]
        self.known = len(self.classes)

    @torch.no_grad()
    def refresh_prototypes(self, batches) -> None:
        """Class means of f_mix (eval mode) for every class present in ``batches``."""
        was = self.training
        self.eval()
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(self.prototypes.shape[0], device=sums.device)
        for x, y in batches:
            idx = self.class_index[y.to(sums.device)]
            f = self.features(x.to(sums.device))[2]
            sums.index_add_(0, idx, f.to(sums.dtype))
            counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
        seen = counts > 0
        self.prototypes[seen] = sums[seen] / counts[seen, None]
        self.train(was)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Reweighted cosine logits against the prototypes: gamma * cos(EMA part) + alpha * cos(current part)."""
        # The global classifier's scale stays 1 in the official code (only the per-task heads learn theirs).
        return reweighted_cosine(self.features(x)[2], self.prototypes, (self.cfg.gamma, self.cfg.alpha))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        out = torch.tensor(self.classes, device=x.device)[self.logits(x).argmax(1)]
        self.train(was)
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        self.ema.module.eval()
        return self


def make_optimizer(learner: NTKCL, lr: float, epochs: int, weight_decay: float = 5e-4):
    """The official optimizer: SGD (momentum 0.9) with cosine annealing over the task's epochs."""
    opt = torch.optim.SGD(learner.trainable_parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
