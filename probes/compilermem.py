"""Give back the memory BCC's compiler leaves resident once the program is compiled.

libLLVM and libclang (~120 MB mapped) run only inside the compile; afterwards the daemon reads maps
and the ring buffer through libbpf in libbcc and never calls them again. Their code and constants stay
resident in this process unless we drop them: ~60-70 MB of VmRSS.

Pages are dropped with MADV_DONTNEED, and only from mappings that hold nothing but the file's own
bytes: read-only and without any private (copy-on-write) page, "Anonymous: 0 kB" in smaps. For such a
mapping DONTNEED only removes this process's page-table entries; should a page ever be touched again
it faults back in from the file, identical. Mappings with copy-on-write pages (relocated data, RELRO)
keep their private pages (dropping those would lose the relocations); their clean pages are still
asked out with MADV_PAGEOUT, as before. Nothing else in the process remaps or writes the compiler's
read-only mappings between the smaps read and the madvise, so "all the file's own" still holds.

MADV_PAGEOUT, used before, did not work where it mattered: it skips pages other processes map too (a
second BCC tool, another accept-watch), so VmRSS stayed at ~140-170 MB on a machine running those;
and the pages it did reclaim it evicted from the page cache, so the next launch read libLLVM from
disk again. DONTNEED leaves the page cache alone and works whoever else maps the library.
"""

from __future__ import annotations

import contextlib
import ctypes

MADV_DONTNEED = 4  # linux/mman.h
MADV_PAGEOUT = 21  # linux/mman.h, 5.4+ (EINVAL before: nothing done)
M_MMAP_THRESHOLD = -3  # malloc.h: mallopt's parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value
# Libraries BCC links that only its compiler uses.
COMPILER_LIBS = ("libLLVM", "libclang")


def _is_compiler_lib(path: str) -> bool:
    return any(lib in path.rsplit("/", 1)[-1] for lib in COMPILER_LIBS)


def compiler_mappings(maps_path: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """(start, length) of every mapping of the compiler libraries in this process."""
    out: list[tuple[int, int]] = []
    with open(maps_path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and _is_compiler_lib(fields[5]):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end - start))
    return out


def droppable_compiler_mappings(smaps_path: str = "/proc/self/smaps") -> list[tuple[int, int]]:
    """(start, length) of the compiler libraries' mappings whose pages are all the file's own:
    not writable and no anonymous (copy-on-write) page. Anything unparsable is not droppable."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None  # the mapping being read, if it is a candidate
    with open(smaps_path) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if not fields[0].endswith(":"):  # header: range perms offset dev inode [path]
                current = None
                if len(fields) >= 6 and "w" not in fields[1] and _is_compiler_lib(fields[5]):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = (start, end - start)
            elif fields[0] == "Anonymous:" and current is not None:
                if len(fields) >= 2 and fields[1] == "0":
                    out.append(current)
                current = None
    return out


def release_compiler_memory() -> int:
    """After a compile: the heap clang/LLVM freed (glibc keeps freed memory for reuse otherwise) and
    the compiler libraries' clean pages. Returns how many compiler mappings the kernel took the advice
    for. Best effort: on failure the memory just stays resident."""
    advised = 0
    with contextlib.suppress(OSError, AttributeError, ValueError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        droppable = set(droppable_compiler_mappings())
        for start, length in compiler_mappings():
            advice = MADV_DONTNEED if (start, length) in droppable else MADV_PAGEOUT
            advised += libc.madvise(start, length, advice) == 0
    return advised


def fix_mmap_threshold() -> None:
    """Before a compile: keep glibc's mmap threshold at its initial 128 KiB for the whole process.
    By default it rises to the largest block freed (up to 32 MiB), so clang/LLVM's large, short-lived
    blocks, and later the ring-buffer blocks and their NDJSON (MiBs each at full rate with --events),
    would come from the heap, which stays fragmented and resident (malloc_trim cannot give back what
    lies between live blocks). Mapped on their own, they go back at free. Measured in make bench's
    nginx runs: VmRSS 81 -> 76 MB by default, 91-94 -> 85 MB with --events at full rate; launch time
    unchanged. Best effort: nothing depends on it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
