"""The CLI's glibc malloc setting: freed blocks stay in the process, where the next step reuses them."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from certkit import allocator
from certkit.cli import main

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

#: in a fresh interpreter: where an 8 MiB block comes from (mmap or the heap) and whether freeing it keeps it
PROBE = """
import ctypes, json, sys
from certkit.allocator import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblkhd - before.hblkhd
libc.free(block)
kept_free = libc.mallinfo2().fordblks - before.fordblks
print(json.dumps({"kept": kept, "mapped": mapped, "free_in_heap": kept_free}))
"""


def probe(mode: str) -> dict[str, Any]:
    import json

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(root)}
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc >= 2.33 only")
def test_a_freed_block_stays_in_the_heap_instead_of_being_unmapped() -> None:
    default, kept = probe("default"), probe("keep")
    assert default["mapped"] >= 8 << 20  # glibc's default: a block this large is a mapping of its own...
    assert default["free_in_heap"] < 8 << 20  # ...returned to the kernel when freed
    assert kept["kept"] is True
    assert kept["mapped"] == 0 and kept["free_in_heap"] >= 8 << 20  # from the heap, and kept there


def test_nothing_changes_where_the_c_library_is_not_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:
        def __getattr__(self, name: str) -> Any:
            raise AttributeError(name)

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Musl())
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_compute_commands_set_it_and_the_others_do_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["certify", str(tmp_path / "missing"), "--out", str(tmp_path / "r.tsv")]) == 2
    assert calls == [True]
    assert main(["report", str(tmp_path / "missing.tsv")]) == 2
    assert calls == [True]
