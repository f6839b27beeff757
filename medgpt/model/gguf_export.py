"""Export a (merged) HF model dir to one GGUF file and an Ollama Modelfile, for llama.cpp, Ollama and LM Studio.

    medgpt model export --model.name_or_path outputs/merged --export.quant q8_0 --output_dir outputs/gguf
    cd outputs/gguf && ollama create medgpt -f Modelfile && ollama run medgpt

The output dir holds `<model dir name>-<quant>.gguf`, a `Modelfile` beside it, and config.yaml.

- Architectures: LlamaForCausalLM (GGUF `llama`, SmolLM2 and Llama 2/3 without rope scaling) and
  Qwen2ForCausalLM (`qwen2`). Anything else is refused: an adapter (merge it first), a reward/classifier model,
  a quantized (4-bit/8-bit) model dir, other architectures.
- `--export.quant f16`: every matrix in float16; `q8_0`: 8-bit blocks of 32 (ggml's Q8_0), about half the size,
  and a matrix whose rows are not a multiple of 32 stays float16. Norms and biases are always float32, as
  llama.cpp's own converter writes them.
- Llama's q_proj/k_proj rows are permuted the way llama.cpp's convert_hf_to_gguf.py does (its rope pairs
  neighbouring dims, HF's pairs the two halves); loaders (llama.cpp, transformers' gguf_file=) expect that.
- Tied embeddings: only `token_embd` is written, no `output`, so loaders tie them again.
- Tokenizer: byte-level BPE only (tokenizer.json with a BPE model and a ByteLevel decoder), as `gpt2` with its
  merges; special added tokens are CONTROL, other added tokens USER_DEFINED, ids past the tokenizer up to the
  embedding size `[PADi]` UNUSED. `tokenizer.ggml.pre` names the pre-tokenizer llama.cpp should split with
  (see PRE_TOKENIZERS); a SentencePiece tokenizer is refused.
- Modelfile: FROM the file; for a ChatML chat template (<|im_start|>/<|im_end|>) a TEMPLATE in Ollama's Go
  syntax, SYSTEM when the template injects a default system prompt, and PARAMETER stop for the turn tokens.
  Other templates get no TEMPLATE: Ollama then picks one from the chat template stored in the GGUF.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medgpt.args import ModelArgs
from medgpt.config import arg, save_config, section
from medgpt.model.load import read_json
from medgpt.outdir import check_complete, check_output_dir, final_save, owns, prepare_output_dir
from medgpt.utils import MedGPTError, log

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}  # HF class -> GGUF architecture
SUPPORTED = "LlamaForCausalLM (llama) and Qwen2ForCausalLM (qwen2)"
QUANT_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values
MODELFILE = "Modelfile"
# tokenizer.ggml.pre: how llama.cpp splits text before BPE, read off tokenizer.json's pre_tokenizer. Unknown
# ones get "default"; llama.cpp may need the right name (its convert_hf_to_gguf.py lists them).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"ByteLevel": "gpt-2", "Digits+ByteLevel": "smollm",
                  f"Split:{_QWEN2_SPLIT}+ByteLevel(no regex)": "qwen2",
                  f"Split:{_LLAMA3_SPLIT}+ByteLevel(no regex)": "llama-bpe"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ollama's Go template for ChatML: every message as a turn, then the assistant header after a user turn.
CHATML_GO = ("{{- range $i, $_ := .Messages }}\n"
             "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
             "<|im_start|>{{ .Role }}\n"
             "{{ .Content }}<|im_end|>\n"
             "{{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n"
             "{{ end }}\n"
             "{{- end }}")


@dataclass
class ExportArgs:
    format: Literal["gguf"] = arg("gguf", "Output format: gguf (llama.cpp, Ollama, LM Studio).")
    quant: Literal["f16", "q8_0"] = arg("f16", "Weights in the file: f16 (float16 matrices) or q8_0 (ggml's "
                                        "8-bit blocks of 32, about half the size, slightly less exact).")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "name_or_path: a merged HF model dir (LlamaForCausalLM or "
                               "Qwen2ForCausalLM). --model.dtype is not used: --export.quant sets the precision.")
    export: ExportArgs = section(ExportArgs, "What to write.")
    output_dir: str = arg("", "Where the .gguf file and its Ollama Modelfile go.")
    overwrite: bool = arg(False, "Replace an earlier medgpt output in output_dir.")


def run(cfg: Config) -> int:
    """Write --model.name_or_path as one GGUF file (--export.quant f16 or q8_0) plus an Ollama Modelfile to
    --output_dir. The model must be a plain (merged) HF dir: merge a LoRA adapter first with `medgpt merge`."""
    src, conf = check_source(cfg.model)
    arch = architecture(conf, src)
    tokenizer_json = read_tokenizer_json(src)
    plan = tensor_plan(conf, arch, cfg.export.quant, weight_files(src))
    vocab_tokens(tokenizer_json, int(conf["vocab_size"]))  # refuses a tokenizer larger than the embeddings
    name = f"{src.name}-{cfg.export.quant}.gguf"
    out = _check_output(cfg.output_dir, cfg.overwrite, src, name)

    from medgpt.model.load import load_tokenizer

    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(src)))  # renders the chat template; add_bos
    modelfile = ollama_modelfile(name, tokenizer)
    log(f"exporting {src} ({conf['architectures'][0]}) to {out / name} ({cfg.export.quant})")
    started = time.time()
    prepare_output_dir(out, cfg.overwrite, command="model export")
    with final_save(out) as tmp:
        counts = write_gguf(tmp / name, src, conf, arch, cfg.export.quant, plan, tokenizer_json, tokenizer)
        (tmp / MODELFILE).write_text(modelfile, encoding="utf-8")
        save_config(cfg, tmp / "config.yaml")
    size = (out / name).stat().st_size
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    log(f"wrote {out / name} ({size / 2**20:.1f} MiB; tensors: {kinds}) and {out / MODELFILE} in "
        f"{time.time() - started:.1f}s. Ollama: cd {out} && ollama create NAME -f {MODELFILE}")
    return 0


# ----------------------------------------------------------------------------- checks (before anything is written)

def check_source(model: ModelArgs) -> tuple[Path, dict]:
    """The model dir and its config.json; refuses a missing dir, a hub id, an adapter, --model.adapter."""
    merge_hint = ("Merge it into its base first (medgpt merge --model.name_or_path BASE --model.adapter ADAPTER "
                  "--output_dir MERGED), then export MERGED.")
    if model.adapter:
        raise MedGPTError(f"--model.adapter {model.adapter}: export writes one plain model, not a base plus an "
                          f"adapter. {merge_hint}")
    if not model.name_or_path:
        raise MedGPTError("no model given. Add --model.name_or_path DIR (a merged HF model dir).")
    src = Path(model.name_or_path).expanduser()
    if not src.is_dir():
        what = "is a file, not a directory" if src.exists() else "does not exist"
        raise MedGPTError(f"--model.name_or_path {model.name_or_path} {what}. Export needs a local HF model dir "
                          f"(config.json, *.safetensors, tokenizer.json); for a hub model, download it first "
                          f"(huggingface-cli download ID --local-dir DIR) and pass DIR.")
    check_complete(src)
    conf = read_json(src / "config.json")
    if not conf and (src / "adapter_config.json").is_file():
        raise MedGPTError(f"--model.name_or_path {src} is a LoRA adapter, not a model. {merge_hint}")
    if not conf:
        raise MedGPTError(f"--model.name_or_path {src} has no readable config.json, so it is not an HF model dir. "
                          f"Pass the output dir of `medgpt merge` or of a full fine-tuning run.")
    return src.resolve(), conf


def architecture(conf: dict, src: Path) -> str:
    """The GGUF architecture name, or a clear refusal (other classes, quantized weights, rope scaling)."""
    if conf.get("quantization_config"):
        method = conf["quantization_config"].get("quant_method", "?")
        raise MedGPTError(f"{src} is a quantized model ({method}, quantization_config in config.json); GGUF export "
                          f"needs full-precision weights. Export the original model (for a QLoRA run: merge the "
                          f"adapter into the full-precision base, then export that).")
    classes = conf.get("architectures") or ["(none)"]
    arch = ARCHITECTURES.get(classes[0])
    if arch is None:
        why = (" A reward or classifier model has no language-model head to run in llama.cpp; export the policy."
               if str(classes[0]).endswith(("SequenceClassification", "TokenClassification")) else "")
        raise MedGPTError(f"{src} is a {classes[0]} (config.json `architectures`); GGUF export supports "
                          f"{SUPPORTED}.{why} For other models use llama.cpp's convert_hf_to_gguf.py.")
    rope = conf.get("rope_scaling") or conf.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise MedGPTError(f"{src} uses rope scaling {kind!r} (config.json), which this export does not write. "
                          f"Use llama.cpp's convert_hf_to_gguf.py for this model.")
    return arch


def read_tokenizer_json(src: Path) -> dict:
    """tokenizer.json of a byte-level BPE tokenizer (the GGUF `gpt2` model), or a clear refusal."""
    tj = read_json(src / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and (tj.get("decoder") or {}).get(
            "type") == "ByteLevel":
        return tj
    found = (f"a {model.get('type')} tokenizer" if tj else
             "a SentencePiece tokenizer (tokenizer.model)" if (src / "tokenizer.model").is_file() else
             "no tokenizer.json")
    raise MedGPTError(f"{src} has {found}; GGUF export writes byte-level BPE tokenizers only (tokenizer.json with "
                      f"a BPE model and a ByteLevel decoder, as Qwen2, SmolLM and `medgpt tokenizer train` make). "
                      f"Use llama.cpp's convert_hf_to_gguf.py for this model.")


def weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise MedGPTError(f"{src} has no *.safetensors weights (only safetensors are read, never pickled .bin "
                          f"files). Re-save the model with save_pretrained(dir, safe_serialization=True).")
    return files


def _check_output(path: str, overwrite: bool, src: Path, name: str) -> Path:
    if path and Path(path).expanduser().resolve() == src:
        raise MedGPTError(f"--output_dir {path} is the model being exported; write the GGUF to a new directory.")
    out = check_output_dir(path, overwrite)[0]  # refuses a foreign non-empty dir, or an earlier run's without flag
    for entry in (name, MODELFILE):
        if (out / entry).exists() and not owns(out, entry):
            raise MedGPTError(f"--output_dir {out} holds {entry}, which medgpt did not write there and this export "
                              f"would overwrite. Move it away, or choose another --output_dir.")
    return out


# ----------------------------------------------------------------------------- the GGUF file

def write_gguf(path: Path, src: Path, conf: dict, arch: str, quant: str, plan: list[PlannedTensor],
               tokenizer_json: dict, tokenizer) -> dict[str, int]:
    """Write the file: metadata, tensor infos, then one tensor at a time (memory holds one tensor, not the model).
    Returns how many tensors were written in each ggml type."""
    import gguf

    writer = gguf.GGUFWriter(None, arch)
    add_model_metadata(writer, conf, src.name, quant)
    add_tokenizer_metadata(writer, src, tokenizer_json, int(conf["vocab_size"]), tokenizer)
    for t in plan:
        writer.add_tensor_info(t.gguf_name, t.store_shape, t.store_dtype, t.nbytes, raw_dtype=t.raw_dtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    try:
        for t in plan:
            writer.write_tensor_data(convert_tensor(t, conf, arch))
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    finally:
        writer.close()
    return counts


def add_model_metadata(writer, conf: dict, name: str, quant: str) -> None:
    import gguf

    hidden, heads = int(conf["hidden_size"]), int(conf["num_attention_heads"])
    rope = conf.get("rope_parameters") or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(conf.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(conf["num_hidden_layers"]))
    writer.add_feed_forward_length(int(conf["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(conf.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(int(conf.get("head_dim") or hidden // heads))
    writer.add_rope_freq_base(float(conf.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(conf.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(conf["vocab_size"]))
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass
class PlannedTensor:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    store_shape: tuple[int, ...]  # what add_tensor_info gets: bytes per row for quantized types
    store_dtype: object  # numpy dtype of the written array
    raw_dtype: object  # the ggml type for quantized tensors, else None
    nbytes: int


def tensor_plan(conf: dict, arch: str, quant: str, weights: list[Path]) -> list[PlannedTensor]:
    """Every tensor to write, with its GGUF name and type, read from the safetensors headers only."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), int(conf["num_hidden_layers"]))
    tied = bool(conf.get("tie_word_embeddings", False))
    plan, seen = [], set()
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by every loader; a tied head is the embedding
                gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise MedGPTError(f"{file}: tensor {key} has no GGUF name for a {arch} model, so this is not a "
                                      f"plain {arch} checkpoint. Export the output of `medgpt merge` or of a full "
                                      f"fine-tuning run.")
                shape = tuple(f.get_slice(key).get_shape())
                plan.append(_planned(key, gguf_name, file, shape, quant))
                seen.add(key)
    if not tied and "lm_head.weight" not in seen:
        raise MedGPTError(f"{weights[0].parent}: config.json says tie_word_embeddings is false but the weights "
                          f"have no lm_head.weight. The checkpoint is incomplete; save the model again.")
    if int(conf["vocab_size"]) != next((t.shape[0] for t in plan if t.gguf_name == "token_embd.weight"), -1):
        raise MedGPTError(f"{weights[0].parent}: config.json vocab_size {conf['vocab_size']} does not match the "
                          f"embedding (model.embed_tokens.weight). Save the model again after resizing.")
    return plan


def _planned(key: str, gguf_name: str, file: Path, shape: tuple[int, ...], quant: str) -> PlannedTensor:
    """llama.cpp's choice: vectors (norms, biases) in float32, matrices in the requested type; Q8_0 needs rows
    that are a multiple of 32 values, so other matrices stay float16."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    n = 1
    for d in shape:
        n *= d
    if len(shape) == 1:
        return PlannedTensor(key, gguf_name, file, shape, T.F32, shape, np.float32, None, 4 * n)
    if quant == "q8_0" and shape[-1] % QUANT_BLOCK == 0:
        byte_shape = quant_shape_to_byte_shape(shape, T.Q8_0)
        nbytes = byte_shape[0] * int(np.prod(byte_shape[1:]))
        return PlannedTensor(key, gguf_name, file, shape, T.Q8_0, byte_shape, np.uint8, T.Q8_0, nbytes)
    return PlannedTensor(key, gguf_name, file, shape, T.F16, shape, np.float16, None, 2 * n)


def convert_tensor(t: PlannedTensor, conf: dict, arch: str):
    """One tensor as the numpy array the file stores (Llama q/k permuted, cast or quantized)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize
    from safetensors import safe_open

    with safe_open(str(t.file), framework="pt") as f:
        data = f.get_tensor(t.hf_name).float().numpy()
    if arch == "llama" and t.gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = int(conf["num_attention_heads"])
        if t.gguf_name.split(".")[-2] == "attn_k":
            heads = int(conf.get("num_key_value_heads") or heads)
        data = permute_for_rope(data, heads)
    if t.qtype == T.Q8_0:
        return quantize(np.ascontiguousarray(data, dtype=np.float32), T.Q8_0)
    out = np.ascontiguousarray(data, dtype=t.store_dtype)
    if t.qtype == T.F16 and not np.isfinite(out).all() and np.isfinite(data).all():
        raise MedGPTError(f"{t.file}: {t.hf_name} holds values beyond float16's range (|x| > 65504), which f16 "
                          f"would turn into infinities. Export with --export.quant q8_0 (its scales are per block), "
                          f"or use llama.cpp's convert_hf_to_gguf.py --outtype bf16.")
    return out


def permute_for_rope(w, n_head: int):
    """llama.cpp's LlamaModel.permute: within each head, rows (0, d/2, 1, d/2+1, ...) become (0, 1, 2, ...), so
    the rotated pairs are neighbours (ggml's rope) instead of halves (HF's rotate_half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer metadata

def vocab_tokens(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with their GGUF types, padded with `[PADi]` (UNUSED) up to the embedding size."""
    from gguf import TokenType

    by_id = {int(i): tok for tok, i in tokenizer_json["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens") or []}
    biggest = max([*by_id, *added], default=-1)
    if biggest >= n_vocab:
        raise MedGPTError(f"the tokenizer has ids up to {biggest} but the model has only {n_vocab} embeddings "
                          f"(config.json vocab_size). Resize the embeddings to the tokenizer "
                          f"(model.resize_token_embeddings(len(tokenizer))) and save the model again.")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """tokenizer.ggml.pre for this tokenizer.json's pre_tokenizer (PRE_TOKENIZERS), else "default"."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    key = "+".join(_pre_part(p) for p in parts or [])
    name = PRE_TOKENIZERS.get(key)
    if name is None:
        log(f"note: tokenizer pre-tokenizer {key or '(none)'} is not one medgpt knows; writing "
            f"tokenizer.ggml.pre=default. llama.cpp may split text differently than transformers; set the right "
            f"name (see llama.cpp's convert_hf_to_gguf.py) if answers look garbled.")
    return name or "default"


def _pre_part(p: dict) -> str:
    kind = str(p.get("type"))
    if kind == "Split":
        return f"Split:{(p.get('pattern') or {}).get('Regex')}"
    if kind == "ByteLevel" and not p.get("use_regex", True):
        return "ByteLevel(no regex)"
    if kind == "Digits" and not p.get("individual_digits"):
        return "Digits(grouped)"
    return kind


def add_tokenizer_metadata(writer, src: Path, tokenizer_json: dict, n_vocab: int, hf) -> None:
    """The `gpt2` tokenizer keys llama.cpp and transformers read: tokens, types, merges, special ids, add_bos,
    chat template."""
    from gguf.vocab import SpecialVocab

    tokens, types = vocab_tokens(tokenizer_json, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(src, load_merges=True, n_vocab=n_vocab)
    # What the tokenizer really does (not a config flag that may be absent): does encoding add BOS / EOS?
    plain, full = hf("a", add_special_tokens=False)["input_ids"], hf("a")["input_ids"]
    extra = len(full) > len(plain)
    special.add_special_token["bos"] = extra and hf.bos_token_id is not None and full[0] == hf.bos_token_id
    special.add_special_token["eos"] = extra and hf.eos_token_id is not None and full[-1] == hf.eos_token_id
    special.chat_template = hf.chat_template if isinstance(hf.chat_template, str) else special.chat_template
    special.add_to_gguf(writer, quiet=True)


# ----------------------------------------------------------------------------- Ollama Modelfile

def chatml_system(tokenizer) -> tuple[bool, str | None]:
    """(whether the chat template renders ChatML, the default system prompt it injects or None)."""
    if not getattr(tokenizer, "chat_template", None):
        return False, None
    s, u, a = "SYS-7f3a", "USR-7f3a", "AST-7f3a"

    def render(messages, gen):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        bos = tokenizer.bos_token or ""  # a template may open with BOS (llama.cpp adds it per add_bos_token)
        return text[len(bos):] if bos and text.startswith(bos) and not text.startswith(IM_START) else text

    def turn(role, content):
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    try:
        full = render([{"role": "system", "content": s}, {"role": "user", "content": u},
                       {"role": "assistant", "content": a}], False)
        prompt = render([{"role": "user", "content": u}], True)
    except Exception:  # a template that refuses these messages is not plain ChatML
        return False, None
    want = turn("system", s) + turn("user", u) + turn("assistant", a)
    tail = turn("user", u) + f"{IM_START}assistant\n"
    if full.rstrip("\n") != want.rstrip("\n") or not prompt.endswith(tail):
        return False, None
    head = prompt[:-len(tail)]
    if not head:
        return True, None
    if head.startswith(f"{IM_START}system\n") and head.endswith(f"{IM_END}\n"):
        return True, head[len(f"{IM_START}system\n"):-len(f"{IM_END}\n")]
    return False, None


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """The Modelfile text: FROM, and for ChatML templates TEMPLATE, SYSTEM and stop tokens."""
    chatml, system = chatml_system(tokenizer)
    lines = ["# Ollama Modelfile written by `medgpt model export`.",
             f"# Use: ollama create NAME -f {MODELFILE} && ollama run NAME", "", f"FROM ./{gguf_name}"]
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_GO}"""')
        if system is not None and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
        stops = [IM_END, IM_START]
    else:
        lines.insert(3, "# The chat template is not ChatML: no TEMPLATE here, so Ollama picks one from the chat "
                        "template stored in the GGUF. Check it with `ollama show NAME --template`."
                     if getattr(tokenizer, "chat_template", None) else
                     "# The tokenizer has no chat template: no TEMPLATE here, so Ollama sends the prompt as it is.")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"
