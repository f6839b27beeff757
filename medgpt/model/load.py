"""The one place that calls `from_pretrained`: tokenizers, models, adapters, quantization.

Keeping every load here means one set of rules everywhere: safetensors only, `trust_remote_code` off unless
asked, and a clear error (not a traceback) for a path that does not exist or a hub id that cannot be reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medgpt.args import ModelArgs
from medgpt.outdir import check_complete
from medgpt.utils import MedGPTError, log

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGED_MARKER = "merged_from"  # key in a merged model's config.json: which adapters went into its weights


def _check_source(name_or_path: str, what: str = "model") -> None:
    if not name_or_path:
        raise MedGPTError(f"no {what} given. Add --model.name_or_path DIR (a local HF-format directory) or a hub id.")
    p = Path(name_or_path)
    looks_local = p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1
    if looks_local and not p.exists():
        raise MedGPTError(f"{what} path {name_or_path} does not exist. Check --model.name_or_path "
                          f"(a local directory, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct).")
    check_complete(p)  # a medgpt output whose final save never finished


def _hub_error(name_or_path: str, e: Exception) -> MedGPTError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE=1 is set" if offline else "it could not be downloaded"
    return MedGPTError(f"could not load {name_or_path}: {why} ({type(e).__name__}: {str(e).splitlines()[0]}). "
                       f"Pass a local directory, or go online once so the hub files are cached.")


def read_json(path: Path) -> dict:
    """A JSON object file as a dict; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_adapter(path: str | None) -> tuple[Path, dict]:
    """The adapter dir and its adapter_config.json, or a clear error (missing, a merged or full model, not an
    adapter, no weights). Every load of --model.adapter goes through here, before anything heavy is loaded."""
    if not path:
        raise MedGPTError("no adapter given. Add --model.adapter DIR (the output dir of a LoRA/QLoRA training run).")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MedGPTError(f"adapter directory {path} does not exist. Check --model.adapter (the output dir of a "
                          f"LoRA/QLoRA run, which holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]}).")
    check_complete(p, "--model.adapter")  # killed during its final save: maybe an adapter beside a 0-byte file
    conf = p / ADAPTER_CONFIG
    if not conf.is_file():
        if MERGED_MARKER in read_json(p / "config.json"):
            raise MedGPTError(f"{path} is an already merged model, not an adapter: it has no {ADAPTER_CONFIG} and "
                              f"nothing left to merge. Use it directly (medgpt chat --model.name_or_path {path}).")
        if (p / "config.json").is_file():
            raise MedGPTError(f"{path} is a full model, not a LoRA adapter (no {ADAPTER_CONFIG}): a full "
                              f"fine-tuning run needs no merge. Use it directly as --model.name_or_path.")
        raise MedGPTError(f"{path} is not a LoRA adapter: it has no {ADAPTER_CONFIG}. Pass the output dir of a "
                          f"run with --finetune.type lora or qlora.")
    if not any((p / w).is_file() for w in ADAPTER_WEIGHTS):
        raise MedGPTError(f"{path} has {ADAPTER_CONFIG} but no adapter weights ({ADAPTER_WEIGHTS[0]}); the run "
                          f"that wrote it may not have finished. Point --model.adapter at a complete adapter.")
    return p.resolve(), read_json(conf)


def load_tokenizer(model: ModelArgs):
    """AutoTokenizer for `model.name_or_path` (the adapter dir's tokenizer wins when it has one)."""
    from transformers import AutoTokenizer

    src = model.name_or_path
    if model.adapter and (check_adapter(model.adapter)[0] / "tokenizer_config.json").exists():
        src = model.adapter
    _check_source(src, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(src, e) from None
    if tok.pad_token is None:
        # Padding is always masked out of the loss; reusing EOS as pad is then harmless.
        tok.pad_token = tok.eos_token
    return tok


def pick_dtype(name: str):
    """`auto`: bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quantization_config(compute_dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MedGPTError("QLoRA needs bitsandbytes: pip install 'medgpt[qlora]' (or --finetune.type lora).") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(model: ModelArgs, finetune=None, task: str = "causal_lm", num_labels: int = 1,
               gradient_checkpointing: bool = False, vocab_size: int | None = None):
    """Load a model for training or inference, with LoRA/QLoRA when `finetune` asks for it.

    task: "causal_lm" or "seq_cls" (reward and value models: one scalar per sequence).
    vocab_size: resize the embeddings to this size first (a tokenizer with added tokens); the new rows then
    train even under LoRA (they are saved in the adapter through `modules_to_save`).
    Returns the (possibly PEFT-wrapped) model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_source(model.name_or_path)
    if model.adapter:
        check_adapter(model.adapter)
    ft_type = getattr(finetune, "type", "full")
    dtype = pick_dtype(model.dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=model.trust_remote_code, use_safetensors=True)
    if ft_type == "qlora":
        kwargs["quantization_config"] = _quantization_config(dtype)
        import torch

        if torch.cuda.is_available():
            # bitsandbytes places 4-bit weights at load time: each process must load onto its own GPU.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if task == "seq_cls":
        cls, kwargs["num_labels"] = AutoModelForSequenceClassification, num_labels
    else:
        cls = AutoModelForCausalLM
    try:
        net = cls.from_pretrained(model.name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        if "safetensors" in str(e).lower():
            raise MedGPTError(f"{model.name_or_path} has no safetensors weights; only safetensors are loaded (a "
                              f".bin checkpoint can run code when unpickled). Convert it once with "
                              f"`save_pretrained(..., safe_serialization=True)`.") from None
        raise _hub_error(model.name_or_path, e) from None
    if task == "seq_cls" and net.config.pad_token_id is None:
        net.config.pad_token_id = net.config.eos_token_id if isinstance(net.config.eos_token_id, int) else 0

    resized = False
    if vocab_size is not None and vocab_size > net.get_input_embeddings().weight.shape[0]:
        # The tokenizer has tokens the model has no rows for (e.g. after `medgpt tokenizer extend`). A table
        # larger than the tokenizer (Qwen pads to a multiple of 128) is left alone.
        from medgpt.model.vocab import resize_embeddings

        resized = resize_embeddings(net, vocab_size) > 0
        log(f"resized the embeddings to {vocab_size} rows; the new rows train fully")
    if not resized and getattr(net.config, "medgpt_added_tokens", 0):
        # `medgpt tokenizer extend` grew the table already: its new rows are seeded (sub-token means), never
        # trained, so they must train under LoRA just as rows resized here do.
        resized = True

    if gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.config.use_cache = False

    if model.adapter:
        net = _load_adapter(net, model, finetune)
    elif ft_type in ("lora", "qlora"):
        net = add_lora(net, finetune, task=task, train_embeddings=resized, quantized=ft_type == "qlora",
                       gradient_checkpointing=gradient_checkpointing)
    return net


def load_reference(model: ModelArgs):
    """A frozen reference for full fine-tuning (dpo, kto): the starting model as plain weights, --model.adapter
    folded in (the SFT model), never a PEFT wrapper (trainers call its backbone and head directly)."""
    from medgpt.args import FinetuneArgs

    net = load_model(model, FinetuneArgs(type="full")) if model.adapter else load_model(model)
    return net.requires_grad_(False).eval()


def _load_adapter(net, model: ModelArgs, finetune):
    """Base + adapter. LoRA/QLoRA keep training the adapter; inference (no `finetune`) keeps it frozen.

    Full fine-tuning folds the adapter into the weights and then trains every weight: the run starts from the
    model the adapter made (e.g. the SFT model) and saves a plain full model. One rule for every stage."""
    from peft import PeftModel

    ft_type = getattr(finetune, "type", None)
    try:
        net = PeftModel.from_pretrained(net, model.adapter, is_trainable=ft_type in ("lora", "qlora"))
    except (RuntimeError, ValueError) as e:  # peft: size mismatch (or missing modules) on another base model
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = next((line for line in lines if "size mismatch" in line), lines[0])[:300]
        trained_on = read_json(Path(model.adapter) / ADAPTER_CONFIG).get("base_model_name_or_path")
        raise MedGPTError(f"the adapter {model.adapter} does not fit the base {model.name_or_path} ({detail}). Pass "
                          f"the base the adapter was trained on (its {ADAPTER_CONFIG} says {trained_on!r}).") from None
    if ft_type == "full":
        log(f"--finetune.type full with --model.adapter: merged {model.adapter} into the base; every weight trains")
        net = net.merge_and_unload().requires_grad_(True)
    elif ft_type in ("lora", "qlora"):
        from medgpt.model.dropout import use_cpu_dropout

        use_cpu_dropout(net)
    return net


def add_lora(net, finetune, task: str = "causal_lm", train_embeddings: bool = False, quantized: bool = False,
             gradient_checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from medgpt.model.dropout import use_cpu_dropout

    if quantized:
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=gradient_checkpointing)
    targets = finetune.target_modules
    target = "all-linear" if targets in (["all-linear"], ["all"]) else targets
    save = []
    if task == "seq_cls":
        save.append("score")  # the reward head starts random: it must train fully, not through LoRA
    if train_embeddings:
        save += ["embed_tokens", "lm_head"]
    config = LoraConfig(r=finetune.lora_rank, lora_alpha=finetune.lora_alpha, lora_dropout=finetune.lora_dropout,
                        target_modules=target, modules_to_save=save or None,
                        task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM")
    try:
        net = get_peft_model(net, config)
    except ValueError as e:
        raise MedGPTError(f"cannot add LoRA to this model: {e}. Check --finetune.target_modules "
                          f"(module names such as q_proj,v_proj, or all-linear).") from None
    use_cpu_dropout(net)
    return net


def load_reward_model(path: str, dtype: str = "auto"):
    """A trained reward model, frozen for scoring, and its own tokenizer: `(model, tokenizer)`.

    `path` is the output dir of `medgpt rm`: full weights (a plain sequence-classification model), or a LoRA
    adapter whose base is read from adapter_config.json (`base_model_name_or_path`); the adapter (LoRA weights and
    its fully trained `score` head) is merged in, so scoring costs one plain forward pass.
    """
    import json

    p = Path(path)
    if not p.is_dir():
        raise MedGPTError(f"reward model {path} does not exist (or is not a directory). Pass the output dir of "
                          f"`medgpt rm` to --reward.model.")
    adapter_config = p / "adapter_config.json"
    if adapter_config.exists():
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise MedGPTError(f"{adapter_config} names no base model (base_model_name_or_path). Set it to the "
                              f"model the reward adapter was trained on, or pass a merged model (`medgpt merge`).")
        if (Path(base).is_absolute() or base.startswith((".", "~"))) and not Path(base).exists():
            raise MedGPTError(f"the reward adapter {path} was trained on {base}, which does not exist here. Edit "
                              f"base_model_name_or_path in {adapter_config} to where that model is now, or pass "
                              f"a merged reward model (`medgpt merge`).")
        args = ModelArgs(name_or_path=base, adapter=str(p), dtype=dtype)
    elif (p / "config.json").exists():
        args = ModelArgs(name_or_path=str(p), dtype=dtype)
    else:
        raise MedGPTError(f"{path} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json). "
                          f"Pass the output dir of `medgpt rm` to --reward.model.")
    net = load_model(args, task="seq_cls")
    if args.adapter:
        net = net.merge_and_unload()
    tokenizer = load_tokenizer(args)  # the adapter dir's tokenizer (with its chat template) wins
    # The reward is read at the last non-pad token: the model must agree with the tokenizer on what pad is.
    net.config.pad_token_id = tokenizer.pad_token_id
    net.eval().requires_grad_(False)
    return net, tokenizer


def load_encoder(path: str):
    """A local text encoder (a sentence-embedding model such as all-MiniLM-L6-v2) for `medgpt rag`:
    `(model, tokenizer)`, frozen, in eval mode. Local directories only: an embedder is never downloaded."""
    from transformers import AutoModel, AutoTokenizer

    if not Path(path).is_dir():
        raise MedGPTError(f"embedder {path} is not a local directory. Pass a directory holding an HF-format encoder "
                          f"(config.json, safetensors weights, tokenizer); embedders are never downloaded.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        net = AutoModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise MedGPTError(f"could not load the embedder in {path} ({type(e).__name__}: {str(e).splitlines()[0]}). "
                          f"It must be an HF-format encoder with safetensors weights.") from None
    net.eval().requires_grad_(False)
    return net, tokenizer
