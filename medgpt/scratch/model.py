"""Architectures for from-scratch pretraining: a small `--arch.*` section -> a random-init llama or qwen2.

    medgpt pt configs/tiny/pt_scratch.yaml --model.init llama --arch.hidden_size 256 --arch.num_layers 4 ...

The model is a stock transformers LlamaForCausalLM / Qwen2ForCausalLM built with `from_config`, so the output
is a standard HF model dir that every other stage, vLLM and the llama.cpp converters load without custom code.
(The two differ in little but qwen2's bias on the q/k/v projections.)

Also here, for the model-FLOPs-utilisation estimate: the FLOPs a token costs (PaLM, appendix B) and the matmul
peak of this machine, measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medgpt.config import arg
from medgpt.utils import MedGPTError

INITS = ("llama", "qwen2")


@dataclass
class ArchArgs:
    hidden_size: int = arg(256, "Width of the residual stream (d_model).", min=1)
    num_layers: int = arg(4, "Transformer blocks.", min=1)
    num_heads: int = arg(4, "Attention (query) heads; hidden_size must be divisible by it.", min=1)
    num_kv_heads: int = arg(2, "Key/value heads (grouped-query attention); must divide num_heads. Equal to "
                            "num_heads for plain multi-head attention.", min=1)
    intermediate_size: Optional[int] = arg(None, "Width of the SwiGLU MLP. Default: 8/3 x hidden_size rounded up "
                                           "to a multiple of 64 (the same parameters as a 4x GELU MLP).", min=1)
    max_position_embeddings: Optional[int] = arg(None, "Context length the model is built for. Default: "
                                                 "--train.max_length.", min=1)
    rope_theta: float = arg(10000.0, "RoPE base frequency (raise it, e.g. to 1e6, for long contexts).", above=0)
    tie_embeddings: bool = arg(True, "Share the input embedding with the output head. In a small model the "
                               "embedding table is a large share of the weights; tying halves it.")


def default_intermediate(hidden: int) -> int:
    """8/3 x hidden, rounded up to a multiple of 64 (as LLaMA does for SwiGLU)."""
    return -(-8 * hidden // (3 * 64)) * 64


def check_arch(arch: ArchArgs) -> None:
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(arch, name) <= 0:
            raise MedGPTError(f"--arch.{name} is {getattr(arch, name)}; it must be a positive number.")
    if arch.hidden_size % arch.num_heads:
        raise MedGPTError(f"--arch.hidden_size {arch.hidden_size} is not divisible by --arch.num_heads "
                          f"{arch.num_heads}: every head gets hidden_size / num_heads dimensions. Change one of them.")
    if arch.num_heads % arch.num_kv_heads:
        raise MedGPTError(f"--arch.num_kv_heads {arch.num_kv_heads} does not divide --arch.num_heads "
                          f"{arch.num_heads}: each key/value head serves a whole group of query heads.")
    if (arch.hidden_size // arch.num_heads) % 2:
        raise MedGPTError(f"the head size hidden_size / num_heads = {arch.hidden_size // arch.num_heads} is odd; "
                          f"RoPE rotates pairs of dimensions, so it must be even. Change --arch.num_heads.")


def model_config(init: str, arch: ArchArgs, vocab_size: int, context: int, eos_token_id: int,
                 pad_token_id: int | None = None, bos_token_id: int | None = None):
    """A transformers LlamaConfig or Qwen2Config for `init`, from the --arch.* options."""
    from transformers import LlamaConfig, Qwen2Config

    if init not in INITS:
        raise MedGPTError(f"--model.init {init!r} is not a known architecture; use one of: {', '.join(INITS)}.")
    check_arch(arch)
    cls = LlamaConfig if init == "llama" else Qwen2Config
    config = cls(
        vocab_size=vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size or default_intermediate(arch.hidden_size),
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rope_theta)},
        tie_word_embeddings=arch.tie_embeddings, rms_norm_eps=1e-6, initializer_range=0.02,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
    )
    # transformers 5 keeps the base in rope_parameters only; older readers of config.json (vLLM, the llama.cpp
    # converters) look for the top-level key, so write both (transformers reads rope_parameters back).
    config.rope_theta = float(arch.rope_theta)
    return config


def build_model(config, seed: int):
    """A random-init causal LM from `config`; the same seed gives the same weights. float32 master weights
    (mixed precision is autocast in the training loop)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_counts(model) -> dict[str, int]:
    """total (tied weights once), embedding (the input table) and matmul (every weight a token multiplies
    through: all but the input embedding lookup; a tied output head counts, since its matmul is real work)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"total": total, "embedding": embedding, "matmul": total if tied else total - embedding}


def flops_per_token(matmul_params: int, num_layers: int, hidden_size: int, context: int) -> int:
    """Training FLOPs per token, PaLM appendix B (https://arxiv.org/abs/2204.02311): 6N for the weights
    (2 forward + 4 backward per multiply-add) plus 12·L·h·T for attention scores and values over a context T.

    N counts every weight a token multiplies through, the output head included (as nanoGPT's estimate_mfu does;
    the input embedding is a lookup and costs nothing). In a small model the head is a large share of the work,
    so leaving it out would understate the MFU."""
    return 6 * matmul_params + 12 * num_layers * hidden_size * context
