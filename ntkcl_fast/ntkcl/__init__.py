"""NTK-CL end to end (Liu et al., 2024, "Parameter-Efficient Fine-Tuning for Continual Learning:
A Neural Tangent Kernel Perspective"), with the regularizers and parameter averaging on
ntkcl_fast's ops.

What is here (our own code, written from the paper's description and from the behaviour of the
authors' public implementation as described in the project's issue; where that description
left a detail open, the choice below is our reading and is marked so):

- ``vit.VisionTransformer``: a small pure-PyTorch class-token ViT with timm parameter names.
- ``peft``: per block an AdaptFormer channel adapter (D -> 16 -> D, ReLU, dropout 0.1, scale
  0.1, up-projection zero-initialized) run in parallel with the MLP, and a patch-prompt
  generator (Linear over the class + image tokens to 10 prompt tokens, LayerNorm; Linear and
  LayerNorm zero-initialized) whose prompts are inserted after the class token; the attention
  fusion ``0.5 * attn + f_ch + 0.1 * f_pa``; a cosine classifier with a learnable scale.
- ``model.NTKCL``: four passes per step (channel / patch x EMA copy / current PEFT modules),
  giving ``f_ch = [ch_ema, ch_cur]``, ``f_pa = [pa_ema, pa_cur]`` and ``f_mix = fusion(f_ch, f_pa)``;
  the loss

      CE(f_ch) + CE(f_pa) + CE(f_mix)                  (per-task cosine head, local labels)
      - 0.2 * contrastive([f_mix; sampled old prototypes], labels)      (temperature 0.1)
      + 1e-4 * (residual(f_ch) + residual(f_pa))       (basis: prototype_basis(prototypes, 40))
      + 1e-3 * L2(PEFT weights and fusion q/k/v weights, their values at the previous task's end)

  with every weight in ``NTKCLConfig``. Non-finite regularizer values are replaced by 0, as
  the official code does (the contrastive term is +inf when no two rows share a label).
  After each task but the last: EMA of the PEFT modules with
  ``ModelEMA.task_mean_decay(t)`` (the mean of the end-of-task weights); then the class-mean
  prototypes of ``f_mix`` and the L2 anchors are refreshed. Evaluation: cosine logits against
  the prototypes, reweighted per feature section (0.3 for the EMA part, 0.1 for the current part).
- ``metrics``: A_T, average incremental accuracy, forgetting from the accuracy matrix.

Official choices that look surprising, kept as defaults, with the conventional variants:

- The projection residual enters as a signed sum ``sum(f - f B B^T)`` (``residual="signed_sum"``):
  its gradient is a fixed direction per row, not a pull toward or away from the old
  prototypes' span. ``residual="sumsq"`` uses ``|f - f B B^T|^2`` and ``residual="projection"``
  penalizes the energy inside the old span ``|f B|^2`` (what "orthogonal to old tasks" usually
  means). The basis is ``U[:, :40]`` of the SVD of all prototype rows, which includes the
  current task's (still zero) rows, so for fewer than 40 old classes it also holds arbitrary
  null-space directions; kept as is.
- The contrastive (mutual-information) term is subtracted (``contrastive_sign=-1``);
  ``contrastive_sign=+1`` adds it, as an InfoNCE loss normally is.
- The EMA copy is not updated after the last task (``ema_after_last_task=False``).
- The patch-prompt LayerNorm starts with zero weight, so at first only its bias learns.

Our readings (not settled by the description): the per-task cosine head starts with uniform
weights and scale 1; old prototypes are sampled without replacement, at most one batch's worth;
the frozen backbone and EMA passes run without autograd.

``fused=True`` (default) computes the regularizers with ntkcl_fast's ops, ``fused=False`` with
the same math in eager PyTorch (``losses``).
"""
from .metrics import average_incremental_accuracy, final_accuracy, forgetting, summary
from .model import NTKCL, NTKCLConfig, make_optimizer
from .peft import AttentionFusion, ChannelAdapter, CosineLinear, PatchPrompt, reweighted_cosine
from .vit import VisionTransformer

__all__ = ["AttentionFusion", "ChannelAdapter", "CosineLinear", "NTKCL", "NTKCLConfig", "PatchPrompt",
           "VisionTransformer", "average_incremental_accuracy", "final_accuracy", "forgetting",
           "make_optimizer", "reweighted_cosine", "summary"]
