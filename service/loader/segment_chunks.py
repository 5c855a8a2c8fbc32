"""How a model's tensors on one device are cut into device segments (loader side), and what
placing them costs on that device beyond the model itself.

A segment is a CUDA VMM allocation made whole by `cuMemCreate`; its memory cannot come from
torch's cache, so while one segment is filled the tensors it replaces are still allocated.
One segment per device would hold two copies of the model at once. Instead the loader fills
segments one after another and frees each source as it is moved (`service.loader.segment_fill`):
when a segment is allocated, the device holds the segments filled so far plus the sources
not yet moved (together: the model) plus this one segment. A segment holds at most
`capacity` bytes, so the peak is the model plus one capacity plus each segment's rounding.
Each segment is exported as its own fd and described as its own `DeviceSegment`, which
workers already open by name; a model has at most MAX_SEGMENTS of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The capacity is at least 1/CHUNKS of the model: the peak stays within 1/32 (~3%) of the
# model above its largest tensor, leaving room in the 5% for the segments' rounding.
CHUNKS = 32
# CUDA's VMM allocation granularity on current GPUs: every segment is rounded up to it, so
# a smaller capacity would only waste the rest.
GRANULARITY = 2 * 2**20
# A worker takes the arena's fd and the segments' in one message of at most 64 fds
# (`service.common.socket_protocol.MAX_FDS`, also in clients already installed in pods).
MAX_SEGMENTS = 48


def capacity(model_bytes: int, largest_bytes: int) -> int:
    """The most bytes one segment holds: any tensor fits, and no more than one segment's
    worth of the model is ever held twice."""
    return max(largest_bytes, -(-model_bytes // CHUNKS), GRANULARITY)


def groups(sizes: Iterable[tuple[str, int]], limit: int, align: int) -> list[list[str]]:
    """Consecutive names, each group's `align`-ed sizes summing to at most `limit` (a
    tensor larger than `limit` gets a group of its own)."""
    result: list[list[str]] = []
    used = 0
    for name, nbytes in sizes:
        size = -(-nbytes // align) * align
        if not result or used + size > limit:
            result.append([])
            used = 0
        result[-1].append(name)
        used += size
    return result


def cut(sizes: Sequence[tuple[str, int]], align: int) -> list[list[str]]:
    """The segments of one device: groups of at most `capacity` bytes, fewer than
    MAX_SEGMENTS (greedy groups can reach 2 * CHUNKS + 1; then each holds more)."""
    total = sum(nbytes for _, nbytes in sizes)
    limit = capacity(total, max((nbytes for _, nbytes in sizes), default=0))
    found = groups(sizes, limit, align)
    while len(found) > MAX_SEGMENTS:
        limit += -(-total // CHUNKS)
        found = groups(sizes, limit, align)
    return found


def placing_bytes(sizes: Sequence[tuple[str, int]], align: int) -> int:
    """What placing tensors of these sizes (in the order the loader moves them) in segments
    needs on their device on top of the model at the peak: the largest segment being filled,
    and each segment's rounding up to the granularity."""
    total = sum(nbytes for _, nbytes in sizes)
    if total <= 0:
        return 0
    segments = cut(sizes, align)
    by_name = dict(sizes)
    biggest = max(sum(-(-by_name[n] // align) * align for n in group) for group in segments)
    return biggest + len(segments) * GRANULARITY
