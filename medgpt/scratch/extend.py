"""Add domain words to an existing tokenizer, and grow a model's embeddings to match.

    medgpt tokenizer extend configs/tiny/tokenizer_extend.yaml --model.name_or_path DIR --output_dir DIR
    medgpt tokenizer extend --model.name_or_path out/tokenizer --extend.words data/demo/medical_terms.txt \
        --output_dir out/tokenizer-med
    medgpt tokenizer extend data/demo/pretrain_*.txt --extend.num_words 200 --model.name_or_path out/pt \
        --output_dir out/pt-med

Words come from a list (one per line) and/or are mined from `--data.train_files`: Chinese character n-grams
(2-4 characters of CJK runs) and English words, ranked by frequency x tokens saved. Every word becomes one
normal (non-special) added token, so "二甲双胍" costs one token instead of seven.

Byte-level BPE and the leading space: inside a sentence an English word is " word" (GPT-2 style tokenizers put
the space into the word's first token), and an added token is matched in the raw text before pre-tokenization.
Adding only "word" would leave the space as a token of its own ("Ġ" + "word"), so an English word is added in
two forms, "word" (at a line start, after punctuation) and " word" (inside sentences), each only when it is not
one token already. Chinese has no spaces: one form. Casing is kept (BPE is case-sensitive); mining keeps each
word's most frequent casing, and lower-cases only for a tokenizer that lower-cases its input.

With a model (`--extend.model DIR`, or `--model.name_or_path` holding weights) the embedding table grows and
each new row (input and untied output) starts at the mean of the rows of the sub-tokens the word used to be
split into. config.json records `medgpt_added_tokens`, so that `load_model` trains the embeddings under LoRA.
The report (`extend_report.json`) gives characters per token on medical text before and after.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from medgpt.args import DataArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.data.text import CJK

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
CJK_RUN = re.compile(f"[{CJK}]+")
LATIN_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ][A-Za-zÀ-ÖØ-öø-ÿ0-9]*")
LATIN_START = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ0-9]")
# Particles and conjunctions almost never begin or end a term; being the commonest characters of all, n-grams
# such as "血压的" or "和高血" would otherwise crowd out real words.
EDGE_STOP = set("的了着吗呢吧啊和与或是在也都")
MAX_CANDIDATES = 1_000_000  # distinct n-grams kept while counting; beyond it the rarest half is dropped


@dataclass
class ExtendArgs:
    words: Optional[str] = arg(None, "Word list: one word or term per line (UTF-8 or GBK); blank lines and lines "
                               "starting with # are skipped.")
    num_words: int = arg(100, "Mine at most this many words from --data.train_files (0: mine none). An English "
                         "word may add two tokens, 'word' and ' word'.", min=0)
    min_count: int = arg(5, "A mined token ('word', ' word' or a Chinese n-gram) must occur this often.", min=1)
    max_ngram: int = arg(4, "Longest Chinese character n-gram to mine (the shortest is 2).", min=2)
    model: Optional[str] = arg(None, "Model directory whose embeddings grow to match. Default: "
                               "--model.name_or_path when it holds a model (config.json).")
    heldout_fraction: float = arg(0.05, "Share of the mined documents kept out of mining to measure the gain on, "
                                  "when no --data.eval_files are given.", min=0, below=1)


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "The tokenizer to extend: a tokenizer or model directory.")
    data: DataArgs = section(DataArgs, "Corpus to mine words from (train_files); medical text to measure "
                             "characters per token on (eval_files; default: held-out or demo text).")
    extend: ExtendArgs = section(ExtendArgs)
    output_dir: str = arg("", "Where the extended tokenizer (and model) go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")


# ----------------------------------------------------------------------------- words

def read_word_list(path: str) -> list[str]:
    """Words of a list file in order, without duplicates, comments (#) or blank lines; UTF-8 or GBK."""
    from medgpt.data.readers import detect_encoding
    from medgpt.utils import MedGPTError

    if not Path(path).is_file():
        raise MedGPTError(f"word list {path} does not exist. Check --extend.words (a text file, one word per line).")
    lines = Path(path).read_text(encoding=detect_encoding(path)).splitlines()
    return list(dict.fromkeys(w.strip() for w in lines if w.strip() and not w.strip().startswith("#")))


def is_cjk(s: str) -> bool:
    return CJK_RUN.fullmatch(s) is not None


def forms_of(word: str) -> list[str]:
    """The strings to add for a word: English (anything starting with a Latin letter or digit) also gets ' word'."""
    return [word, " " + word] if LATIN_START.match(word) else [word]


def count_candidates(texts: Iterable[str], lowercase: bool = False, max_ngram: int = 4) -> Counter:
    """Occurrences of CJK n-grams (2..max_ngram) and of English words, the latter split by what precedes them:
    ' word' after a space, 'word' anywhere else (line start, punctuation, Chinese)."""
    counts: Counter = Counter()
    for text in texts:
        for run in CJK_RUN.findall(text):
            for n in range(2, min(max_ngram, len(run)) + 1):
                counts.update(g for g in (run[i:i + n] for i in range(len(run) - n + 1))
                              if g[0] not in EDGE_STOP and g[-1] not in EDGE_STOP)
        for m in LATIN_WORD.finditer(text):
            w = m.group().lower() if lowercase else m.group()
            if len(w) > 1:
                counts[(" " + w) if m.start() and text[m.start() - 1] == " " else w] += 1
        if len(counts) > MAX_CANDIDATES:
            # Bounded memory on a large corpus: frequent n-grams survive, which are the ones that get picked.
            counts = Counter(dict(counts.most_common(MAX_CANDIDATES // 2)))
    return counts


def _most_frequent_casing(counts: Counter) -> Counter:
    """Keep one casing per English word (its commonest, both space forms); Chinese n-grams pass through."""
    totals: Counter = Counter()
    for form, c in counts.items():
        if not is_cjk(form):
            totals[form.strip()] += c
    best: dict[str, str] = {}
    for word, c in totals.items():
        key = word.lower()
        if key not in best or c > totals[best[key]]:
            best[key] = word
    return Counter({f: c for f, c in counts.items() if is_cjk(f) or best[f.strip().lower()] == f.strip()})


def select_words(counts: Counter, n_tokens, num_words: int, min_count: int, taken: Iterable[str] = (),
                 max_ngram: int = 4) -> list[str]:
    """Up to `num_words` words (their forms, best first) by occurrences x tokens saved, greedily.

    n_tokens(s): tokens the old tokenizer needs for s. Each pick lowers the gain of the candidates that overlap
    it (lazy greedy): once "高血压" is a token, "血压" only saves where it occurs outside "高血压", and " fever"
    saves one token (the lone space) after "fever"; an English form pays for the longer words it would cut.
    `taken`: forms added anyway (the word list).
    """
    accepted = list(taken)
    skip = set(accepted)
    # Equal gains: the longer form first ("高血压" before "高血"), as it covers its pieces' occurrences.
    heap = [(-c * (n_tokens(f) - 1), -len(f), f) for f, c in counts.items() if c >= min_count and f not in skip]
    heap = [h for h in heap if h[0] < 0]
    heapq.heapify(heap)
    picked: list[str] = []
    words: set[str] = set()

    latin = [f for f in counts if not is_cjk(f)]
    harms: dict[str, int] = {}

    def harm(form: str) -> int:
        # An added token matches inside longer words too: "use" would cut "because" in two. English counts are
        # whole words (" because" is one entry), so the tokens this costs are countable; cached, as it is slow.
        if form not in harms:
            harms[form] = sum(counts[g] * max(0, _tokens_with(g, [form], n_tokens) - n_tokens(g))
                              for g in latin if form in g and g != form)
        return harms[form]

    def gain(form: str) -> int:
        inside = [a for a in accepted if a != form and a in form]
        if is_cjk(form):
            return _count_left(form, accepted, counts, max_ngram) * (_tokens_with(form, inside, n_tokens) - 1)
        return counts[form] * (_tokens_with(form, inside, n_tokens) - 1) - harm(form)

    while heap:
        *_, form = heapq.heappop(heap)
        if form.strip() not in words and len(words) >= num_words:
            continue
        g = gain(form)
        if g <= 0:
            continue
        if heap and (-g, -len(form)) > heap[0][:2]:
            heapq.heappush(heap, (-g, -len(form), form))  # no longer the best: back in line
            continue
        accepted.append(form)
        picked.append(form)
        words.add(form.strip())
    return picked


def _count_left(form: str, accepted: list[str], counts: Counter, max_ngram: int) -> int:
    """Occurrences of a CJK n-gram that an accepted n-gram does not take first (n-gram counts overlap).

    Lost: those inside an accepted longer n-gram ("血压" in "高血压"), and those overlapping an accepted one
    ("乙酰氨基" and "对乙酰氨" in "对乙酰氨基酚"): the tokenizer takes one of the two, and adding the second
    saves little (conservatively: nothing). The joined string's count is known up to max_ngram characters;
    beyond, it is bounded by its substrings' counts.
    """
    count = counts[form]
    for a in accepted:
        if a == form or not is_cjk(a):
            continue
        if form in a:
            count -= counts[a] * a.count(form)
            continue
        for k in range(1, min(len(a), len(form))):
            joins = [a + form[k:]] if a.endswith(form[:k]) else []
            joins += [form + a[k:]] if form.endswith(a[:k]) else []
            for j in joins:
                windows = [j[i:i + max_ngram] for i in range(len(j) - max_ngram + 1)]
                count -= counts[j] if len(j) <= max_ngram else min([counts[a], counts[form]] +
                                                                   [counts[w] for w in windows])
    return max(count, 0)


def _tokens_with(s: str, added: list[str], n_tokens) -> int:
    """Tokens for s once `added` are tokens: leftmost-longest matches, as the tokenizer's added vocabulary does."""
    total, i, start = 0, 0, 0
    while i < len(s):
        match = max((a for a in added if s.startswith(a, i)), key=len, default="")
        if match:
            total += (n_tokens(s[start:i]) if start < i else 0) + 1
            i = start = i + len(match)
        else:
            i += 1
    return total + (n_tokens(s[start:]) if start < len(s) else 0)


# ----------------------------------------------------------------------------- measuring

def compression(tokenizer, texts: list[str]) -> dict:
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    return {"documents": len(texts), "characters": chars, "tokens": tokens,
            "chars_per_token": round(chars / max(tokens, 1), 4), "tokens_per_char": round(tokens / max(chars, 1), 4)}


def gain_report(old, new, texts: list[str]) -> dict:
    """Characters per token before and after, overall and for Chinese / English documents."""
    def zh(t: str) -> bool:
        return sum(len(r) for r in CJK_RUN.findall(t)) * 3 > len(t)

    groups = {"all": texts, "zh": [t for t in texts if zh(t)], "en": [t for t in texts if not zh(t)]}
    out = {}
    for name, group in groups.items():
        if group:
            before, after = compression(old, group), compression(new, group)
            out[name] = {"before": before, "after": after,
                         "token_reduction": round(1 - after["tokens"] / max(before["tokens"], 1), 4)}
    return out


def demo_text() -> list[str]:
    texts = []
    for name in ("pretrain_zh.txt", "pretrain_en.txt"):
        if (DEMO / name).is_file():
            texts += [s for s in (DEMO / name).read_text(encoding="utf-8").splitlines() if s.strip()]
    return texts or ["高血压患者应定期测量血压，按时服用降压药。糖尿病患者可以服用二甲双胍控制血糖。",
                     "Patients with hypertension should check their blood pressure and take their medicine daily."]


def check_round_trips(old, new, texts: list[str]) -> None:
    """decode(encode(text)) == text must hold after extension wherever it held before."""
    from medgpt.utils import MedGPTError

    for t in texts:
        after = new.decode(new(t, add_special_tokens=False)["input_ids"])
        if after != t and old.decode(old(t, add_special_tokens=False)["input_ids"]) == t:
            raise MedGPTError(f"the extended tokenizer no longer decodes text back unchanged: {t[:80]!r} comes "
                              f"back as {after[:80]!r}. The tokenizer normalizes its input in a way added words "
                              f"do not survive; remove the words in that text from the list.")


# ----------------------------------------------------------------------------- the command

def _model_dir(cfg: Config) -> str | None:
    from medgpt.utils import MedGPTError

    if cfg.extend.model:
        if not (Path(cfg.extend.model) / "config.json").is_file():
            raise MedGPTError(f"--extend.model {cfg.extend.model} is not a model directory (no config.json).")
        return cfg.extend.model
    return cfg.model.name_or_path if (Path(cfg.model.name_or_path) / "config.json").is_file() else None


def _check_rows(rows, n_tokens: int, model_dir: str, tokenizer_src: str) -> None:
    from medgpt.utils import MedGPTError

    if isinstance(rows, int) and rows < n_tokens:
        raise MedGPTError(f"the model {model_dir} has {rows} embedding rows but the tokenizer {tokenizer_src} has "
                          f"{n_tokens} tokens: they do not belong together (a tokenizer extended before, or one "
                          f"from another model). Extend the tokenizer saved with the model (--model.name_or_path "
                          f"{model_dir}), or pass the model this tokenizer belongs to (--extend.model DIR).")


def _texts(files: list[str], d: DataArgs) -> Iterable[str]:
    from medgpt.data.text import record_text
    from medgpt.data.validate import iter_canonical

    records = iter_canonical(files, format=d.format, columns=d.columns, encoding=d.encoding,
                             text_mode=d.text_mode, max_samples=d.max_samples)
    return (t for t in map(record_text, records) if t.strip())


def _mine(cfg: Config, old, n_tokens, taken: list[str]) -> tuple[list[str], list[str]]:
    """(mined words, held-out texts): the corpus's frequent multi-token words, and the sample kept out of mining
    to measure the gain on (when no --data.eval_files)."""
    import random

    from tqdm.auto import tqdm

    e, d = cfg.extend, cfg.data
    heldout: list[str] = []
    rng = random.Random(0)

    def corpus():
        for text in tqdm(_texts(d.train_files, d), desc="mining", unit=" docs", mininterval=2):
            if not d.eval_files and rng.random() < e.heldout_fraction and len(heldout) < 2000:
                heldout.append(text)  # measured on, never mined from
            else:
                yield text
    lowercase = old("Hypertension")["input_ids"] == old("hypertension")["input_ids"]
    counts = _most_frequent_casing(count_candidates(corpus(), lowercase, e.max_ngram))
    return select_words(counts, n_tokens, e.num_words, e.min_count, taken, e.max_ngram), heldout


def _add_checked(old, forms: list[str]):
    """(new tokenizer, forms kept): add the forms, then keep those that encode as one token (a normalizing
    tokenizer may rewrite some)."""
    import copy

    from medgpt.utils import log

    new = copy.deepcopy(old)
    new.add_tokens(forms)
    bad = [f for f in forms if new(f, add_special_tokens=False)["input_ids"] != [new.convert_tokens_to_ids(f)]]
    if bad:
        log(f"{len(bad)} words do not encode as one token once added and are left out: {bad[:10]}")
        forms = [f for f in forms if f not in bad]
        new = copy.deepcopy(old)
        new.add_tokens(forms)
    return new, forms


def run(cfg: Config) -> int:
    """Add words (from a list and/or mined from a corpus) to a tokenizer; grow a model's embeddings to match."""
    from medgpt.config import save_config
    from medgpt.model.load import load_tokenizer
    from medgpt.outdir import final_save, prepare_output_dir
    from medgpt.utils import MedGPTError, log, write_json

    e, d = cfg.extend, cfg.data
    mine = bool(d.train_files) and e.num_words > 0
    if not e.words and not mine:
        raise MedGPTError("no words to add. Give a word list (--extend.words FILE, one word per line) and/or a "
                          "corpus to mine words from (--data.train_files FILES with --extend.num_words N > 0).")
    listed = read_word_list(e.words) if e.words else []
    model_dir = _model_dir(cfg)
    if cfg.output_dir and Path(cfg.output_dir).resolve() in {Path(p).resolve() for p in
                                                             (cfg.model.name_or_path, model_dir) if p}:
        raise MedGPTError(f"--output_dir {cfg.output_dir} is the input directory; write the extended copy to a "
                          f"new directory (the input stays as it is).")
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, command="tokenizer extend")
    old = load_tokenizer(cfg.model)
    if model_dir:  # a cheap look before mining: the weights load only at the end
        conf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        _check_rows(conf.get("vocab_size", conf.get("text_config", {}).get("vocab_size")), len(old), model_dir,
                    cfg.model.name_or_path)

    n_tokens = lru_cache(maxsize=None)(lambda s: len(old(s, add_special_tokens=False)["input_ids"]))
    taken = list(dict.fromkeys(f for w in listed for f in forms_of(w) if n_tokens(f) > 1))
    mined, heldout = _mine(cfg, old, n_tokens, taken) if mine else ([], [])
    forms = taken + mined
    if not forms:
        what = (f"every word in {e.words} is already a single token" if listed else
                f"{e.words} holds no words" if e.words else "")
        found = (f"no word in {', '.join(d.train_files)} occurs at least {e.min_count} times (--extend.min_count) "
                 f"and takes more than one token" if mine else "")
        raise MedGPTError(f"nothing to add: {'; '.join(filter(None, [what, found]))}. Give other words, a larger "
                          f"corpus or a lower --extend.min_count.")

    new, forms = _add_checked(old, forms)
    eval_texts = list(_texts(d.eval_files, d)) if d.eval_files else heldout or demo_text()
    contexts = [f"{w}\n患者的{w}，({w}) with {w}. {w}" for w in dict.fromkeys(f.strip() for f in forms)]
    check_round_trips(old, new, eval_texts[:500] + contexts)

    init_rows = {new.convert_tokens_to_ids(f): old(f, add_special_tokens=False)["input_ids"] for f in forms}
    words = list(dict.fromkeys(f.strip() for f in forms))
    kept = set(forms)
    listed_words = [w for w in listed if any(f in kept for f in forms_of(w))]
    mined_words = [w for w in dict.fromkeys(f.strip() for f in mined if f in kept) if w not in set(listed_words)]
    single = sum(all(n_tokens(f) == 1 for f in forms_of(w)) for w in listed)
    gain = gain_report(old, new, eval_texts)
    report = {"words_added": len(words), "tokens_added": len(forms), "vocab_before": len(old),
              "vocab_after": len(new), "from_list": len(listed_words), "mined": len(mined_words),
              "list_already_single_tokens": single, "model": model_dir,
              "eval_text": ", ".join(d.eval_files) if d.eval_files else "held-out corpus" if heldout else "demo",
              "gain": gain, "sample": listed_words[:10] + mined_words[:10], "tokens": forms}
    with final_save(out) as staged:
        if model_dir:
            extend_model(model_dir, cfg, old, new, init_rows, staged)
        new.save_pretrained(staged)
        save_config(cfg, staged / "config.yaml")
        write_json(staged / "extend_report.json", report)
    log(f"added {len(words)} words as {len(forms)} tokens ({len(listed_words)} words from the list, "
        f"{single} listed were single tokens already; {len(mined_words)} mined): "
        f"vocabulary {len(old)} -> {len(new)}; e.g. {', '.join(report['sample'])}")
    for name, g in gain.items():
        log(f"  {name}: {g['before']['chars_per_token']:.2f} -> {g['after']['chars_per_token']:.2f} characters "
            f"per token on {g['before']['documents']} documents ({100 * g['token_reduction']:.1f}% fewer tokens)")
    log(f"saved to {out} (report: extend_report.json)")
    return 0


def extend_model(model_dir: str, cfg: Config, old, new, init_rows: dict[int, list[int]], out: Path) -> None:
    """Grow the model's embeddings to the new tokenizer, seed the new rows, save with the marker."""
    import torch

    from medgpt.model.load import load_model
    from medgpt.model.vocab import resize_embeddings
    from medgpt.utils import log

    dtype = cfg.model.dtype
    if dtype == "auto":  # keep the checkpoint's own dtype: the output is the same model with more rows
        conf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        dtype = conf.get("dtype") or conf.get("torch_dtype")
        dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    net = load_model(ModelArgs(name_or_path=model_dir, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code))
    rows = net.get_input_embeddings().weight.shape[0]
    _check_rows(rows, len(old), model_dir, cfg.model.name_or_path)
    if len(new) > rows:
        resize_embeddings(net, len(new), init_rows=init_rows)
    else:
        # Tables padded past the tokenizer (Qwen rounds to a multiple of 128) have untrained rows to reuse.
        with torch.no_grad():
            tables = [net.get_input_embeddings().weight]
            head = net.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
                tables.append(head.weight)
            for w in tables:
                for new_id, old_ids in init_rows.items():
                    w[new_id] = w[list(old_ids)].float().mean(dim=0).to(w.dtype)
    # Later stages read this to know the rows are seeded, not trained (load_model then trains them under LoRA).
    net.config.medgpt_added_tokens = getattr(net.config, "medgpt_added_tokens", 0) + len(init_rows)
    net.save_pretrained(out)
    log(f"model: embeddings {rows} -> {net.get_input_embeddings().weight.shape[0]} rows; "
        f"new rows start at the mean of their old sub-token rows")
