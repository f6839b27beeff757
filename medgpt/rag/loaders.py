"""Files -> `Segment`s (text + the line a reader can jump to + heading) for `medgpt rag index`.

    medgpt rag index data/demo/knowledge manual.pdf notes.docx faq.jsonl

One reader per file type:
- .txt / .md: one segment per non-blank line, numbered as in the file; markdown headings (`#`..`######`) are not
  text but the heading path of the lines below them ("Hypertension > Diagnosis"), and each heading starts a new
  group (a chunk never spans two sections).
- .jsonl / .json: one record per group, its line in the file; the text is the record's `text` or `content`
  field, or whatever medgpt reads the record as (a conversation's turns, an MCQ with its options and answer, ...).
  A `title` field becomes the heading.
- .pdf (pypdf): one group per page; a page's visually wrapped lines are joined back into paragraphs, and the
  "line" is the page number.
- .docx (python-docx): paragraphs (and table rows) in document order; the "line" is the paragraph number, and
  Heading/Title paragraphs form the heading path.
Text files are decoded like every medgpt data file (UTF-8, UTF-8 with BOM, or GB18030; `--rag.encoding` names
another), strictly: an undecodable file is an error naming the line, not mojibake in the index.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from pathlib import Path

from medgpt.rag.chunk import Segment
from medgpt.utils import MedGPTError

DOC_TYPES = (".txt", ".md", ".markdown", ".jsonl", ".json", ".pdf", ".docx")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_RULE = re.compile(r"^\s*(?:```.*|~~~.*|[-*_=]{3,}|\|?[\s:|-]*-{3,}[\s:|-]*\|?)\s*$")  # fences, rules, table rules
_INSTALL = "pip install 'medgpt[rag]'"
_ENCODING_HINT = "re-save the file as UTF-8, or set --rag.encoding (e.g. gbk, gb18030, big5, latin-1)"


def find_documents(specs: list[str]) -> list[str]:
    """Files, directories (walked recursively, hidden entries skipped) and globs -> the document files, in order.

    Inside a directory only known document types are taken; a file named explicitly must be one of them.
    """
    out: list[str] = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        if os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in files
                          if not f.startswith(".") and f.lower().endswith(DOC_TYPES)]
            if not found:
                raise MedGPTError(f"directory {spec} holds no documents ({', '.join(DOC_TYPES)}). "
                                  f"Point --rag.docs at the files themselves or add some.")
            out += sorted(found)
        elif os.path.isfile(spec):
            if not spec.lower().endswith(DOC_TYPES):
                raise MedGPTError(f"{spec}: unsupported document type '{Path(spec).suffix}'; "
                                  f"supported: {', '.join(DOC_TYPES)}.")
            out.append(spec)
        elif any(c in spec for c in "*?["):
            found = sorted(m for m in glob.glob(spec, recursive=True)
                           if os.path.isfile(m) and m.lower().endswith(DOC_TYPES))
            if not found:
                raise MedGPTError(f"glob '{spec}' matches no documents ({', '.join(DOC_TYPES)}) in {os.getcwd()}; "
                                  f"check the pattern (quote it so the shell leaves it alone).")
            out += found
        else:
            raise MedGPTError(f"document '{spec}' not found (looked in {os.getcwd()}). Check the path.")
    return list(dict.fromkeys(out))


def load_document(path: str, encoding: str = "auto") -> list[Segment]:
    """The segments of one file (empty when the file has no text); MedGPTError when it cannot be read.

    `encoding` applies to text files (.txt .md .jsonl .json): auto, or a codec name such as gbk or latin-1."""
    ext = Path(path).suffix.lower()
    if ext == ".pdf":
        return _pdf(path)
    if ext == ".docx":
        return _docx(path)
    if ext in (".jsonl", ".json"):
        return _records(path, encoding)
    text = read_text(path, encoding)
    return _markdown(text) if ext in (".md", ".markdown") else _plain(text)


def _rag_hint(message: str) -> str:
    """The shared readers suggest --data.encoding, which `medgpt rag index` spells --rag.encoding."""
    return message.replace("--data.encoding", "--rag.encoding")


def read_text(path: str, encoding: str = "auto") -> str:
    """A text file decoded strictly: as UTF-8 (BOM or not) or GB18030, whichever it is, or as `encoding`."""
    from medgpt.data.readers import detect_encoding

    try:  # raises with file:line for bytes that decode as neither
        encoding = detect_encoding(path) if encoding == "auto" else encoding
    except MedGPTError as e:
        raise MedGPTError(_rag_hint(str(e))) from None
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as e:  # past the detection sample, or not in the encoding the user named
        line = data.count(b"\n", 0, e.start) + 1
        raise MedGPTError(f"{path}:{line}: undecodable bytes as {encoding}; {_ENCODING_HINT}.") from None


def _plain(text: str) -> list[Segment]:
    return [Segment(line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _clean_heading(text: str) -> str:
    return re.sub(r"[*_`]+", "", text).strip()


def _markdown(text: str) -> list[Segment]:
    out = []
    stack: list[tuple[int, str]] = []  # (level, title) of the headings above the current line
    group = 0
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADING.match(line)
        if m:
            level = len(m.group(1))
            stack = [h for h in stack if h[0] < level] + [(level, _clean_heading(m.group(2)))]
            group += 1
            continue
        if not line.strip() or _RULE.match(line):
            continue
        out.append(Segment(line.strip(), n, " > ".join(t for _, t in stack if t), group))
    return out


def document_text(obj: dict) -> str:
    """The text of one JSON record: its `text`/`content` field, else the canonical record rendered as text."""
    from medgpt.data.formats import record_kind, render_mcq, to_canonical

    for key in ("text", "content"):
        if isinstance(obj.get(key), str):
            return obj[key]
    record = to_canonical(obj)  # RecordError for a record medgpt cannot read
    kind = record_kind(record)
    if kind == "text":
        return record["text"]
    if kind == "mcq":
        return render_mcq(record) + f"\nAnswer: {record['answer']}"
    turns = record.get("messages") or (record.get("prompt", []) + record.get("chosen", []))
    parts = [m["content"] for m in turns]
    if isinstance(record.get("answer"), str):
        parts.append(record["answer"])
    return "\n".join(parts)


def _records(path: str, encoding: str = "auto") -> list[Segment]:
    from medgpt.data.formats import RecordError
    from medgpt.data.readers import iter_raw

    out = []
    for i, raw in enumerate(iter_raw(path, encoding)):
        if raw.error is not None:
            raise MedGPTError(f"{raw.file}:{raw.line}: {_rag_hint(raw.error)}. Fix the record, or run "
                              f"`medgpt data validate {path}` to list every problem.")
        try:
            text = document_text(raw.obj)
        except RecordError as e:
            raise MedGPTError(f"{raw.file}:{raw.line}: {e}. A knowledge-base record needs a `text` or `content` "
                              f"field (or any record format medgpt reads).") from None
        title = raw.obj.get("title")
        heading = title.strip() if isinstance(title, str) else ""
        out += [Segment(line, raw.line, heading, i) for line in text.splitlines() if line.strip()]
    return out


def _unwrap(lines: list[str]) -> list[str]:
    """A PDF page's visual lines -> paragraphs: a line continues the one before unless that one ended a
    sentence, was short (a title, or a paragraph's last line: under 60% of the page's longest line), or a blank
    line sits between them."""
    paragraphs: list[str] = []
    current = ""
    width = max((len(line.strip()) for line in lines), default=0)
    short = False
    for line in lines:
        line = line.strip()
        if not line:
            if current:
                paragraphs.append(current)
            current = ""
            continue
        if not current:
            current = line
        elif short or current[-1] in "。！？；.!?:：":
            paragraphs.append(current)
            current = line
        elif current.endswith("-") and current[-2:-1].isalpha():  # hyphenated at the line end
            current = current[:-1] + line
        else:
            current += (" " if current[-1].isascii() and line[0].isascii() else "") + line
        short = len(line) < 0.6 * width
    if current:
        paragraphs.append(current)
    return paragraphs


def _pdf(path: str) -> list[Segment]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise MedGPTError(f"reading {path} needs pypdf: {_INSTALL}") from None
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings repeat the error below, or are noise
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            reader.decrypt("")  # many PDFs are "encrypted" with an empty user password
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged files; all mean "cannot read"
        raise MedGPTError(f"{path}: cannot read this PDF ({type(e).__name__}: {e}). Check that it opens in a "
                          f"PDF viewer; a password-protected PDF must be decrypted first.") from None
    return [Segment(p, n, "", n) for n, text in enumerate(pages, 1) for p in _unwrap(text.splitlines())]


def _docx(path: str) -> list[Segment]:
    try:
        import docx
    except ImportError:
        raise MedGPTError(f"reading {path} needs python-docx: {_INSTALL}") from None
    try:
        document = docx.Document(path)
        blocks = list(document.iter_inner_content())
    except Exception as e:  # a damaged zip, or not a Word document at all
        raise MedGPTError(f"{path}: cannot read this .docx ({type(e).__name__}: {e}). Check that it opens in "
                          f"Word; an old .doc file must be saved as .docx first.") from None
    out = []
    stack: list[tuple[int, str]] = []
    group = number = 0
    for block in blocks:
        if isinstance(block, docx.table.Table):
            heading = " > ".join(t for _, t in stack)
            for row in block.rows:
                cells = list(dict.fromkeys(c.text.strip() for c in row.cells if c.text.strip()))  # merged cells repeat
                if cells:
                    out.append(Segment(" | ".join(cells), max(number, 1), heading, group))
            continue
        number += 1
        text = block.text.strip()
        style = (block.style.name if block.style is not None else "") or ""
        m = re.match(r"(Heading|Title)\s*(\d*)", style)
        if m and text:
            level = int(m.group(2) or 0) if m.group(1) == "Heading" else 0
            stack = [h for h in stack if h[0] < level] + [(level, text)]
            group += 1
        elif text:
            out.append(Segment(text, number, " > ".join(t for _, t in stack), group))
    return out
