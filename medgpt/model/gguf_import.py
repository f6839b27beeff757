"""`medgpt model import`: a GGUF file -> a plain HF model dir that every other command loads.

    medgpt model import --model.name_or_path ~/models/SmolLM2-135M-Instruct.Q4_1.gguf --output_dir models/smollm2

Users arrive with GGUF files from Ollama, LM Studio or llama.cpp. transformers reads them through the `gguf`
package (weights dequantized to float, the tokenizer and its chat template rebuilt from the metadata), but a
model loaded that way refuses `save_pretrained` ("quantized with gguf"), and every later load would pay the
dequantization again (20 s for a 135M Q4_1 file). So the weights are moved once into a plain model built from the
same config and saved as safetensors, with the tokenizer (chat template included) and a generation config that
stops at the template's end-of-turn token.

Checks before anything heavy: the file is a GGUF file, its architecture is one transformers reads for causal LM,
and every tensor type can be dequantized by the installed `gguf` package; each refusal names what is supported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from medgpt.args import ModelArgs
from medgpt.config import arg, save_config, section
from medgpt.utils import MedGPTError, log


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "name_or_path: a .gguf file, or a directory holding exactly one; dtype: of "
                               "the saved weights (auto: float32, the dequantized values exactly).")
    output_dir: str = arg("", "Where the HF model dir goes (config.json, model.safetensors, tokenizer).")
    overwrite: bool = arg(False, "Replace an earlier import in output_dir.")


def find_gguf(path: str) -> Path:
    """The .gguf file `path` names: the file itself, or the only one in a directory."""
    if not path:
        raise MedGPTError("no GGUF file given. Add --model.name_or_path FILE.gguf (or a directory holding one).")
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) != 1:
            what = f"{len(found)} .gguf files ({', '.join(f.name for f in found[:5])})" if found else "no .gguf file"
            raise MedGPTError(f"{p} holds {what}; pass the one to import as --model.name_or_path {p}/NAME.gguf.")
        p = found[0]
    if not p.is_file():
        raise MedGPTError(f"GGUF file {path} does not exist. Check --model.name_or_path.")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MedGPTError(f"{p} is not a GGUF file (it does not start with the GGUF magic bytes). "
                              f"`medgpt model import` reads .gguf files as llama.cpp, Ollama and LM Studio write them.")
    return p


def check_gguf(path: Path) -> dict:
    """Architecture, tensor types and name of a GGUF file, refused clearly when transformers cannot load it."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise MedGPTError(f"{path} could not be read as GGUF ({type(e).__name__}: {e}); the file may be truncated "
                          f"or written by a newer llama.cpp than the installed `gguf` package reads.") from None

    def text(key: str) -> str:
        fld = reader.fields.get(key)
        return bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace") if fld is not None else ""

    arch = text("general.architecture")
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise MedGPTError(f"{path.name} holds a `{arch or 'unknown'}` model; transformers (and so medgpt) imports "
                          f"these GGUF architectures: {', '.join(supported)}.")
    readable = {Q.F32, Q.F16, *_type_traits}
    types = sorted({t.tensor_type for t in reader.tensors}, key=int)
    bad = [t.name for t in types if t not in readable]
    if bad:
        raise MedGPTError(f"{path.name} stores tensors as {', '.join(bad)}, which the installed `gguf` package cannot "
                          f"dequantize. Supported: {', '.join(sorted(q.name for q in readable))}. Use another "
                          f"quantization of the model (Q8_0, Q4_K_M, F16, ...) or upgrade gguf.")
    return {"architecture": arch, "name": text("general.name"), "types": [t.name for t in types],
            "tensors": len(reader.tensors)}


def plain_copy(model, dtype):
    """The same weights in a model built from the config alone (not marked as quantized, so it saves)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise MedGPTError(f"the GGUF file does not match the {type(plain).__name__} layout transformers expects "
                          f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}).")
    plain.tie_weights()
    return plain.eval()


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus the template's end-of-turn token (ChatML's <|im_end|>), so generation stops after a reply."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if token in tokenizer.get_vocab() and tid not in ids:
            ids.append(tid)
    return ids


def run(cfg: Config) -> int:
    """Import a GGUF file as a plain HF model dir (safetensors, tokenizer with its chat template, config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from medgpt.outdir import final_save, prepare_output_dir

    src = find_gguf(cfg.model.name_or_path)
    info = check_gguf(src)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, command="model import")
    dtype = torch.float32 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    start = time.perf_counter()
    log(f"importing {src} ({info['architecture']}, {info['tensors']} tensors as {', '.join(info['types'])})")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    plain = plain_copy(model, dtype)
    del model
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_turn_ids(tokenizer) or None,
        pad_token_id=tokenizer.pad_token_id)
    with final_save(out) as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        save_config(cfg, staging / "config.yaml")
    n = sum(p.numel() for p in plain.parameters())
    log(f"imported {info['name'] or src.stem}: {n / 1e6:.1f}M parameters ({str(dtype).removeprefix('torch.')}), "
        f"tied embeddings: {bool(plain.config.tie_word_embeddings)}, chat template: "
        f"{'yes' if tokenizer.chat_template else 'none'}; {time.perf_counter() - start:.1f}s -> {out}")
    return 0
