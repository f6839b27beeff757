"""`medgpt pack`: pack/unpack identity, meta, val split, dtype choice, refusals, crash safety, num_proc parity."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medgpt.config import parse_argv
from medgpt.scratch import memmap
from medgpt.scratch.pack import Config, SplitWriter, run
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]
DEMO = [str(ROOT / "data/demo/pretrain_zh.txt"), str(ROOT / "data/demo/pretrain_en.txt")]
TEXTS = [
    "高血压是以动脉血压持续升高为主要特征的慢性疾病。",
    "Hypertension means blood pressure at or above 140/90 mmHg on repeated readings.",
    "混合 mixed text: 对乙酰氨基酚 paracetamol 4 g/day, emoji 🩺, tabs\tand\nnewlines.",
    "A literal <|endoftext|> or <|im_start|> inside a document is text, not a separator.",
    "  leading and trailing spaces  ",
    "如果出现胸痛并向左臂放射，请立即拨打急救电话。",
]


def pack(tokenizer_dir, out, *files, **flags) -> dict:
    argv = [*map(str, files), "--model.name_or_path", str(tokenizer_dir), "--output_dir", str(out)]
    for k, v in flags.items():
        argv += [f"--{k.replace('__', '.')}", str(v)]
    assert run(parse_argv(Config, argv, positional="data.train_files")) == 0
    return memmap.load_meta(out)


def documents(out, split: str) -> list[np.ndarray]:
    """The token ids of every document of a split (each ends with its EOS), cut at the idx offsets."""
    data = np.asarray(memmap.open_split(out, split))
    starts = np.load(Path(out) / f"{split}.idx.npy")
    assert starts.dtype == np.uint64
    return np.split(data, starts[1:].astype(np.int64)) if len(starts) else []


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_pack_unpack_identity(tmp_path, tokenizer_dir, tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    meta = pack(tokenizer_dir, tmp_path / "out", corpus, pack__val_fraction=0, pack__batch_docs=4)
    assert list(meta["splits"]) == ["train"]
    docs = documents(tmp_path / "out", "train")
    eos = tokenizer.eos_token_id
    assert len(docs) == len(TEXTS)
    for doc, text in zip(docs, TEXTS):
        assert doc[-1] == eos and eos not in doc[:-1]  # exactly one EOS, at the end
        assert tokenizer.decode(doc[:-1].tolist()) == text
    # Ordinary text gets exactly the tokenizer's own ids.
    assert docs[0][:-1].tolist() == tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]


def test_meta_fields_and_sha(tmp_path, tokenizer_dir, tokenizer):
    out = tmp_path / "out"
    meta = pack(tokenizer_dir, out, *DEMO, pack__val_fraction=0.05)
    assert meta["format"] == memmap.FORMAT and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == len(tokenizer) and meta["eos_token_id"] == tokenizer.eos_token_id
    n_lines = sum(1 for f in DEMO for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip())
    assert sum(s["documents"] for s in meta["splits"].values()) == n_lines
    for split, info in meta["splits"].items():
        f = out / info["file"]
        assert f.stat().st_size == 2 * info["tokens"]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == info["sha256"]
        assert len(np.load(out / f"{split}.idx.npy")) == info["documents"]
        assert sum(len(d) for d in documents(out, split)) == info["tokens"]
    assert (out / "config.yaml").is_file()
    assert [p.name for p in out.glob(".*")] == [".medgpt-output.json"]  # no temp files left, only our marker


def test_val_split_is_deterministic(tmp_path, tokenizer_dir):
    a = pack(tokenizer_dir, tmp_path / "a", *DEMO, pack__val_fraction=0.1)
    b = pack(tokenizer_dir, tmp_path / "b", *DEMO, pack__val_fraction=0.1, pack__batch_docs=7)
    c = pack(tokenizer_dir, tmp_path / "c", *DEMO, pack__val_fraction=0.1, pack__seed=1)
    assert 0 < a["splits"]["val"]["documents"] < a["splits"]["train"]["documents"]
    assert a["splits"] == b["splits"]  # batching does not change which document goes where
    assert c["splits"]["val"]["sha256"] != a["splits"]["val"]["sha256"]  # another seed, another split
    # Two documents and a small fraction: the hash alone would leave val empty; one document moves over.
    tiny = write_jsonl(tmp_path / "tiny.jsonl", TEXTS[:2])
    meta = pack(tokenizer_dir, tmp_path / "tiny", tiny, pack__val_fraction=0.01)
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 1


def test_eval_files_are_the_val_split(tmp_path, tokenizer_dir, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS[:4])
    held = write_jsonl(tmp_path / "held.jsonl", TEXTS[4:])
    meta = pack(tokenizer_dir, tmp_path / "out", train, data__eval_files=held, pack__val_fraction=0.5)
    assert meta["splits"]["train"]["documents"] == 4 and meta["val_fraction"] == 0  # no hashing with eval_files
    assert [tokenizer.decode(d[:-1].tolist()) for d in documents(tmp_path / "out", "val")] == TEXTS[4:]
    # One document and a large fraction: it trains (no val) rather than leaving train empty.
    one = write_jsonl(tmp_path / "one.jsonl", TEXTS[:1])
    meta = pack(tokenizer_dir, tmp_path / "one", one, pack__val_fraction=0.99)
    assert list(meta["splits"]) == ["train"] and meta["splits"]["train"]["documents"] == 1
    with pytest.raises(MedGPTError, match="--pack.val_fraction"):
        pack(tokenizer_dir, tmp_path / "o", train, data__eval_split=0.1)


def test_num_proc_2_is_byte_identical(tmp_path, tokenizer_dir):
    pack(tokenizer_dir, tmp_path / "one", *DEMO, pack__batch_docs=64)
    pack(tokenizer_dir, tmp_path / "two", *DEMO, pack__batch_docs=64, pack__num_proc=2)
    for name in ("train.bin", "train.idx.npy", "val.bin", "val.idx.npy", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.fixture()
def big_vocab(monkeypatch, tokenizer):
    """The test tokenizer grown past 65,536 ids (real added tokens, so ids above uint16 occur)."""
    import medgpt.model.load

    tokenizer.add_tokens([f"zz{i}" for i in range(66_000)])
    monkeypatch.setattr(medgpt.model.load, "load_tokenizer", lambda model: tokenizer)
    return tokenizer


def test_big_vocab_packs_as_uint32(tmp_path, tokenizer_dir, big_vocab):
    texts = ["高血压 zz65999 hypertension", "zz0 and zz12345"]
    meta = pack(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "c.jsonl", texts), pack__val_fraction=0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(big_vocab) > 65536
    docs = documents(tmp_path / "out", "train")
    assert docs[0].max() > 65535
    assert [big_vocab.decode(d[:-1].tolist()) for d in docs] == texts


def test_uint16_forced_with_big_vocab_is_refused(tmp_path, tokenizer_dir, big_vocab):
    with pytest.raises(MedGPTError, match=r"uint16 holds ids up to 65535.*--pack.dtype uint32"):
        pack(tokenizer_dir, tmp_path / "out", *DEMO, pack__dtype="uint16")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_empty_corpus_writes_nothing(tmp_path, tokenizer_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MedGPTError, match="empty"):
        pack(tokenizer_dir, tmp_path / "out", tmp_path / "empty.txt")
    assert not (tmp_path / "out").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(MedGPTError, match="empty"):
        pack(tokenizer_dir, tmp_path / "existing", tmp_path / "empty.txt")
    assert list((tmp_path / "existing").iterdir()) == []


def test_refusals(tmp_path, tokenizer_dir, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for flag in ({}, {"overwrite": "true"}):  # a folder medgpt did not write is never packed into
        with pytest.raises(MedGPTError, match="medgpt did not write what it holds \\(keep.txt"):
            pack(tokenizer_dir, out, *DEMO, **flag)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(MedGPTError, match="does not exist"):
        pack(tmp_path / "no-such-tokenizer", tmp_path / "o1", *DEMO)
    with pytest.raises(MedGPTError, match="needs text records.*chat"):
        pack(tokenizer_dir, tmp_path / "o2", ROOT / "data/demo/sft_sharegpt.jsonl")
    assert not (tmp_path / "o2").exists()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(MedGPTError, match="no EOS token"):
        pack(tmp_path / "no-eos", tmp_path / "o3", *DEMO)


def test_overwrite_replaces_an_older_pack(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    pack(tokenizer_dir, out, *DEMO, pack__val_fraction=0.1)
    meta = pack(tokenizer_dir, out, DEMO[0], pack__val_fraction=0, overwrite="true")
    assert list(meta["splits"]) == ["train"]
    assert not (out / "val.bin").exists()  # the older pack's val split does not linger


def test_truncated_bin_is_detected(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    pack(tokenizer_dir, out, *DEMO)
    with open(out / "train.bin", "r+b") as f:
        f.truncate((out / "train.bin").stat().st_size - 2)
    with pytest.raises(MedGPTError, match=r"train.bin.*truncated.*medgpt pack"):
        memmap.load_meta(out)


def test_killed_overwrite_keeps_the_earlier_corpus(tmp_path, tokenizer_dir, monkeypatch):
    """A pack --overwrite that dies mid-write leaves the earlier complete corpus readable, and no partial files."""
    out = tmp_path / "out"
    pack(tokenizer_dir, out, *DEMO)  # an older, complete pack that --overwrite replaces
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".medgpt-output.json"}
    calls = []
    real = SplitWriter.write

    def dying(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a crash) mid-write looks like
        real(self, tokens, lengths)

    monkeypatch.setattr(SplitWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        pack(tokenizer_dir, out, *DEMO, pack__batch_docs=50, overwrite="true")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert [p.name for p in out.glob(".*")] == [".medgpt-output.json"]  # no partial files
    memmap.load_meta(out)  # still a readable corpus


def test_kill9_temp_files_are_removed_by_the_next_run(tmp_path, tokenizer_dir):
    """kill -9 leaves hidden temp files that nothing could clean before; the next run removes them (dead pid)."""
    out = tmp_path / "out"
    pack(tokenizer_dir, out, *DEMO)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)  # a pid that has exited
    left = out / f".train.bin.medgpt-{dead}.abcd1234.tmp"
    left.write_bytes(b"\0" * 1000)
    alive = out / f".train.bin.medgpt-{os.getpid()}.abcd1234.tmp"  # a live process's temp file stays
    alive.write_bytes(b"x")
    user = out / ".train.bin.mine.tmp"  # not our naming: stays
    user.write_bytes(b"x")
    pack(tokenizer_dir, out, *DEMO, overwrite="true")
    assert not left.exists() and alive.exists() and user.exists()


def test_random_windows_use_every_start(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    meta = pack(tokenizer_dir, out, write_jsonl(tmp_path / "c.jsonl", TEXTS), pack__val_fraction=0)
    n = meta["splits"]["train"]["tokens"]
    memmap.check_block(out, "train", n - 1)  # n tokens make exactly one window of n - 1 (+1 shifted target)
    x, y = memmap.random_windows(out, "train", n - 1, 2, np.random.default_rng(0))
    data = np.asarray(memmap.open_split(out, "train"))
    assert x[0].tolist() == data[:-1].tolist() and y[0].tolist() == data[1:].tolist()


def test_chat_template_packs_conversations_with_special_tokens(tmp_path, tokenizer_dir, tokenizer):
    from medgpt.data.templates import render
    from medgpt.data.validate import load_records

    src = ROOT / "tests/fixtures/data/sharegpt.jsonl"
    pack(tokenizer_dir, tmp_path / "out", src, pack__val_fraction=0, pack__chat_template="chatml")
    docs = documents(tmp_path / "out", "train")
    records = load_records([str(src)], "chat")
    assert len(docs) == len(records)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for doc, rec in zip(docs, records):
        text = render("chatml", rec["messages"], bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token).text
        assert doc[-1] == tokenizer.eos_token_id
        assert doc[:-1].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert doc[0] == start  # <|im_start|> is one special token, not its characters


def test_chat_files_are_refused_without_a_template(tmp_path, tokenizer_dir):
    with pytest.raises(MedGPTError, match="sharegpt"):
        pack(tokenizer_dir, tmp_path / "out", ROOT / "tests/fixtures/data/sharegpt.jsonl")
