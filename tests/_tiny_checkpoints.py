"""Tiny Llama-shaped HF checkpoints for the merge tests, written with safetensors' own writer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_tensors(seed: int, *, layers: int = 3, hidden: int = 24, vocab: int = 37, dtype=torch.bfloat16,
                  base: dict | None = None, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random Llama tensors; with `base`, base + a random delta of size `scale` (a fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    inter = hidden * 2 + 3  # odd sizes
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 2, hidden),
                       p + "self_attn.v_proj.weight": (hidden // 2, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        value = noise if base is None else base[name].double() + scale * noise
        out[name] = value.to(dtype)
    out["model.position_ids"] = torch.arange(7, dtype=torch.int64).reshape(1, 7)  # a non-floating buffer
    return out


def llama_config(layers: int, hidden: int, vocab: int, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": dtype}


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, reverse: bool = False,
                     layers: int = 3, hidden: int = 24, vocab: int = 37, tokenizer: str | None = "tok") -> Path:
    """An HF model directory: one model.safetensors, or `shards` files + index (tensors dealt
    round-robin, in reverse order when asked, so the layout differs from ours)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors, reverse=reverse)
    dtype = str(tensors[names[0]].dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(llama_config(layers, hidden, vocab, dtype)))
    if tokenizer is not None:
        (directory / "tokenizer.json").write_text(json.dumps({"model": tokenizer}))
        (directory / "tokenizer_config.json").write_text(json.dumps({"name": tokenizer}))
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    files = [f"weights-{k}.safetensors" for k in range(shards)]
    weight_map = {n: files[i % shards] for i, n in enumerate(names)}
    for f in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == f}, str(directory / f), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def hf_llama_config(layers: int, hidden: int, vocab: int, dtype: str) -> dict:
    """llama_config plus what transformers' LlamaConfig validates (mergekit loads it with
    AutoConfig): head counts that fit llama_tensors' shapes (k/v are hidden // 2 rows, so 4
    query heads and 2 key/value heads of hidden // 4) and the odd intermediate size."""
    if hidden % 4:
        raise ValueError(f"hidden must be a multiple of 4, got {hidden}")
    return {**llama_config(layers, hidden, vocab, dtype), "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": hidden // 4, "intermediate_size": hidden * 2 + 3, "tie_word_embeddings": False}


def write_hf_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], *, layers: int = 3, hidden: int = 24,
                        vocab: int = 37, **kwargs) -> Path:
    """write_checkpoint with hf_llama_config's config.json, for tools that build the model's
    config with transformers (mergekit)."""
    write_checkpoint(directory, tensors, layers=layers, hidden=hidden, vocab=vocab, **kwargs)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf_llama_config(layers, hidden, vocab, dtype)))
    return directory
