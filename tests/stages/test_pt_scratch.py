"""pt from scratch on packed corpora: a ~50k-parameter llama learns, its output is a plain HF model that sft
trains on; qwen2 builds; a 2-phase curriculum switches on time; --resume continues exactly; clear refusals.

Packed dirs are written here in the documented format (medgpt/scratch/memmap.py), independent of `medgpt pack`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from stagekit import DEMO, FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main
from medgpt.train.run import COMPLETE

# ~51k parameters with the 1,024-token test tokenizer (a tied 32k embedding + two blocks of ~9k).
ARCH = ["--model.init", "llama", "--arch.hidden_size", 32, "--arch.num_layers", 2, "--arch.num_heads", 4,
        "--arch.num_kv_heads", 2, "--arch.intermediate_size", 64]
FAST = ["--train.batch_size", 8, "--train.max_length", 64, "--train.learning_rate", 3e-3, "--train.warmup", 3,
        "--train.weight_decay", 0.1, "--train.logging_steps", 1, "--train.save_steps", 0, "--pt.eval_windows", 16,
        "--train.peak_seconds", 0.05]


def write_packed(out: Path, tokenizer, texts: list[str], val_every: int = 10, **meta_overrides) -> Path:
    """A packed dir as `medgpt pack` writes it: every `val_every`-th document goes to val."""
    out.mkdir(parents=True)
    splits: dict[str, list[int]] = {"train": [], "val": []}
    starts: dict[str, list[int]] = {"train": [], "val": []}
    for i, text in enumerate(texts):
        split = "val" if val_every and i % val_every == val_every - 1 else "train"
        starts[split].append(len(splits[split]))
        splits[split] += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    info = {}
    for split, ids in splits.items():
        if not ids:
            continue
        data = np.asarray(ids, dtype="<u2")
        data.tofile(out / f"{split}.bin")
        np.save(out / f"{split}.idx.npy", np.asarray(starts[split], dtype="<u8"))
        info[split] = {"file": f"{split}.bin", "tokens": len(ids), "documents": len(starts[split]),
                       "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    meta = {"format": "medgpt-bin/1", "dtype": "uint16", "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "tokenizer": "", "splits": info, **meta_overrides}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def lines(path: Path) -> list[str]:
    return [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


@pytest.fixture(scope="session")
def packed(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("packed")
    return {"en": write_packed(root / "en", tok, lines(DEMO / "pretrain_en.txt")),
            "zh": write_packed(root / "zh", tok, lines(DEMO / "pretrain_zh.txt")),
            "tiny": write_packed(root / "tiny", tok, lines(FIXTURES / "corpus.txt")[:2], val_every=0),
            "other_vocab": write_packed(root / "other", tok, lines(DEMO / "pretrain_en.txt")[:20], vocab_size=6400)}


def scratch(tokenizer_dir, out, *extra, config: Path | None = None) -> list:
    """argv of a from-scratch pt run (with a YAML config first when given)."""
    return ["pt", *([config] if config else []), "--model.name_or_path", tokenizer_dir, *ARCH, *FAST,
            "--output_dir", out, *extra]


def fails(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["history"]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_scratch_llama_learns_and_sft_trains_on_it(packed, tokenizer_dir, tmp_path, tracked, capsys):
    out = tmp_path / "pt"
    run_stage(*scratch(tokenizer_dir, out, "--data.train_files", packed["en"], "--train.max_steps", 30))
    log = capsys.readouterr().out
    assert "51," in log and "embedding 32,768" in log and "(tied with the output head)" in log  # parameter count
    assert "MFU" in log and "of measured matmul peak" in log

    metrics = assert_artifacts(out, adapter=False)
    assert {"generation_config.json", "trainer_state.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert metrics["global_step"] == 30 and metrics["tokens_seen"] == 30 * 8 * 64
    assert metrics["train_loss"] < metrics["initial_loss"] - 1.0, metrics  # it learns: ~6.9 (ln 1024) -> < 5.9
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"] < 1 and metrics["peak_gflops"] > 0
    assert metrics["eval_loss"] < math.log(1024) - 1.0
    # measured before step 1: the untrained model is near ln(vocab), and the final val loss well below it
    assert abs(metrics["initial_eval_loss"] - math.log(1024)) < 0.5
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 1.0

    # A standard HF model dir: loads with no flags, every weight moved away from the seeded init.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt.scratch.model import ArchArgs, build_model

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    init = build_model(model.config, seed=42)
    trained = dict(model.named_parameters())
    unchanged = [n for n, p in init.named_parameters() if (p == trained[n]).all()]
    assert not unchanged, unchanged
    assert ArchArgs().tie_embeddings

    # ... and every other stage takes it as a base.
    sft_out = tmp_path / "sft"
    run_stage("sft", "--model.name_or_path", out, "--data.train_files", FIXTURES / "sharegpt.jsonl",
              "--finetune.type", "full", "--template", "chatml", "--output_dir", sft_out, *QUICK)
    assert_all_changed(tracked)
    assert assert_artifacts(sft_out, adapter=False)["global_step"] == 2


def test_scratch_qwen2_builds(packed, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_stage(*scratch(tokenizer_dir, out, "--data.train_files", packed["zh"], "--train.max_steps", 2,
                       "--model.init", "qwen2", "--arch.tie_embeddings", "false", "--arch.rope_theta", 1e6))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen2" and not model.config.tie_word_embeddings
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e6  # for older readers (llama.cpp)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # qwen2's q/k/v bias
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


def test_curriculum_switches_phase_on_time(packed, tokenizer_dir, tmp_path, capsys):
    recipe = tmp_path / "phases.yaml"
    recipe.write_text(f"pt:\n  phases:\n"
                      f"    - {{name: general, steps: 6, data: {{{packed['en']}: 1}}}}\n"
                      f"    - {{name: anneal, steps: 4, data: {{{packed['zh']}: 3, {packed['en']}: 1}}}}\n")
    out = tmp_path / "out"
    run_stage(*scratch(tokenizer_dir, out, config=recipe))
    log = capsys.readouterr().out
    assert "phase 1/2 'general': steps 1-6 of 10" in log and "phase 2/2 'anneal': steps 7-10 of 10" in log
    train = [h for h in history(out) if "loss" in h]
    assert [h["phase"] for h in train] == ["general"] * 6 + ["anneal"] * 4
    # WSD over the whole run: warmup 3 steps, peak until the decay of the last 2 (= the anneal's end), then 0.1x.
    lr = {h["step"]: h["learning_rate"] for h in train}
    assert lr[1] == pytest.approx(1e-3) and lr[3] == lr[8] == pytest.approx(3e-3) and lr[10] == pytest.approx(3e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 10
    assert {"eval_loss/en", "eval_loss/zh"} <= set(metrics)  # each corpus's val split, and their mean
    saved = (out / "config.yaml").read_text()
    assert "name: anneal" in saved and "lr_scheduler: auto" in saved


def test_resume_continues_exactly(packed, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = scratch(tokenizer_dir, out, "--data.train_files", packed["en"], "--train.max_steps", 8,
                   "--train.save_steps", 4, "--train.tensorboard", "false")
    run_stage(*argv)
    first, first_history = weights(out), history(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert {"optimizer.pt", "rng_state.pth", "trainer_state.json", COMPLETE, "model.safetensors"} <= \
        {p.name for p in (out / "checkpoint-4").iterdir()}

    (out / "checkpoint-8" / COMPLETE).unlink()  # as if killed while writing checkpoint-8
    capsys.readouterr()
    run_stage(*argv, "--resume")
    log = capsys.readouterr().out
    assert "removing incomplete checkpoint checkpoint-8" in log and "resuming from" in log
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8
    again = weights(out)
    assert all((first[k] == again[k]).all() for k in first), "the resumed run diverged from the unbroken one"
    assert [h.get("loss") for h in history(out)] == [h.get("loss") for h in first_history]


def test_continued_pretraining_on_packed_data(packed, tiny_llama, tmp_path):
    """Without --model.init, packed dirs continue a pretrained model (here full fine-tuning) in the same loop."""
    out = tmp_path / "out"
    run_stage("pt", "--model.name_or_path", tiny_llama, "--data.train_files", packed["en"], "--finetune.type", "full",
              *FAST, "--train.max_steps", 2, "--output_dir", out)
    assert assert_artifacts(out, adapter=False)["global_step"] == 2


def test_refusals(packed, tokenizer_dir, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    err = fails(capsys, *scratch(tokenizer_dir, out, "--data.train_files", packed["other_vocab"],
                                 "--train.max_steps", 2))
    assert "was packed with a tokenizer of 6400 tokens" in err and "has 1024 tokens" in err
    err = fails(capsys, *scratch(tokenizer_dir, out, "--data.train_files", packed["tiny"], "--train.max_steps", 2))
    assert "not more than one context of 64" in err and "lower --train.max_length" in err

    recipe = tmp_path / "phases.yaml"
    recipe.write_text(f"pt:\n  phases:\n    - {{name: general, steps: 2, data: {{{packed['en']}: 1}}}}\n"
                      f"    - {{name: medical, steps: 2, data: {{{tmp_path / 'nowhere'}: 1}}}}\n")
    err = fails(capsys, *scratch(tokenizer_dir, out, config=recipe))
    assert "phase 2 ('medical')" in err and "nowhere is not a packed corpus" in err

    err = fails(capsys, *scratch(tokenizer_dir, out, "--data.train_files", packed["en"], "--train.max_steps", 2,
                                 "--arch.max_position_embeddings", 32))
    assert "longer than the model's context" in err
    err = fails(capsys, *scratch(tokenizer_dir, out, "--data.train_files", DEMO / "pretrain_en.txt",
                                 "--train.max_steps", 2))
    assert "is not a packed corpus" in err and "medgpt pack" in err
    err = fails(capsys, "pt", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "pretrain_en.txt",
                "--arch.hidden_size", 64, "--output_dir", out)
    assert "--model.init is not set" in err
    err = fails(capsys, *scratch(tokenizer_dir, out, "--data.train_files", packed["en"], "--train.max_steps", 2,
                                 "--arch.num_heads", 3))
    assert "not divisible by --arch.num_heads 3" in err
    assert not out.exists()  # every refusal came before the output dir was made


def test_text_pretraining_takes_warmup_stable_decay(tiny_llama, tmp_path, capsys):
    """The Trainer path (text files) gets the same 1-sqrt WSD decay; its default stays cosine (`auto`)."""
    import re

    run_stage("pt", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "pretrain_en.txt",
              "--finetune.type", "full", "--output_dir", tmp_path / "out", *QUICK, "--train.max_steps", 4,
              "--train.max_length", 32, "--train.lr_scheduler", "warmup_stable_decay", "--pt.decay_fraction", 0.5)
    lrs = [float(v) for v in re.findall(r"'learning_rate': '([0-9.e-]+)'", capsys.readouterr().out)]
    assert lrs[0] == pytest.approx(1e-2) and 1e-3 <= lrs[-1] < 1e-2, lrs
    err = fails(capsys, "pt", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "pretrain_en.txt",
                "--train.lr_scheduler", "warmup_stable_decay", "--output_dir", tmp_path / "out2")
    assert "needs --train.max_steps" in err
