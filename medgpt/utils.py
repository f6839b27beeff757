"""Small helpers shared by every command: user-facing errors, atomic writes, rank-0 printing."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator


class MedGPTError(Exception):
    """An error the user can fix (bad data, bad config, missing file).

    The CLI prints its message as one paragraph and exits non-zero, without a traceback.
    """


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(*args, **kwargs) -> None:
    """print() on rank 0 only, so multi-process runs do not repeat every line."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel at every free.

    Inference and training on CPU allocate and free tensors of many megabytes at every step (logits over a
    49k-word vocabulary, attention over long prompts). By default glibc serves each of those with a fresh
    mmap and unmaps it on free, so every step page-faults its memory in again: on a 2-core host generating
    answers for 1-2k-token prompts spent 159 of 194 s in the kernel. Raising the mmap threshold and disabling
    trimming (what jemalloc/tcmalloc do by default) cut that run to 123 s. Linux with glibc only; a no-op
    elsewhere, or when MEDGPT_MALLOC=default. Returns whether it changed anything.
    """
    if os.environ.get("MEDGPT_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    ok = mallopt(m_mmap_threshold, 1 << 30) == 1  # blocks under 1 GiB come from the heap, reused after free
    ok = mallopt(m_trim_threshold, 1 << 30) == 1 and ok  # keep up to 1 GiB of free heap instead of trimming it
    return ok


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_TEMP = re.compile(r"\.(?P<name>.+)\.medgpt-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[str]:
    """Remove the temp files a killed medgpt process left in `directory` (for `name`, or for any name).

    Only files named by `temp_file` whose writing process is gone: another process's live temp file, and any
    file of another name, stay."""
    removed = []
    for p in Path(directory).glob(f".{glob.escape(name) if name else '*'}.medgpt-*.tmp"):
        m = _TEMP.fullmatch(p.name)
        if (m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
                and p.is_file() and not p.is_symlink()):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def temp_file(directory: str | os.PathLike, name: str) -> tuple[int, str]:
    """A hidden temp file for `name` in `directory`: `.NAME.medgpt-PID.XXXXXXXX.tmp` (fd, path).

    The pid in the name proves who wrote it: temp files that a killed run left for `name` are removed first
    (remove_stale_temps)."""
    remove_stale_temps(directory, name)
    return tempfile.mkstemp(prefix=f".{name}.medgpt-{os.getpid()}.", suffix=".tmp", dir=directory)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block finishes.

    A crash or an exception leaves the old file (if any) untouched and no half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the result should read like any other file
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
