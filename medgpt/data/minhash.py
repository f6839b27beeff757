"""Overlap detection for `medgpt data clean`: MinHash + LSH near duplicates, and eval-set n-gram overlap.

    medgpt data clean data/demo --output_dir out/clean --clean.near_threshold 0.8 --clean.shingle 5

numpy and the standard library only. Text is compared after `normalize` (NFKC, case folding, whitespace
collapsed); n-gram `units` are words or single Chinese characters, so no word segmenter is needed.

A text is the set of its character n-grams ("shingles"; characters, so Chinese needs no word segmentation).
Two texts' Jaccard similarity |A∩B| / |A∪B| is estimated by the share of equal entries in their MinHash
signatures: entry k is the minimum of hash function k over the shingles (Broder, 1997). LSH banding cuts a
signature into `bands` bands of `rows` rows; texts that agree on a whole band become candidates, so a pair of
similarity s is found with probability 1 - (1 - s^rows)^bands, an S-curve whose bend sits at the threshold
(Leskovec, Rajaraman & Ullman, Mining of Massive Datasets, ch. 3). Candidates are then checked on the full
signature, so a chance band collision never removes a record.

Hashing is vectorised: shingles are hashed to 32 bits with a polynomial over code points and a splitmix64
finaliser, and the num_perm hash functions are h_k(x) = (a_k x + b_k) mod 2^32 with odd a_k (each a
bijection of the 32-bit hashes), taken over a batch of records at once in uint32. On random sets its
Jaccard estimates are unbiased with the binomial spread sqrt(J(1-J)/num_perm) of ideal MinHash, at a
third of the cost of 64-bit multiply-shift hashing (tests/test_clean.py checks the estimate).

Contamination: a training text is contaminated when it shares an n-gram of 13 units with an eval item, the
GPT-3 rule (Brown et al. 2020, app. C) with a Chinese character counted as a unit. 13 characters are a full
clause (用肥皂水和流动清水交替冲洗), long enough that shared medical vocabulary alone does not match; on the
demo data every hit is a question or answer phrase that really was reused. Eval items shorter than 13 units
match only as a whole, and only if they have at least 8 units.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from medgpt.data.text import CJK as _CJK

_UNITS = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")  # one Chinese character, or one run of letters/digits
_WS = re.compile(r"\s+")


# ----------------------------------------------------------------------------- text

def normalize(text: str) -> str:
    """NFKC (full-width -> half-width), case-folded, whitespace collapsed: what exact dedup compares."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def units(text: str, normalized: bool = False) -> list[str]:
    """Words and single Chinese characters of the normalised text; punctuation dropped."""
    return _UNITS.findall(text if normalized else normalize(text))


# ----------------------------------------------------------------------------- MinHash

_PRIME = np.uint64(1_000_003)
_BATCH_CELLS = 1 << 20  # shingles x permutations per batch: 4 MiB of uint32 at a time


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half the output bits."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """64-bit hashes of the character n-grams of `text` (a text shorter than n is one shingle)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cp) == 0:
        return np.zeros(1, dtype=np.uint64)
    width = min(n, len(cp))
    count = len(cp) - width + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):
            h = h * _PRIME + cp[k:k + count]
        return _mix(h + np.uint64(width))


def permutations(num_perm: int = 128, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of the num_perm hash functions, uint32; a is odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def signatures(texts: list[str], num_perm: int = 128, n: int = 5, seed: int = 1) -> np.ndarray:
    """MinHash signatures, one uint32 row of `num_perm` entries per text."""
    a, b = permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    hashes = [(shingle_hashes(t, n) >> np.uint64(32)).astype(np.uint32) for t in texts]
    start = 0
    while start < len(texts):
        # A batch of whole records holding about _BATCH_CELLS cells (at least one record), small enough
        # to stay in cache: the arithmetic is cheap, memory traffic is what costs.
        end, cells = start, 0
        while end < len(texts) and (end == start or cells + len(hashes[end]) * num_perm <= _BATCH_CELLS):
            cells += len(hashes[end]) * num_perm
            end += 1
        batch = hashes[start:end]
        offsets = np.cumsum([0] + [len(h) for h in batch[:-1]])
        values = np.multiply.outer(a, np.concatenate(batch))  # (num_perm, shingles), wraps mod 2^32
        values += b[:, None]
        out[start:end] = np.minimum.reduceat(values, offsets, axis=1).T
        start = end
    return out


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def collision_probability(s: float, bands: int, rows: int) -> float:
    """The chance that two texts of Jaccard similarity s share at least one band."""
    return 1.0 - (1.0 - s**rows) ** bands


def optimal_bands(num_perm: int, threshold: float, miss_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted area of false positives below the
    threshold and false negatives above it (datasketch's MinHashLSH rule). Every candidate is verified on
    the full signature, so a false positive costs one comparison while a miss keeps a duplicate: misses
    weigh 0.9. For 128 permutations and 0.8 that gives 14 bands of 9 rows: pairs at Jaccard 0.85 become
    candidates 97.5% of the time, pairs at 0.5 only 2.7%."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = 1.0 - (1.0 - s**rows) ** bands
        fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
        fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
        err = (1 - miss_weight) * fp + miss_weight * fn
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


def near_duplicates(sigs: np.ndarray, threshold: float = 0.8, bands: int | None = None,
                    rows: int | None = None) -> list[int]:
    """For each row, the index of an earlier kept row it nearly duplicates (estimated Jaccard >= threshold),
    or -1 when it is kept. Rows are taken in order, so the first of a group of near-duplicates stays."""
    if bands is None or rows is None:
        bands, rows = optimal_bands(sigs.shape[1], threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    out = []
    for i, sig in enumerate(sigs):
        keys = [sig[k * rows:(k + 1) * rows].tobytes() for k in range(bands)]
        match = -1
        checked = set()
        for k, key in enumerate(keys):
            for j in buckets[k].get(key, ()):
                if j in checked:
                    continue
                checked.add(j)
                if np.count_nonzero(sigs[j] == sig) >= threshold * len(sig):
                    match = j
                    break
            if match >= 0:
                break
        out.append(match)
        if match < 0:  # only kept rows are indexed: a chain of small edits is judged against what stays
            for k, key in enumerate(keys):
                buckets[k].setdefault(key, []).append(i)
    return out


# ----------------------------------------------------------------------------- contamination (eval overlap)


def ngrams(toks: list[str], n: int, min_whole: int = 8) -> set[tuple[str, ...]]:
    """The n-grams of a unit sequence; a sequence shorter than n is one gram if it has min_whole units."""
    if len(toks) < n:
        return {tuple(toks)} if len(toks) >= min_whole else set()
    return set(zip(*(toks[i:] for i in range(n))))


def eval_index(items: list[tuple[str, int, str]], n: int) -> tuple[dict[tuple, int], set[int]]:
    """{gram: index of the first eval item holding it}, and the lengths of items shorter than n."""
    index, short = {}, set()
    for i, (_, _, text) in enumerate(items):
        toks = units(text)
        grams = ngrams(toks, n)
        if len(toks) < n and grams:
            short.add(len(toks))
        for g in grams:
            index.setdefault(g, i)
    return index, short


def contamination(text: str, index: dict[tuple, int], short: set[int], n: int,
                  normalized: bool = False) -> tuple[int, str] | None:
    """(eval item index, the overlapping n-gram) for the first overlap of `text` with the eval set, or None."""
    toks = units(text, normalized)
    for size in [n] + sorted(k for k in short if k <= len(toks)):
        for gram in zip(*(toks[i:] for i in range(size))):
            if gram in index:
                return index[gram], " ".join(gram)
    return None
