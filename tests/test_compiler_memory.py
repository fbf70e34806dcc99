"""probes.compilermem: which mappings are released after compiling, and how (pure parsing)."""

from __future__ import annotations

from pathlib import Path

from accept_watch.probes.compilermem import droppable_compiler_mappings
from accept_watch.probes.kernel import compiler_mappings

MAPS = """\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 1234 /usr/bin/python3.11
7f0000000000-7f0002000000 r--p 00000000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0002000000-7f0005000000 r-xp 02000000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0005000000-7f0005100000 rw-p 05000000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0006000000-7f0007000000 r-xp 00000000 08:01 2002 /usr/lib/llvm-14/lib/libclang-cpp.so.14
7f0008000000-7f0008100000 r-xp 00000000 08:01 2003 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0009000000-7f0009100000 rw-p 00000000 00:00 0
7f000a000000-7f000a001000 r--p 00000000 08:01 2004 /opt/notlibLLVM/dir/libfoo.so
"""


def test_only_the_compiler_libraries(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert compiler_mappings(str(maps)) == [
        (0x7F0000000000, 0x2000000),
        (0x7F0002000000, 0x3000000),
        (0x7F0005000000, 0x100000),
        (0x7F0006000000, 0x1000000),
    ]


SMAPS = """\
7f0000000000-7f0002000000 r--p 00000000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:              32768 kB
Rss:               12000 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0002000000-7f0005000000 r-xp 02000000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:              49152 kB
Rss:               30000 kB
Anonymous:             0 kB
7f0005000000-7f0005100000 r--p 05000000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Rss:                1024 kB
Anonymous:           900 kB
7f0005100000-7f0005200000 rw-p 05100000 08:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Anonymous:             0 kB
7f0006000000-7f0007000000 r-xp 00000000 08:01 2002 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Size:              16384 kB
Anonymous:             0 kB
7f0008000000-7f0008100000 r-xp 00000000 08:01 2003 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
Anonymous:             0 kB
7f0009000000-7f0009100000 r--p 00000000 08:01 2002 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Size:               1024 kB
"""


def test_only_clean_read_only_compiler_mappings_are_dropped(tmp_path: Path) -> None:
    """MADV_DONTNEED would throw away copy-on-write pages (relocations): only mappings that are
    read-only and have no anonymous page qualify; one whose Anonymous line is missing does not."""
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    assert droppable_compiler_mappings(str(smaps)) == [
        (0x7F0000000000, 0x2000000),
        (0x7F0002000000, 0x3000000),
        (0x7F0006000000, 0x1000000),
    ]

