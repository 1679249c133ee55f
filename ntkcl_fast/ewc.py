"""`EWC`: elastic weight consolidation (and L2-SP) over a chosen set of parameters.

One fused `l2_penalty` call per device for every term, one fused `fisher_accumulate_` call per
gradient. The `convention` switch reproduces the formulas of the libraries people compare
against (defaults only; every keyword given explicitly wins):

========================== ==========================================================================
convention                 formula
========================== ==========================================================================
``"ntkcl_fast"``           penalty ``lam * sum_t sum F_t (p - a_t)^2``; Fisher = mean over batches of
 (default)                 the squared mini-batch gradient of the mean cross-entropy with the true
                           labels; online ``F <- decay * F + F_new``.
``"avalanche"``            Avalanche ``EWCPlugin``: penalty ``lam * sum_t sum F_t (p - a_t)^2`` (no 1/2);
                           ``F = sum_batches g_b^2 / num_batches`` (true labels, mini-batch gradient of
                           the mean loss); online ``F <- decay_factor * F + F_new``, anchor = last task.
``"pycil"``                PyCIL ``EWC``: penalty ``lam * sum F (p - a)^2 / 2``; ``F = min(sum_b g_b^2 /
                           num_batches, fisher_max)`` (fisher_max = 1e-4); the merge is
                           ``F <- alpha * F + (1 - alpha) * F_new`` with ``alpha = known/total classes``
                           (pass it as ``decay``); anchor = last task.
``"mammoth"``              mammoth ``EwcOn``: penalty ``lam * sum F (p - a)^2``; per-sample gradients of
                           ``log p(y|x)`` (true label) weighted by ``p(y|x)``, summed and divided by
                           ``num_batches * batch_size``; online ``F <- gamma * F + F_new``.
``"clb"``                  Continual-Learning-Benchmark ``EWC`` / ``EWC_online``: penalty
                           ``lam * sum_t sum F_t (p - a_t)^2``; labels = argmax of the model's own
                           prediction; ``F = sum_b g_b^2 * B_b / num_batches`` (mini-batch gradient of
                           the mean loss); online ``F <- F + F_new`` (one slot), separate: one term per task.
========================== ==========================================================================
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as nnf

from . import _validate, distributed
from .penalty import fisher_accumulate_, l2_penalty, l2_penalty_grad_

CONVENTIONS = {
    #              half   mode        labels    per_sample prob_weight batch_norm   fisher_max  merge
    "ntkcl_fast": (False, "separate", "true",   False,     False,      "batches",   None,       "decay"),
    "avalanche":  (False, "separate", "true",   False,     False,      "batches",   None,       "decay"),
    "pycil":      (True,  "online",   "true",   False,     False,      "batches",   1e-4,       "convex"),
    "mammoth":    (False, "online",   "true",   True,      True,       "samples",   None,       "decay"),
    "clb":        (False, "separate", "argmax", False,     False,      "weighted",  None,       "decay"),
}
LABELS = ("true", "argmax", "expected")


class EWC:
    """EWC / L2-SP penalty on the parameters of `model` whose names match `params`.

    - `params`: None (all parameters that require grad), a regex string or a list of regexes
      (`re.search` on the parameter name, e.g. ``r"attn\\.qkv"``).
    - `anchor_to_current()` anchors to the current weights with importance 1: plain L2-SP
      toward the pre-trained weights. `consolidate(batches)` computes the diagonal Fisher at
      the current weights and anchors there (EWC).
    - `mode`: ``"separate"`` keeps one (anchor, Fisher) term per consolidation; ``"online"``
      keeps one, merged with `decay`.
    - `labels`: ``"true"`` (empirical Fisher), ``"argmax"`` (the model's prediction) or
      ``"expected"`` (the true Fisher: every class weighted by its predicted probability).
    - `per_sample`: per-sample gradients with torch.func instead of one gradient per batch.
    - A selected parameter that grows along one dimension (a classifier head that gains classes,
      as Avalanche's `IncrementalClassifier`) keeps its terms: the stored anchors and importances
      are padded with zeros to the new shape, as Avalanche's `ParamData.expand` does.
    """

    def __init__(self, model: torch.nn.Module, *, lam: float = 1.0, params=None, mode: str | None = None,
                 decay: float = 1.0, convention: str = "ntkcl_fast", labels: str | None = None,
                 per_sample: bool | None = None, fisher_max: float | None = None,
                 logits_fn: Callable | None = None, backend: str = "auto"):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
        half, c_mode, c_labels, c_per_sample, prob_weight, batch_norm, c_max, merge = CONVENTIONS[convention]
        self.convention = convention
        self.model = model
        self.lam = _validate.finite_float(lam, "lam")
        self.half = half
        self.mode = c_mode if mode is None else mode
        if self.mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {self.mode!r}")
        self.decay = _validate.finite_float(decay, "decay", nonnegative=True)
        self.labels = c_labels if labels is None else labels
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        self.per_sample = c_per_sample if per_sample is None else bool(per_sample)
        if self.labels == "expected" and per_sample is None:
            self.per_sample = True
        if self.labels == "expected" and not self.per_sample:
            raise ValueError("labels='expected' weights each sample's per-class gradients: it needs per_sample=True")
        self.prob_weight = prob_weight
        self.batch_norm = batch_norm
        self.fisher_max = c_max if fisher_max is None else _validate.finite_float(fisher_max, "fisher_max")
        self.merge = merge
        self.logits_fn = logits_fn or (lambda out: out)
        self.backend = backend
        self.names = self._select(params)
        self._fsdp = distributed.fsdp_params(model, self.names)  # (selected, every) sharded params, or None
        self.terms: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # EWC (anchors, Fisher)
        self.l2sp: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # anchor_to_current()

    def _select(self, params) -> list[str]:
        named = dict(self.model.named_parameters())
        if params is None:
            return [n for n, p in named.items() if p.requires_grad]
        patterns = [params] if isinstance(params, str) else list(params)
        compiled = []
        for i, pat in enumerate(patterns):
            if not isinstance(pat, str):
                raise TypeError(f"params[{i}] must be a regex string, got {type(pat).__name__}")
            try:
                compiled.append(re.compile(pat))
            except re.error as exc:
                label = "params" if isinstance(params, str) else f"params[{i}]"
                raise ValueError(f"{label} is not a valid regular expression ({pat!r}: {exc})") from None
        names = [n for n, p in named.items() if p.requires_grad and any(c.search(n) for c in compiled)]
        if not names:
            raise ValueError(f"params {patterns!r} match no trainable parameter of the model")
        return names

    def parameters(self) -> list[torch.nn.Parameter]:
        if self._fsdp is not None:
            return list(self._fsdp[0])
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    # ------------------------------------------------------------------ anchors and terms
    @torch.no_grad()
    def anchor_to_current(self, importance: float = 1.0) -> None:
        """L2-SP: anchors = the current weights (e.g. pre-trained) with a constant importance.

        Kept apart from the EWC terms (never merged with a Fisher in online mode); a second call
        replaces it."""
        params = self.parameters()
        anchors = [p.detach().clone() for p in params]
        imp = [torch.full_like(p, importance, dtype=torch.float32) for p in params]
        self.l2sp = (anchors, imp)

    def _grown(self, params) -> None:
        """Pads every stored anchor and importance with zeros to its parameter's current shape, as
        Avalanche's `ParamData.expand` does when a classifier head grows: the new rows carry no
        importance, so they are not pulled. One dimension may grow; none may shrink."""
        for term in self._all_terms():
            for store in term:
                for i, (p, t) in enumerate(zip(params, store)):
                    if t.shape != p.shape:
                        store[i] = _expand(t, p.shape, self.names[i])

    def _add_term(self, anchors, importance, *, decay: float | None = None) -> None:
        self._grown(self.parameters())
        if self.mode == "separate" or not self.terms:
            if self.mode == "online":
                self.terms = [(anchors, importance)]
            else:
                self.terms.append((anchors, importance))
            return
        old = self.terms[0][1]
        d = self.decay if decay is None else decay
        if self.merge == "convex":  # PyCIL: alpha * F_old + (1 - alpha) * F_new
            for new, prev in zip(importance, old):
                new.mul_(1 - d).add_(prev, alpha=d)
        else:  # decay * F_old + F_new
            for new, prev in zip(importance, old):
                new.add_(prev, alpha=d)
        self.terms = [(anchors, importance)]

    # ------------------------------------------------------------------ Fisher
    def _grads(self, x, y) -> tuple[list[list[torch.Tensor]], list[float]]:
        """(list of gradient lists, their weights) for one batch, before the batch normalization."""
        params = self.parameters()
        if not self.per_sample:
            logits = self.logits_fn(self.model(x))
            target = self._target(logits, y)
            loss = nnf.cross_entropy(logits, target)
            if self._fsdp is not None:
                return [distributed.fsdp_batch_grads(self._fsdp[1], params, loss)], [1.0]
            return [list(torch.autograd.grad(loss, params))], [1.0]
        return self._per_sample_grads(x, y)

    def _target(self, logits, y):
        if self.labels == "argmax":
            return logits.detach().argmax(-1)
        return y

    def _per_sample_grads(self, x, y):
        from torch.func import functional_call, grad, vmap
        params = {n: p.detach() for n, p in zip(self.names, self.parameters())}
        fixed = {n: t for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                 if n not in params}
        model, logits_fn = self.model, self.logits_fn

        def logp(p, xi, c):
            out = logits_fn(functional_call(model, (p, fixed), (xi.unsqueeze(0),)))
            return torch.log_softmax(out, -1)[0].gather(0, c.reshape(1))[0]

        with torch.no_grad():
            logits = logits_fn(model(x))
            probs = logits.softmax(-1)
        out, weights = [], []
        if self.labels == "expected":
            classes = range(logits.shape[-1])
            targets = [torch.full((x.shape[0],), c, dtype=torch.long, device=x.device) for c in classes]
        else:
            targets = [self._target(logits, y)]
        for target in targets:
            g = vmap(grad(logp), in_dims=(None, 0, 0))(params, x, target)
            w = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            use_w = self.prob_weight or self.labels == "expected"
            for b in range(x.shape[0]):
                out.append([g[n][b] for n in self.names])
                weights.append(float(w[b]) if use_w else 1.0)
        return out, weights

    def consolidate(self, batches: Iterable, *, decay: float | None = None) -> list[torch.Tensor]:
        """Diagonal Fisher at the current weights from `(inputs, targets)` batches; anchors here.

        Returns the new Fisher (one fp32 tensor per selected parameter), after the merge.

        On an FSDP2-sharded model every rank passes its own part of each batch, all parts of one
        size; the Fisher (sharded DTensors, like the anchors) is then the one of the batches made by
        joining the ranks' parts in rank order. The gradients come from FSDP2's backward (its
        `.grad`s are left as they were); the only collective added is one all-reduce of the batch
        sizes, to check them. Per-sample gradients would need unsharded parameters:
        `per_sample=True` raises NotImplementedError there.
        """
        params = self.parameters()
        ranks = 1
        if self._fsdp is not None:
            if self.per_sample:
                raise NotImplementedError("per_sample=True (labels='expected', the 'mammoth' convention) on an FSDP2 "
                                          "model: per-sample gradients need the unsharded parameters; pass "
                                          "per_sample=False")
            ranks, _ = distributed.data_parallel_size(params)
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        was_training = self.model.training
        self.model.eval()
        num_batches = 0
        batch_weights = []
        try:
            for x, y in batches:
                num_batches += 1
                grads, weights = self._grads(x, y)
                scale_b = x.shape[0] * ranks if self.batch_norm == "weighted" else 1.0
                for g, w in zip(grads, weights):
                    fisher_accumulate_(fisher, [t.detach() for t in g], scale=w * scale_b, backend=self.backend)
                batch_weights.append(x.shape[0] * ranks)
        finally:
            self.model.train(was_training)
        if num_batches == 0:
            raise ValueError("batches is empty: the Fisher needs at least one batch")
        if self._fsdp is not None:
            distributed.check_equal_batch_sizes([w // ranks for w in batch_weights], params)
        with torch.no_grad():
            if self.batch_norm == "samples":  # mammoth: num_batches * batch_size
                denom = num_batches * batch_weights[0]
            else:
                denom = num_batches
            for f in fisher:
                f.div_(denom)
                if self.fisher_max is not None:
                    f.clamp_(max=self.fisher_max)
        anchors = [p.detach().clone() for p in params]
        self._add_term(anchors, fisher, decay=None if decay is None else _validate.finite_float(decay, "decay"))
        return self.terms[-1][1]

    # ------------------------------------------------------------------ penalty
    def _lists(self):
        params = self.parameters()
        self._grown(params)
        p, a, f = [], [], []
        for anchors, importance in self._all_terms():
            p += params
            a += anchors
            f += importance
        return p, a, f

    def penalty(self) -> torch.Tensor:
        """`lam * c * sum_terms sum F (p - a)^2` (0-d fp32, differentiable), 0 before any term."""
        if not self._all_terms():
            return torch.zeros((), dtype=torch.float32, device=self._device())
        p, a, f = self._lists()
        return l2_penalty(p, a, f, lam=self.lam, half=self.half, backend=self.backend)

    def penalty_grad_(self) -> torch.Tensor:
        """Adds the penalty's gradient into `.grad` of the selected parameters; returns the value."""
        if not self._all_terms():
            return torch.zeros((), dtype=torch.float32, device=self._device())
        p, a, f = self._lists()  # a param listed once per term gets each term's gradient added
        return l2_penalty_grad_(p, a, f, lam=self.lam, half=self.half, backend=self.backend)

    def _all_terms(self):
        return ([self.l2sp] if self.l2sp is not None else []) + self.terms

    def _device(self) -> torch.device:
        params = self.parameters()
        return params[0].device if params else torch.device("cpu")


def _expand(t: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    grown = [d for d, (new, old) in enumerate(zip(shape, t.shape)) if new != old]
    if len(shape) != t.dim() or len(grown) > 1 or any(new < old for new, old in zip(shape, t.shape)):
        raise ValueError(f"parameter {name!r} changed shape from {tuple(t.shape)} to {tuple(shape)}: EWC follows "
                         f"a parameter that grows along one dimension (a classifier head), not other changes")
    out = t.new_zeros(shape)
    out[tuple(slice(n) for n in t.shape)] = t
    return out
