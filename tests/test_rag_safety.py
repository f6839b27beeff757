"""`medgpt rag index` never deletes a user's files and survives unreadable documents: it replaces only a directory
that provably holds its own index and nothing else, keeps the index apart from the documents, cleans only its own
leftovers, and skips (and names) documents it cannot read."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.rag.index import KIND, Index, clean_leftovers

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "rag"


def _docs(tmp_path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "gout.md").write_text("# Gout\n\nGout causes sudden joint pain. Allopurinol lowers uric acid.\n",
                                  encoding="utf-8")
    (docs / "asthma.txt").write_text("Asthma narrows the airways.\nA reliever inhaler opens them.\n",
                                     encoding="utf-8")
    return docs


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (hidden ones too) -> its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _results(tmp_path, docs):
    d = tmp_path / "results"
    d.mkdir()
    (d / "meta.json").write_text('{"run": "eval-3", "accuracy": 0.71}\n', encoding="utf-8")
    (d / "scores.csv").write_text("question,score\nq1,1\nq2,0\n", encoding="utf-8")
    return d


def _pack(tmp_path, docs):
    """What `medgpt pack` writes (its meta.json says format 1 too, with other keys)."""
    d = tmp_path / "corpus"
    d.mkdir()
    meta = {"format": 1, "dtype": "uint16", "vocab_size": 512, "eos_token_id": 2, "tokenizer": "tok",
            "val_fraction": 0.1, "seed": 0, "splits": {"train": {"tokens": 4, "documents": 1}}}
    (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    for name in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy"):
        (d / name).write_bytes(bytes(range(16)))
    (d / "config.yaml").write_text("pack: {}\n", encoding="utf-8")
    return d


def _unrelated_meta(tmp_path, docs):
    d = tmp_path / "other"
    d.mkdir()
    (d / "meta.json").write_text('{"format": 1, "settings": {}, "docs": []}\n', encoding="utf-8")
    return d


def _index_plus(tmp_path, docs):
    """Our own index, with a user's file put beside it (a random name: hidden, a look-alike, a folder...)."""
    d = tmp_path / "kb"
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(d)]) == 0
    name = random.Random(len(str(tmp_path))).choice(["notes.txt", ".git", "chunks.jsonl.bak", "embeddings.npz"])
    (d / name).write_text("mine\n", encoding="utf-8")
    return d


def _index_with_dir_named_like_ours(tmp_path, docs):
    d = tmp_path / "kb2"
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(d)]) == 0
    (d / "embeddings.npy").mkdir()
    (d / "embeddings.npy" / "keep.txt").write_text("mine\n", encoding="utf-8")
    return d


def _docs_with_meta(tmp_path, docs):
    (docs / "meta.json").write_text('[{"title": "Site", "text": "About this leaflet collection."}]\n',
                                    encoding="utf-8")
    return docs


FOREIGN = {
    "results folder": (_results, "not a medgpt knowledge-base index"),
    "pack corpus": (_pack, "not a medgpt knowledge-base index"),
    "unrelated meta.json": (_unrelated_meta, "not a medgpt knowledge-base index"),
    "index + a user's file": (_index_plus, "also files that are not part of it"),
    "index + a folder named embeddings.npy": (_index_with_dir_named_like_ours, "also files that are not part of it"),
    "the docs folder itself": (lambda tmp_path, docs: docs, "is the document path"),
    "the docs folder, holding a meta.json": (_docs_with_meta, "is the document path"),
    "inside the docs folder": (lambda tmp_path, docs: docs / "index", "lies inside the document path"),
    "a folder holding the docs": (lambda tmp_path, docs: tmp_path, "contains the document path"),
}


@pytest.mark.parametrize("rebuild", [False, True])
@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_index_dirs_are_never_touched(tmp_path, capsys, kind, rebuild):
    make, message = FOREIGN[kind]
    docs = _docs(tmp_path)
    index_dir = make(tmp_path, docs)
    capsys.readouterr()
    before = _tree(tmp_path)
    args = ["rag", "index", str(docs), "--rag.index_dir", str(index_dir)] + (["--rag.rebuild"] if rebuild else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "--rag.index_dir" in err and "Traceback" not in err
    assert _tree(tmp_path) == before  # every file byte-identical, nothing added or removed


def test_refusal_names_the_foreign_files(tmp_path, capsys):
    docs = _docs(tmp_path)
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(_pack(tmp_path, docs))]) == 1
    err = capsys.readouterr().err
    assert "train.bin" in err and "config.yaml" in err and "Choose another --rag.index_dir" in err


def test_an_index_dir_that_is_a_file_or_a_link_is_refused(tmp_path, capsys):
    docs = _docs(tmp_path)
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(tmp_path / "file")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(tmp_path / "kb")]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "kb")
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(tmp_path / "link")]) == 1
    assert "symbolic link" in capsys.readouterr().err
    assert (tmp_path / "link").is_symlink()


def test_own_index_is_replaced_and_carries_its_identity(tmp_path, capsys):
    docs = _docs(tmp_path)
    kb = tmp_path / "kb"
    kb.mkdir()  # an empty directory is fine
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    meta = json.loads((kb / "meta.json").read_text(encoding="utf-8"))
    assert meta["kind"] == KIND and meta["format"] == 2
    assert main(["rag", "index", str(docs / "gout.md"), "--rag.index_dir", str(kb), "--rag.rebuild"]) == 0
    assert "1 read" in capsys.readouterr().out
    assert [c["source"] for c in Index.load(kb).chunks] == [str(docs / "gout.md")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "kb"]  # no temp or old dir left behind


def test_format1_index_is_recognised_loaded_and_replaced(tmp_path, capsys):
    docs = _docs(tmp_path)
    kb = tmp_path / "kb"
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    meta = json.loads((kb / "meta.json").read_text(encoding="utf-8"))
    del meta["kind"]
    meta["format"] = 1
    (kb / "meta.json").write_text(json.dumps(meta), encoding="utf-8")  # as an older medgpt wrote it
    assert len(Index.load(kb)) == len(Index.load(kb).chunks) > 0
    capsys.readouterr()
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    assert "up to date: 2 documents unchanged" in capsys.readouterr().out  # its chunks are reused
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb), "--rag.rebuild"]) == 0
    assert json.loads((kb / "meta.json").read_text(encoding="utf-8"))["kind"] == KIND
    meta["extra"] = 1  # one key more: no longer provably ours
    (kb / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 1
    assert "not a medgpt knowledge-base index" in capsys.readouterr().err


def test_damaged_own_index_is_rebuilt(tmp_path, capsys):
    docs = _docs(tmp_path)
    kb = tmp_path / "kb"
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    (kb / "chunks.jsonl").write_text('{"source": "x"}\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    out = capsys.readouterr().out
    assert "rebuilding: the index in" in out and "2 read" in out
    (kb / "chunks.jsonl").unlink()
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    assert len(Index.load(kb)) > 0


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_run_are_cleaned_only_when_ours(tmp_path, capsys):
    docs = _docs(tmp_path)
    dead, live = _dead_pid(), os.getppid()
    ours = {f".kb.medgpt-{dead}.abcd_123.tmp": "chunks.jsonl", f".kb.old-{dead}": "meta.json",
            ".kb.x1y2z3w4.tmp": "embeddings.npy", f".kb.medgpt-{dead}.emptydir.tmp": None}
    theirs = {f".kb.medgpt-{live}.abcd_123.tmp": "chunks.jsonl", f".kb.old-{live}": "meta.json",  # still running
              f".kb.old-{dead}7": "notes.txt", ".kb.short.tmp": "chunks.jsonl", f".other.old-{dead}": "meta.json",
              f".kb.medgpt-{dead}.abcd_124.tmp": "thesis.docx"}
    for name, file in {**ours, **theirs}.items():
        (tmp_path / name).mkdir()
        if file:
            (tmp_path / name / file).write_text("x", encoding="utf-8")
    (tmp_path / f".kb.old-{dead}9").write_text("a file, not a dir", encoding="utf-8")
    def top(name):
        return Path(name).parts[0]

    before = {n: v for n, v in _tree(tmp_path).items() if top(n) not in ours}
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(tmp_path / "kb")]) == 0
    assert "left beside the index by an interrupted run" in capsys.readouterr().out
    after = _tree(tmp_path)
    assert not [n for n in after if top(n) in ours]
    assert {n: v for n, v in after.items() if top(n) != "kb"} == before
    assert clean_leftovers(tmp_path / "kb") == []


def test_unreadable_documents_are_skipped_named_and_counted(tmp_path, capsys, monkeypatch):
    docs = _docs(tmp_path)
    (docs / "corrupt.pdf").write_bytes((FIX / "leaflet.pdf").read_bytes()[:200])
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    (docs / "mixed.md").write_bytes("第一行\n".encode() + b"\xff\xfa\x80 broken\n")
    (docs / "fake.docx").write_text("not a zip", encoding="utf-8")
    (docs / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n', encoding="utf-8")
    (docs / "gone.md").symlink_to(tmp_path / "deleted.md")
    (docs / "locked.md").write_text("# Locked\n\nSecret.\n", encoding="utf-8")
    import medgpt.rag.index as index_mod

    real = index_mod.file_sha256

    def sha(path):  # tests run as root, where chmod 000 does not stop a read
        if path.endswith("locked.md"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(index_mod, "file_sha256", sha)
    kb = tmp_path / "kb"
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 0
    out = capsys.readouterr().out
    for name, reason in [("corrupt.pdf", ""), ("image.txt", "undecodable"), ("mixed.md:2", "undecodable"),
                         ("fake.docx", ""), ("bad.jsonl:2", "malformed JSON"), ("gone.md", "No such file"),
                         ("locked.md", "Permission denied")]:
        line = next((ln for ln in out.splitlines() if ln.startswith("warning: skipped") and name in ln), "")
        assert reason in line and line, (name, out)
    assert "(2 read, 0 unchanged, 0 removed, 0 empty, 7 unreadable)" in out
    assert sorted({Path(c["source"]).name for c in Index.load(kb).chunks}) == ["asthma.txt", "gout.md"]

    (docs / "gout.md").unlink()
    (docs / "asthma.txt").unlink()
    assert main(["rag", "index", str(docs), "--rag.index_dir", str(kb)]) == 1
    err = capsys.readouterr().err
    assert "no document could be read (7 unreadable, 0 empty)" in err and "Traceback" not in err


@pytest.mark.parametrize("name, text", [("cafe.txt", "Café au lait, naïve résumé.\n"),
                                        ("cafe.jsonl", '{"text": "Café au lait, naïve résumé."}\n')])
def test_encoding_error_suggests_a_flag_that_works(tmp_path, capsys, name, text):
    import re

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / name).write_bytes(text.encode("latin-1"))
    kb = str(tmp_path / "kb")
    assert main(["rag", "index", str(docs), "--rag.index_dir", kb]) == 1
    err = capsys.readouterr().err
    assert "--data.encoding" not in err
    flag, example = re.search(r"(--rag\.encoding) \(e\.g\. .*?(latin-1)\)", err).groups()
    assert main(["rag", "index", str(docs), "--rag.index_dir", kb, flag, example]) == 0
    assert "café" in Index.load(kb).chunks[0]["text"].lower()
    assert main(["rag", "index", str(docs), "--rag.index_dir", kb, "--rag.encoding", "no-such-codec"]) == 1
    assert "unknown text encoding 'no-such-codec' in --rag.encoding" in capsys.readouterr().err
