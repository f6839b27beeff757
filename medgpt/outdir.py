"""Output directories that never lose a user's files.

The rule every writing command follows: it deletes or replaces only what it can prove it wrote; anything else in
the folder stays where it is, or the command refuses with a reason. The proof is a marker file of our own,
`.medgpt-output.json`, written into the output dir when a command takes it (an absent or empty dir only):

    {"tool": "medgpt", "command": "sft", "run_id": "...", "started": "...", "entries": [...], "complete": false}

`entries` lists every top-level name a medgpt command put there. A name is recorded *before* it is written
(`claim`), so a run killed half-way still owns what it left behind, and `--resume` or `--overwrite` may remove
it. `complete` turns true only once the final artifacts are all in place (`mark_complete`); `merge` and every
model load refuse an output whose run never finished saving (`check_complete`).

A folder without the marker is never written into once it holds anything, with or without --overwrite or
--resume: those flags act on medgpt outputs only. Names in a marked folder that `entries` does not list were put
there by someone else; they are left alone, and a run refuses to start when one of them would be overwritten or
taken for a checkpoint of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from medgpt.utils import MedGPTError, is_main_process, log, remove_stale_temps, write_json

MARKER = ".medgpt-output.json"
# What a run may write at the top of its output dir (besides checkpoint-N): a foreign file by one of these names
# in a marked dir would be overwritten, so the run refuses instead.
ARTIFACTS = frozenset({
    "config.yaml", "metrics.json", "loss.png", "runs", "README.md", "training_args.bin", "trainer_state.json",
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "value_model", "report.md", "report.json", "predictions", "meta.json",
})
STAGING = ".saving"  # final artifacts are written here, then moved up (final_save)
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_SHOWN = 8
_taken: list[tuple[Path, bool]] = []  # output dirs this process took empty, and whether it created them (abandon)


def read_marker(out: Path) -> dict | None:
    """The marker of `out`, or None when it has none (or one that is not ours)."""
    try:
        m = json.loads((Path(out) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == "medgpt" and isinstance(m.get("entries"), list) else None


def _names(paths: Iterable[str]) -> str:
    paths = sorted(paths)
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False):
    """Judge `path` for a run (see prepare_output_dir) and refuse with a reason, changing nothing but the temp
    files a killed medgpt process left there. Returns (dir, its marker or None, our names, foreign names)."""
    if not str(path):
        raise MedGPTError("no output directory given. Add --output_dir DIR.")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MedGPTError(f"--output_dir {out} is a file, not a directory. Choose another path.")
    if not out.is_dir():
        return out, None, set(), set()
    remove_stale_temps(out)
    present = {p.name for p in out.iterdir()} - {MARKER}
    marker = read_marker(out)
    if present and marker is None:
        raise MedGPTError(
            f"output directory {out} is not empty, and medgpt did not write what it holds ({_names(present)}; no "
            f"{MARKER}). "
            f"--overwrite and --resume act only on a medgpt output, so nothing there is touched. Choose a new or "
            f"empty --output_dir (or move those files away).")
    if not present:
        return out, marker, set(), set()
    ours = set(marker["entries"]) & present
    foreign = present - ours
    nothing_saved = not marker.get("complete") and not any(_CHECKPOINT.fullmatch(n) for n in ours)
    if not (overwrite or resume) and (foreign or not nothing_saved):
        raise MedGPTError(
            f"output directory {out} is not empty: it holds a `medgpt {marker.get('command', '?')}` output. "
            f"Pass --overwrite to replace it, --resume to continue the run saved there, or choose another "
            f"--output_dir.")
    clash = {n for n in foreign if n in ARTIFACTS or n.startswith("checkpoint-") or n.startswith(STAGING)}
    if clash:
        raise MedGPTError(
            f"--output_dir {out} holds {_names(clash)}, which medgpt did not write there but a run would "
            f"overwrite or take for its own checkpoints. Move them out of {out}, or choose another --output_dir.")
    return out, marker, ours, foreign


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                       command: str = "") -> Path:
    """Take `path` for a run of `command`: create it and its marker, or take over a medgpt output there.

    - absent or empty: created and marked;
    - a medgpt output: with --resume it is continued (what it holds stays); with --overwrite its checkpoints go
      at once and its other files once this run is complete (nothing medgpt did not write); with neither,
      refused, unless the earlier run saved nothing;
    - anything else that is not empty: refused, whatever the flags.
    Only rank 0 judges and writes; the other ranks only create the dir.
    """
    if not is_main_process():
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    out, marker, ours, foreign = check_output_dir(path, overwrite, resume)
    keep: list[str] = []
    previous: list[str] = []
    was = marker.get("command", "?") if marker else ""
    if resume:
        keep = sorted(ours)
        previous = sorted(set(marker.get("previous") or []) & ours) if marker else []
    elif overwrite and ours:
        # The earlier run's checkpoints would be resumed from or rotated against this run's: they go now.
        # Its other files stay until this run is complete (mark_complete), so a run that fails never costs
        # the earlier result.
        stale = {n for n in ours if _CHECKPOINT.fullmatch(n) or n == STAGING}
        log(f"--overwrite: replacing the `medgpt {was}` output in {out}"
            + (f"; removing its {_names(stale)} now" if stale else "")
            + (f"; leaving {_names(foreign)}, which medgpt did not write" if foreign else ""))
        for name in stale:
            _remove(out / name)
        keep = previous = sorted(ours - stale)
    elif ours:
        log(f"the earlier `medgpt {was}` run in {out} stopped before saving anything; removing what it wrote "
            f"({_names(ours)}) and starting again")
        for name in ours:
            _remove(out / name)
    if not out.is_dir() or not any(out.iterdir()):
        _taken.append((out, not out.exists()))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"tool": "medgpt", "command": command, "run_id": uuid.uuid4().hex,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entries": keep, "previous": previous,
                              "complete": False})
    return out


def abandon() -> None:
    """After a failed command: remove what it wrote into the output dirs it took empty and saved nothing into (no
    checkpoint, no final save), and the dirs themselves when it created them, so a run that fails after its checks
    leaves no dir holding only a config.yaml. Dirs that held a medgpt output (--overwrite, --resume) keep it."""
    while _taken:
        out, created = _taken.pop()
        marker = read_marker(out)
        if marker is None or marker.get("complete") or any(_CHECKPOINT.fullmatch(n) for n in marker["entries"]):
            continue
        for name in set(marker["entries"]) - set(marker.get("previous") or []):
            _remove(out / name)
        (out / MARKER).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a file someone put there meanwhile stays, and so does the dir
                log(f"removed {out}: the command stopped before it saved anything there")


def _update(out: Path, **changes) -> None:
    marker = read_marker(out)
    if marker is None:  # not a dir this process prepared (another rank's view, or a plain dir): nothing to record
        return
    marker.update(changes)
    write_json(out / MARKER, marker)


def claim(out: str | os.PathLike, *names: str) -> None:
    """Record top-level `names` as written by this run, before writing them (rank 0 only)."""
    out = Path(out)
    if not is_main_process():
        return
    marker = read_marker(out)
    earlier = set(marker.get("previous") or []) if marker is not None else set()
    if marker is not None and (not set(names) <= set(marker["entries"]) or earlier & set(names)):
        _update(out, entries=sorted(set(marker["entries"]) | set(names)), previous=sorted(earlier - set(names)))


def owns(out: str | os.PathLike, name: str) -> bool:
    marker = read_marker(Path(out))
    return marker is not None and name in marker["entries"]


def mark_complete(out: str | os.PathLike) -> None:
    """Every final artifact is in place: `out` may now be loaded, merged and exported. What the run that
    --overwrite replaced wrote, and this run did not write again (a full model's weights when this run saves an
    adapter, say), goes now: only now is the earlier result no longer needed."""
    out = Path(out)
    marker = read_marker(out) if is_main_process() else None
    if marker is None:
        return
    _taken[:] = [t for t in _taken if t[0] != out]  # complete: nothing for abandon() to take back
    gone = set(marker.get("previous") or [])
    for name in gone:
        _remove(out / name)
    entries = [n for n in marker["entries"] if n not in gone and (out / n).exists()]
    _update(out, entries=entries, previous=[], complete=True)


def check_complete(path: str | os.PathLike, what: str = "--model.name_or_path") -> None:
    """Refuse a medgpt output whose run never finished writing its final artifacts (killed during the save, or
    still training)."""
    marker = read_marker(Path(path))
    if marker is not None and not marker.get("complete"):
        raise MedGPTError(
            f"{what} {path} is an unfinished `medgpt {marker.get('command', '?')}` output: the run that writes it "
            f"stopped before its final save was complete (killed, or still running). Continue it with --resume "
            f"(same command and --output_dir), or use one of its complete checkpoint-N dirs.")


def stage_into(out: Path, staging: Path) -> None:
    """Move every file of `staging` to the top of `out` (claimed first), replacing our own older copies, then
    remove `staging`. Used by the final save so that a kill never leaves a fresh file beside a stale one unnoticed:
    the marker stays incomplete until `mark_complete`."""
    umask = os.umask(0)
    os.umask(umask)
    for src in sorted(staging.iterdir()):
        dest = out / src.name
        claim(out, src.name)
        if src.is_file():
            os.chmod(src, 0o666 & ~umask)  # some writers make private temp files; results read like any other
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(src, dest)
    staging.rmdir()


@contextlib.contextmanager
def final_save(out: str | os.PathLike) -> Iterator[Path]:
    """Where the final artifacts are written: `out/.saving`, moved to the top of `out` when the block ends.

    The output is marked complete only after that, so a run killed during the save leaves an output that merge
    and every load refuse (outdir.check_complete) and that --resume finishes; never a fresh adapter beside a
    0-byte file that looks like a result. Used by every command that writes a model or a tokenizer."""
    staging = Path(out) / STAGING
    if is_main_process():
        claim(out, STAGING)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier save that was killed
        staging.mkdir()
    yield staging
    if is_main_process():
        stage_into(out, staging)
        mark_complete(out)
