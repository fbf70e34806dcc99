"""Log-linear histogram buckets shared by the BPF program and the daemon.

A value v (ns) falls in bucket:
  v < 2**SUB_BITS:            index v (exact)
  otherwise, k = floor(log2 v), sub = (v >> (k - SUB_BITS)) & (2**SUB_BITS - 1):
                              index (k - SUB_BITS + 1) * 2**SUB_BITS + sub
Each power of two is split in 2**SUB_BITS equal buckets, so a bucket is at most 1/2**SUB_BITS
(6.25 % with SUB_BITS = 4) of its lower bound wide; percentiles reported at the bucket midpoint are
within ~3.2 % of the true sample. The C side is generated from these constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

K = TypeVar("K", int, tuple[int, int])

SUB_BITS = 4
SUB_BUCKETS = 1 << SUB_BITS
MAX_LOG2 = 44  # 2**44 ns ~ 4.9 hours; larger waits land in the last bucket
NUM_BUCKETS = (MAX_LOG2 - SUB_BITS + 2) * SUB_BUCKETS


def bucket_index(value_ns: int) -> int:
    """Python twin of the C macro (used by tests and by user-space sample merging)."""
    v = max(0, int(value_ns))
    if v < SUB_BUCKETS:
        return v
    k = min(v.bit_length() - 1, MAX_LOG2)
    if k == MAX_LOG2 and v >= (1 << (MAX_LOG2 + 1)):
        return NUM_BUCKETS - 1
    sub = (v >> (k - SUB_BITS)) & (SUB_BUCKETS - 1)
    return (k - SUB_BITS + 1) * SUB_BUCKETS + sub


def bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high) in ns of one bucket."""
    if index < SUB_BUCKETS:
        return index, index + 1
    k = index // SUB_BUCKETS + SUB_BITS - 1
    sub = index % SUB_BUCKETS
    width = 1 << (k - SUB_BITS)
    low = (1 << k) + sub * width
    return low, low + width


def span_mid(low: int, high: int) -> float:
    """Where a [low, high) ns bucket is reported: its midpoint (the exact value for 1-ns buckets)."""
    return (low + high - 1) / 2 if high - low > 1 else float(low)


def bucket_mid(index: int) -> float:
    return span_mid(*bucket_bounds(index))


def nearest_rank(buckets: Mapping[K, int], q: float) -> K | None:
    """The bucket (key, in sorted order) holding the q-th percentile (q in [0, 100]) by nearest rank;
    None when empty. Shared by the live figures (keys: bucket indices) and the report (keys: the
    exported [low, high) bounds)."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = max(1, -(-total * q // 100))  # ceil(total * q / 100), at least the first sample
    seen = 0
    for key in sorted(buckets):
        seen += buckets[key]
        if seen >= rank:
            return key
    return max(buckets)


def percentile(buckets: Mapping[int, int], q: float) -> float | None:
    """q in [0, 100]; None when empty. Nearest-rank over buckets, reported at the bucket midpoint."""
    idx = nearest_rank(buckets, q)
    return None if idx is None else bucket_mid(idx)


def c_defines() -> dict[str, int]:
    return {"HIST_SUB_BITS": SUB_BITS, "HIST_MAX_LOG2": MAX_LOG2, "HIST_NUM_BUCKETS": NUM_BUCKETS}
