"""Merge a LoRA adapter into its base model: a plain Hugging Face model dir that loads without flags.

    medgpt merge --model.name_or_path Qwen/Qwen2.5-7B-Instruct --model.adapter out/sft_lora --output_dir out/merged

The output holds safetensors weights, config.json (+ generation_config.json for causal LMs), the tokenizer with
its chat template (the adapter dir's, which training saves there, else the base's) and config.yaml.
`transformers`, vLLM and `medgpt chat` load it like any other model.

- The task comes from the adapter (adapter_config.json `task_type`): a causal LM, or a sequence classifier (a
  reward model from `medgpt rm`, whose `score` head was saved whole through `modules_to_save`).
- The base must be in full precision. A QLoRA adapter is fine, but merge it into the original base model, not a
  4-bit copy: adding LoRA deltas to 4-bit weights and re-quantizing loses most of what training learned.
- `--model.dtype auto` keeps the dtype the base was saved in (a bfloat16 base stays bfloat16, even on CPU).
- The merged config.json records `merged_from` (adapter path + a hash of its weights), so merging the same
  adapter into the result again is refused; merging a different adapter on top is allowed.
- The dir is written beside `output_dir` under a temporary name and renamed into place when complete, so an
  interrupted merge never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from medgpt.args import ModelArgs
from medgpt.config import arg, save_config, section
from medgpt.model.load import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter, read_json
from medgpt.model.load import MERGED_MARKER as MARKER  # key in the merged config.json: which adapters went in
from medgpt.outdir import check_output_dir as check_output_dir_
from medgpt.outdir import final_save, prepare_output_dir
from medgpt.utils import MedGPTError, log


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "name_or_path: the full-precision base; adapter: the LoRA adapter dir.")
    output_dir: str = arg("", "Where the merged model goes (a plain HF model dir).")
    overwrite: bool = arg(False, "Replace a non-empty output_dir.")


def run(cfg: Config) -> int:
    """Merge --model.adapter into --model.name_or_path and save a plain HF model to --output_dir.

    Without --model.name_or_path the base recorded in the adapter (adapter_config.json) is used. The base must be
    full precision (for a QLoRA adapter: the original model, not a 4-bit copy). --model.dtype auto keeps the
    dtype the base was saved in. --overwrite replaces a non-empty output_dir."""
    adapter_dir, adapter_cfg = check_adapter(cfg.model.adapter)
    base = cfg.model.name_or_path or adapter_cfg.get("base_model_name_or_path") or ""
    if not cfg.model.name_or_path:
        if not base:
            raise MedGPTError(f"no base model given, and {adapter_dir / ADAPTER_CONFIG} does not name one. "
                              f"Add --model.name_or_path DIR (the full-precision model the adapter was trained on).")
        log(f"base model from {ADAPTER_CONFIG}: {base}")
    task = adapter_task(adapter_cfg, adapter_dir)
    fingerprint = adapter_fingerprint(adapter_dir)
    base_cfg = check_base(base, adapter_cfg, fingerprint)
    out = check_output_dir(cfg.output_dir, cfg.overwrite, sources=[adapter_dir, Path(base)])

    from medgpt.model.load import load_model, load_tokenizer

    shapes = adapter_shapes(adapter_dir)
    margs = dataclasses.replace(cfg.model, name_or_path=base, adapter=str(adapter_dir),
                                dtype=_keep_dtype(cfg.model.dtype, base_cfg))
    tokenizer = load_tokenizer(margs)  # the adapter dir's tokenizer (with the trained chat template) wins
    log(f"merging {adapter_dir} into {base} ({task}, {margs.dtype})")
    # An adapter of another model is refused inside load_model (load._load_adapter), naming both.
    model = load_model(margs, None, task=task, num_labels=shapes.get("num_labels", 1),
                       vocab_size=shapes.get("vocab_size"))
    if _quantization(model.config):
        raise _quantized_error(base, adapter_cfg)

    merged = model.merge_and_unload()
    if task == "seq_cls" and tokenizer.pad_token_id is not None:
        # the reward is read at the last non-pad token: model and tokenizer must agree on what pad is
        merged.config.pad_token_id = tokenizer.pad_token_id
    history = list(getattr(merged.config, MARKER, None) or [])
    setattr(merged.config, MARKER, history + [{"adapter": str(adapter_dir), "adapter_sha256": fingerprint,
                                               "base": base}])
    prepare_output_dir(out, cfg.overwrite, command="merge")
    with final_save(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "config.yaml")
    log(f"saved merged model and tokenizer to {out}")
    return 0


# ----------------------------------------------------------------------------- checks (before any model loads)

def adapter_task(adapter_cfg: dict, adapter_dir: Path) -> str:
    """causal_lm or seq_cls, from the adapter's task_type (older adapters without one: a `score` head means seq_cls)."""
    task_type = adapter_cfg.get("task_type")
    if task_type == "CAUSAL_LM":
        return "causal_lm"
    if task_type == "SEQ_CLS":
        return "seq_cls"
    if task_type is None:
        saved = adapter_cfg.get("modules_to_save") or []
        return "seq_cls" if "score" in saved else "causal_lm"
    raise MedGPTError(f"{adapter_dir / ADAPTER_CONFIG}: task_type {task_type} is not supported; medgpt merges "
                      f"causal LM (CAUSAL_LM) and reward/classifier (SEQ_CLS) adapters.")


def check_base(base: str, adapter_cfg: dict, fingerprint: str) -> dict:
    """The base's config.json (local dirs; {} for a hub id). Refuses adapters, 4-bit bases and repeat merges."""
    p = Path(base).expanduser()
    if not p.is_dir():
        return {}  # a hub id: load_model checks it; quantization is checked again after loading
    conf = read_json(p / "config.json")
    if not conf and (p / ADAPTER_CONFIG).is_file():
        raise MedGPTError(f"--model.name_or_path {base} is a LoRA adapter, not a base model. Pass the base model "
                          f"as --model.name_or_path and the adapter as --model.adapter.")
    if _quantization(conf):
        raise _quantized_error(base, adapter_cfg)
    for entry in conf.get(MARKER) or []:
        if isinstance(entry, dict) and entry.get("adapter_sha256") == fingerprint:
            raise MedGPTError(f"{base} already contains this adapter: it was merged from {entry.get('adapter')} "
                              f"(same weights). Merging it again would apply the LoRA update twice. Use {base} "
                              f"as it is, or merge into the original base ({entry.get('base')}).")
    return conf


def check_output_dir(path: str, overwrite: bool, sources: list[Path]) -> Path:
    if not path:
        raise MedGPTError("no output directory given. Add --output_dir DIR.")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise MedGPTError(f"--output_dir {out} is a file, not a directory. Choose another path.")
    for src in sources:
        if src.exists() and out.resolve() == src.resolve():
            raise MedGPTError(f"--output_dir {out} is the base or adapter being merged; write the merged model to "
                              f"a new directory.")
    check_output_dir_(out, overwrite)  # refused now, before any model loads; taken only to save (run)
    return out


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 of the adapter weights: identifies the adapter even after its dir was moved or renamed."""
    weights = next(adapter_dir / w for w in ADAPTER_WEIGHTS if (adapter_dir / w).is_file())
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_shapes(adapter_dir: Path) -> dict[str, int]:
    """Shapes the base must have before the adapter loads: the reward head's labels, a resized vocabulary."""
    weights = adapter_dir / ADAPTER_WEIGHTS[0]
    if not weights.is_file():
        return {}
    from safetensors import safe_open

    shapes: dict[str, int] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            name = re.sub(r"^base_model\.model\.", "", key)
            if re.fullmatch(r"(score|classifier)\.weight", name):
                shapes["num_labels"] = f.get_slice(key).get_shape()[0]
            elif re.search(r"(^|\.)embed_tokens\.weight$", name):
                # trained with added tokens: the whole embedding was saved through modules_to_save
                shapes["vocab_size"] = f.get_slice(key).get_shape()[0]
    return shapes


# ----------------------------------------------------------------------------- helpers

def _quantization(conf) -> dict | None:
    q = conf.get("quantization_config") if isinstance(conf, dict) else getattr(conf, "quantization_config", None)
    return q or None


def _quantized_error(base: str, adapter_cfg: dict) -> MedGPTError:
    original = adapter_cfg.get("base_model_name_or_path")
    hint = f" (this adapter was trained on {original})" if original and original != base else ""
    return MedGPTError(f"{base} is a quantized model (its config.json has a quantization_config); LoRA cannot be "
                       f"merged into quantized weights without losing precision. A QLoRA adapter is fine, but "
                       f"merge it into the original full-precision base{hint}: pass that as --model.name_or_path.")


def _keep_dtype(requested: str, base_cfg: dict) -> str:
    """`auto` means the dtype the base was saved in, so merging never silently up- or down-casts the weights."""
    if requested != "auto":
        return requested
    saved = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    return saved if saved in ("float32", "bfloat16", "float16") else "auto"
