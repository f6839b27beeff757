"""medgpt/utils.py helpers that every command runs through."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medgpt.utils import keep_freed_memory

# A child process: mallopt changes the process for good, so it is measured away from the test runner.
PROBE = """
import ctypes, sys
from medgpt.utils import keep_freed_memory
changed = keep_freed_memory()
# glibc's mallinfo2 is not needed: a freed 64 MiB block stays mapped in the heap when the threshold was raised,
# so the program break moved past it; by default the block is mmap'ed and the break stays put.
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
before = libc.sbrk(0)
p = libc.malloc(64 << 20)
libc.free(ctypes.c_void_p(p))
grew = libc.sbrk(0) - before
print(changed, grew >= 64 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux only")
@pytest.mark.parametrize("env, expected", [({}, "True True"), ({"MEDGPT_MALLOC": "default"}, "False False")])
def test_keep_freed_memory_serves_big_blocks_from_the_heap(env, expected, monkeypatch):
    """With the tuning a 64 MiB block comes from the heap and stays there after free (reused by the next step,
    no page faults); MEDGPT_MALLOC=default leaves glibc as it is (such blocks are mmap'ed and unmapped)."""
    import os

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    assert " ".join(out) == expected


def test_cli_tunes_malloc_before_a_command_runs(monkeypatch):
    from medgpt import cli, utils

    calls = []
    monkeypatch.setattr(utils, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["data", "validate", "/nonexistent/x.jsonl"]) != 0
    assert calls == [1]


def test_keep_freed_memory_is_a_no_op_when_asked(monkeypatch):
    monkeypatch.setenv("MEDGPT_MALLOC", "default")
    assert keep_freed_memory() is False
