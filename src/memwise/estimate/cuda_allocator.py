"""A model of PyTorch's CUDA caching allocator: turns a stream of allocations and frees into what
`torch.cuda.max_memory_allocated()` and `torch.cuda.max_memory_reserved()` would report.

The rules follow `DeviceCachingAllocator` in c10/cuda/CUDACachingAllocator.cpp (read at
pytorch/pytorch commit 001074d25084fdb87a799823e395a50f5ec044d3, a 2024 revision) and the
option defaults of `AcceleratorAllocatorConfig` in c10/core/AllocatorConfig.cpp (PyTorch 2.9 and
later), where the same constants and rules are kept:

- Sizes are rounded up to a multiple of kMinBlockSize (512 B); `roundup_power2_divisions` (off by
  default) rounds to power-of-two fractions instead.
- Requests of at most kSmallSize (1 MiB) use the small pool, fed by kSmallBuffer (2 MiB)
  segments; larger ones use the large pool, fed by kLargeBuffer (20 MiB) segments below
  kMinLargeAlloc (10 MiB) and by segments rounded up to kRoundLarge (2 MiB) above.
- A request takes the smallest cached block of its pool that fits (ties by address) and splits
  it when the remainder is >= 512 B (small pool) or > 1 MiB (large pool). Without a split the
  whole block counts as allocated, so `allocated` can exceed the rounded request by up to 1 MiB.
- A freed block merges with free neighbours of the same segment. Segments are never returned to
  the device unless an allocation fails (then oversize cached blocks, and then every wholly free
  segment, are released and the allocation retried) or `empty_cache` is called.
- `max_split_size`: blocks at least that large are never split, are not used for smaller requests,
  and serve larger requests only if they waste less than `max_non_split_rounding` (20 MiB).
- `expandable_segments:True`: one segment per pool grows by mapping pages of 2 MiB (small pool)
  or 20 MiB (large pool) at its end; requests are placed with the same best-fit rules (a free
  block that can grow into unmapped pages counts with its growable size), any remainder of
  >= 512 B is split off, and reserved memory is the mapped pages.
"""

import bisect
import dataclasses
import numbers
from collections.abc import Hashable, Iterable
from typing import Any

from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict

K_MIN_BLOCK_SIZE = 512  # all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1048576  # largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2097152  # "small" allocations are packed in 2 MiB segments
K_LARGE_BUFFER = 20971520  # "large" allocations may be packed in 20 MiB segments
K_MIN_LARGE_ALLOC = 10485760  # allocations between 1 and 10 MiB may use K_LARGE_BUFFER
K_ROUND_LARGE = 2097152  # round up large allocations to 2 MiB

# Without a device capacity, expandable segments get this much address space (torch reserves
# 1 1/8 of the GPU's memory); it only matters for a request larger than all of it.
_UNBOUNDED_ADDRESS_SPACE = 1 << 46


def round_size(nbytes: int, *, roundup_power2_divisions: int | None = None) -> int:
    """Returns the block size the allocator uses for a request of `nbytes` bytes.

    Sizes below 512 become 512, others round up to a multiple of 512. With
    `roundup_power2_divisions=N` (PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions:N, off by
    default) sizes above 512*N round up to the next of N equal steps between powers of two.
    """
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = roundup_power2_divisions or 0
    if divisions > 1 and nbytes > K_MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_next_division(nbytes, divisions)
    return K_MIN_BLOCK_SIZE * ((nbytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    step = power2_floor >> (divisions.bit_length() - 1)
    if step == 0:
        return power2_floor << 1
    floor = size & ~(step - 1)
    return size if floor == size else floor + step


def get_allocation_size(size: int) -> int:
    """Returns the bytes of a new segment made for a (rounded) request of `size` bytes."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllocatorOutOfMemory:
    """The allocation that would raise `torch.OutOfMemoryError`, after the cache was released.

    Attributes:
        event_index: position of the failing event in the stream.
        key: the event's key, as text.
        requested_bytes: the bytes the program asked for.
        allocated_bytes: bytes allocated when it failed.
        reserved_bytes: bytes reserved when it failed (after releasing cached segments).
        capacity_bytes: the capacity the replay ran with.
    """

    event_index: int
    key: str
    requested_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    capacity_bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllocatorReplay:
    """What the caching allocator would report after a stream of allocations (estimated).

    Attributes:
        peak_allocated_bytes: `torch.cuda.max_memory_allocated()`: the peak sum of the sizes of
            allocated blocks (rounded, and including unsplit remainders).
        peak_requested_bytes: the peak sum of the bytes the program asked for (torch's
            `requested_bytes.all.peak`).
        peak_reserved_bytes: `torch.cuda.max_memory_reserved()`: the peak of segment bytes
            (mapped pages with expandable segments).
        allocated_at_peak_reserved_bytes: allocated bytes after the event that set the reserved
            peak; the rest of the peak was cached but unused (fragmentation and pool slack).
        peak_allocated_event_index: event that set the allocated peak; None if nothing was
            allocated.
        peak_reserved_event_index: event that set the reserved peak; None if nothing was reserved.
        final_allocated_bytes: allocated bytes after the last event.
        final_reserved_bytes: reserved bytes after the last event.
        peak_segments: most segments alive at once (an expandable segment counts as one).
        device_alloc_count: cudaMalloc calls (page mappings with expandable segments).
        cache_flush_count: times the cache was released to retry a failed allocation (torch's
            `num_alloc_retries`); each one synchronizes the device.
        event_count: events read.
        expandable_segments, max_split_size_bytes, capacity_bytes: the options replayed with.
        out_of_memory: the allocation that failed, or None if the stream fits the capacity.
    """

    peak_allocated_bytes: int
    peak_requested_bytes: int
    peak_reserved_bytes: int
    allocated_at_peak_reserved_bytes: int
    peak_allocated_event_index: int | None
    peak_reserved_event_index: int | None
    final_allocated_bytes: int
    final_reserved_bytes: int
    peak_segments: int
    device_alloc_count: int
    cache_flush_count: int
    event_count: int
    expandable_segments: bool
    max_split_size_bytes: int | None
    capacity_bytes: int | None
    out_of_memory: AllocatorOutOfMemory | None

    @property
    def unused_reserved_at_peak_bytes(self) -> int:
        """Bytes reserved but not allocated when reserved memory peaked."""
        return self.peak_reserved_bytes - self.allocated_at_peak_reserved_bytes

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AllocatorReplay":
        return from_dict(cls, data)


def replay_caching_allocator(
    events: Iterable[tuple[Any, ...]],
    *,
    expandable_segments: bool = False,
    max_split_size_bytes: int | None = None,
    max_non_split_rounding_bytes: int | None = None,
    roundup_power2_divisions: int | None = None,
    garbage_collection_threshold: float | None = None,
    capacity_bytes: int | None = None,
) -> AllocatorReplay:
    """Replays allocations and frees through a model of the CUDA caching allocator.

    Args:
        events: in program order, `("alloc", key, nbytes)`, `("free", key)` and
            `("empty_cache",)` (a call to `torch.cuda.empty_cache()`). Freeing an unknown key is
            ignored; allocating a live key frees the old allocation first; allocations of 0 bytes
            are ignored (torch makes none).
        expandable_segments: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.
        max_split_size_bytes: max_split_size_mb in bytes (at least 20 MiB, as torch requires);
            None is torch's default (unlimited).
        max_non_split_rounding_bytes: max_non_split_rounding_mb in bytes; None is torch's
            default (20 MiB). Only used with `max_split_size_bytes`.
        roundup_power2_divisions: roundup_power2_divisions:N applied to every size; None or 0
            is torch's default (off).
        garbage_collection_threshold: accepted for completeness and ignored: torch only collects
            when `set_per_process_memory_fraction` is set, which this model does not simulate.
        capacity_bytes: memory the allocator may take from the device (device memory minus the
            CUDA context); None for unlimited. When a new segment would not fit, the cache is
            released and the allocation retried, as torch does, before it counts as out of
            memory. The replay stops at the first allocation that fails.

    Returns:
        The peaks in bytes the allocator would report (estimated).

    Assumptions:
        One stream, no `record_stream` (a free is reusable at once) and no CUDA graph pools.
        New segments get increasing addresses, so equal-size cached blocks are reused oldest
        segment first; real cudaMalloc addresses usually increase but need not.

    Known limitations:
        Memory outside the caching allocator (CUDA context, NCCL) is not counted, and allocations
        the stream does not list (e.g. cuBLAS workspaces) are not added. With expandable
        segments the address space is 1 1/8 of `capacity_bytes` where torch uses 1 1/8 of the
        whole GPU. Free-memory callbacks and `set_per_process_memory_fraction` are not modelled.
    """
    options = _Options.make(
        expandable_segments=expandable_segments,
        max_split_size_bytes=max_split_size_bytes,
        max_non_split_rounding_bytes=max_non_split_rounding_bytes,
        roundup_power2_divisions=roundup_power2_divisions,
        garbage_collection_threshold=garbage_collection_threshold,
        capacity_bytes=capacity_bytes,
    )
    allocator = _CachingAllocator(options)
    live: dict[Hashable, _Block] = {}
    out_of_memory: AllocatorOutOfMemory | None = None
    event_count = 0
    for index, event in enumerate(events):
        event_count = index + 1
        op, key, nbytes = _parse_event(index, event)
        allocator.event_index = index
        if op == "empty_cache":
            allocator.release_cached_blocks()
        elif op == "free":
            block = live.pop(key, None)
            if block is not None:
                allocator.free(block)
        else:
            old = live.pop(key, None)
            if old is not None:
                allocator.free(old)
            if nbytes > 0:
                block = allocator.malloc(nbytes)
                if block is None:
                    out_of_memory = AllocatorOutOfMemory(
                        event_index=index,
                        key=str(key),
                        requested_bytes=nbytes,
                        allocated_bytes=allocator.allocated_bytes,
                        reserved_bytes=allocator.reserved_bytes,
                        capacity_bytes=options.capacity_bytes or 0,
                    )
                    allocator.end_event()
                    break
                live[key] = block
        allocator.end_event()
    return AllocatorReplay(
        peak_allocated_bytes=allocator.peak_allocated_bytes,
        peak_requested_bytes=allocator.peak_requested_bytes,
        peak_reserved_bytes=allocator.peak_reserved_bytes,
        allocated_at_peak_reserved_bytes=allocator.allocated_at_peak_reserved_bytes,
        peak_allocated_event_index=allocator.peak_allocated_event_index,
        peak_reserved_event_index=allocator.peak_reserved_event_index,
        final_allocated_bytes=allocator.allocated_bytes,
        final_reserved_bytes=allocator.reserved_bytes,
        peak_segments=allocator.peak_segments,
        device_alloc_count=allocator.device_alloc_count,
        cache_flush_count=allocator.cache_flush_count,
        event_count=event_count,
        expandable_segments=options.expandable_segments,
        max_split_size_bytes=options.max_split_size_bytes,
        capacity_bytes=options.capacity_bytes,
        out_of_memory=out_of_memory,
    )


def _parse_event(index: int, event: Any) -> tuple[str, Hashable, int]:
    valid = "expected ('alloc', key, nbytes), ('free', key) or ('empty_cache',)"
    if not isinstance(event, (tuple, list)) or not event:
        raise BadInputError(f"events[{index}]: {valid}, got {event!r}")
    op = event[0]
    if op == "empty_cache":
        return op, None, 0
    if op not in ("alloc", "free") or len(event) < 2:
        raise BadInputError(f"events[{index}]: {valid}, got {event!r}")
    key = event[1]
    if not isinstance(key, Hashable):
        raise BadInputError(f"events[{index}]: key must be hashable, got {key!r}")
    if op == "free":
        return op, key, 0
    nbytes = event[2] if len(event) == 3 else None
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes < 0:
        raise BadInputError(f"events[{index}]: nbytes must be an int >= 0 in {valid}, got {event!r}")
    return op, key, int(nbytes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Options:
    expandable_segments: bool
    max_split_size_bytes: int | None
    max_non_split_rounding_bytes: int
    roundup_power2_divisions: int | None
    capacity_bytes: int | None

    @classmethod
    def make(
        cls,
        *,
        expandable_segments: bool,
        max_split_size_bytes: int | None,
        max_non_split_rounding_bytes: int | None,
        roundup_power2_divisions: int | None,
        garbage_collection_threshold: float | None,
        capacity_bytes: int | None,
    ) -> "_Options":
        if not isinstance(expandable_segments, bool):
            raise BadInputError(f"expandable_segments: expected True or False, got {expandable_segments!r}")
        for name, value in (
            ("max_split_size_bytes", max_split_size_bytes),
            ("max_non_split_rounding_bytes", max_non_split_rounding_bytes),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < K_LARGE_BUFFER):
                raise BadInputError(
                    f"{name}: must be an int of at least {K_LARGE_BUFFER} bytes (20 MiB, torch's minimum) "
                    f"or None, got {value!r}"
                )
        divisions = roundup_power2_divisions
        if divisions is not None and (
            isinstance(divisions, bool) or not isinstance(divisions, int) or divisions < 0
            or (divisions & (divisions - 1)) != 0
        ):
            raise BadInputError(
                f"roundup_power2_divisions: must be 0, a power of two or None, got {divisions!r}"
            )
        threshold = garbage_collection_threshold
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0
        ):
            raise BadInputError(
                f"garbage_collection_threshold: must be a number in (0.0, 1.0) or None, got {threshold!r}"
            )
        if capacity_bytes is not None and (
            isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0
        ):
            raise BadInputError(f"capacity_bytes: must be a positive int of bytes or None, got {capacity_bytes!r}")
        return cls(
            expandable_segments=expandable_segments,
            max_split_size_bytes=max_split_size_bytes,
            max_non_split_rounding_bytes=max_non_split_rounding_bytes or K_LARGE_BUFFER,
            roundup_power2_divisions=divisions,
            capacity_bytes=capacity_bytes,
        )


class _Segment:
    """One cudaMalloc, or one expandable segment's address space."""

    __slots__ = ("base", "expandable", "page_bytes")

    def __init__(self, base: int, *, expandable: bool, page_bytes: int) -> None:
        self.base = base
        self.expandable = expandable
        self.page_bytes = page_bytes


class _Block:
    """A contiguous range of a segment: allocated, free (cached) or, in expandable segments,
    not backed by memory (`mapped` False). Neighbours in the segment are linked by prev/next."""

    __slots__ = ("size", "address", "pool", "segment", "allocated", "mapped", "prev", "next", "requested")

    def __init__(self, size: int, address: int, pool: "_Pool", segment: _Segment, *, mapped: bool = True) -> None:
        self.size = size
        self.address = address
        self.pool = pool
        self.segment = segment
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.requested = 0

    def splice(self, before: "_Block | None", after: "_Block | None") -> None:
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    """Free mapped blocks ordered by (size, address), and unmapped blocks ordered by address."""

    def __init__(self, *, is_small: bool) -> None:
        self.is_small = is_small
        self._keys: list[tuple[int, int]] = []
        self._free: dict[int, _Block] = {}
        self._unmapped_addresses: list[int] = []
        self._unmapped: dict[int, _Block] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def at(self, index: int) -> _Block:
        return self._free[self._keys[index][1]]

    def lower_bound(self, size: int) -> int:
        return bisect.bisect_left(self._keys, (size, -1))

    def insert(self, block: _Block) -> None:
        bisect.insort(self._keys, (block.size, block.address))
        self._free[block.address] = block

    def remove(self, block: _Block) -> None:
        index = bisect.bisect_left(self._keys, (block.size, block.address))
        del self._keys[index]
        del self._free[block.address]

    def free_blocks(self) -> list[_Block]:
        return [self._free[address] for _, address in self._keys]

    def insert_unmapped(self, block: _Block) -> None:
        bisect.insort(self._unmapped_addresses, block.address)
        self._unmapped[block.address] = block

    def remove_unmapped(self, block: _Block) -> None:
        del self._unmapped_addresses[bisect.bisect_left(self._unmapped_addresses, block.address)]
        del self._unmapped[block.address]

    def unmapped_blocks(self) -> list[_Block]:
        return [self._unmapped[address] for address in self._unmapped_addresses]


class _CachingAllocator:
    """DeviceCachingAllocator for one device and one stream; method names follow the C++."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        self.small_blocks = _Pool(is_small=True)
        self.large_blocks = _Pool(is_small=False)
        self.next_address = K_ROUND_LARGE
        self.event_index = 0
        self.allocated_bytes = 0
        self.requested_bytes = 0
        self.reserved_bytes = 0
        self.segments = 0
        self.peak_allocated_bytes = 0
        self.peak_requested_bytes = 0
        self.peak_reserved_bytes = 0
        self.peak_segments = 0
        self.peak_allocated_event_index: int | None = None
        self.peak_reserved_event_index: int | None = None
        self.allocated_at_peak_reserved_bytes = 0
        self.device_alloc_count = 0
        self.cache_flush_count = 0

    # Statistics

    def _reserve(self, nbytes: int) -> None:
        self.reserved_bytes += nbytes
        self.device_alloc_count += 1
        if self.reserved_bytes > self.peak_reserved_bytes:
            self.peak_reserved_bytes = self.reserved_bytes
            self.peak_reserved_event_index = self.event_index

    def _add_segment(self) -> None:
        self.segments += 1
        self.peak_segments = max(self.peak_segments, self.segments)

    def end_event(self) -> None:
        if self.peak_reserved_event_index == self.event_index:
            self.allocated_at_peak_reserved_bytes = self.allocated_bytes

    def _fits(self, nbytes: int) -> bool:
        capacity = self.options.capacity_bytes
        return capacity is None or self.reserved_bytes + nbytes <= capacity

    def _new_address(self, nbytes: int) -> int:
        address = self.next_address
        # A gap keeps segments apart so that addresses never suggest adjacency.
        self.next_address += nbytes + K_ROUND_LARGE
        return address

    # Allocation

    def malloc(self, nbytes: int) -> _Block | None:
        """Returns the allocated block, or None when the device is out of memory."""
        size = round_size(nbytes, roundup_power2_divisions=self.options.roundup_power2_divisions)
        pool = self.small_blocks if size <= K_SMALL_SIZE else self.large_blocks
        alloc_size = get_allocation_size(size)
        block = self._get_free_block(pool, size)
        if block is None:
            block = self._alloc_block(pool, size, alloc_size)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                self.release_cached_blocks()
                self.cache_flush_count += 1
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                return None
        return self._alloc_found_block(block, size, nbytes, self._should_split(block, size))

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        index = pool.lower_bound(size)
        if index == len(pool):
            return None
        if self.options.expandable_segments:
            # A block that can grow into unmapped pages counts with the size it can grow to, so
            # that a tighter block elsewhere is preferred to the growable end of a segment.
            while index + 1 < len(pool) and _expandable_size(pool.at(index + 1)) < _expandable_size(pool.at(index)):
                index += 1
        block = pool.at(index)
        max_split = self.options.max_split_size_bytes
        if max_split is not None:
            if size < max_split and block.size >= max_split:
                return None
            if size >= max_split and block.size >= size + self.options.max_non_split_rounding_bytes:
                return None
        pool.remove(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.is_small or self.options.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        max_split = self.options.max_split_size_bytes
        return (max_split is None or size < max_split) and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, block: _Block, size: int, nbytes: int, split_remainder: bool) -> _Block:
        if split_remainder:
            remaining = block
            block = _Block(size, remaining.address, remaining.pool, remaining.segment)
            block.splice(remaining.prev, remaining)
            remaining.address += size
            remaining.size -= size
            remaining.pool.insert(remaining)
        block.allocated = True
        block.requested = nbytes
        self.allocated_bytes += block.size
        self.requested_bytes += nbytes
        if self.allocated_bytes > self.peak_allocated_bytes:
            self.peak_allocated_bytes = self.allocated_bytes
            self.peak_allocated_event_index = self.event_index
        self.peak_requested_bytes = max(self.peak_requested_bytes, self.requested_bytes)
        return block

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int) -> _Block | None:
        if self.options.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        if not self._fits(alloc_size):
            return None
        segment = _Segment(self._new_address(alloc_size), expandable=False, page_bytes=alloc_size)
        self._reserve(alloc_size)
        self._add_segment()
        return _Block(alloc_size, segment.base, pool, segment)

    # Freeing

    def free(self, block: _Block) -> None:
        block.allocated = False
        self.allocated_bytes -= block.size
        self.requested_bytes -= block.requested
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        block.pool.insert(block)

    def _try_merge_blocks(self, dst: _Block, src: _Block | None) -> int:
        """Merges the free neighbour `src` into `dst`; returns the bytes merged (0 if none)."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if src.mapped:
            src.pool.remove(src)
        else:
            src.pool.remove_unmapped(src)
        if dst.prev is src:
            dst.address = src.address
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # Releasing cached memory (out-of-memory retries and empty_cache)

    def _release_block(self, block: _Block) -> None:
        block.pool.remove(block)
        self.reserved_bytes -= block.size
        self.segments -= 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """Releases oversize cached segments (only with max_split_size) until `size` would fit."""
        max_split = self.options.max_split_size_bytes
        if max_split is None:
            return False
        target = max(size, max_split)
        index = pool.lower_bound(target)
        if index < len(pool) and not pool.at(index).segment.expandable:
            self._release_block(pool.at(index))
            return True
        released = 0
        index -= 1
        while index >= 0 and released < target and pool.at(index).size >= max_split:
            block = pool.at(index)
            index -= 1
            if not block.segment.expandable and not block.is_split():
                self._release_block(block)
                released += block.size
        return released >= target

    def release_cached_blocks(self) -> None:
        """Returns every wholly free segment (and free expandable pages) to the device."""
        for pool in (self.large_blocks, self.small_blocks):
            to_unmap = []
            for block in pool.free_blocks():
                if block.segment.expandable:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_block(block)
            for block in to_unmap:
                self._unmap_block(block)
                if not block.mapped and not block.is_split():
                    pool.remove_unmapped(block)
                    self.segments -= 1

    # Expandable segments

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        candidate = self._find_expandable_block(pool, size)
        # candidate is a run of free and unmapped blocks with room for size bytes:
        # unmapped -> None, unmapped -> free -> ..., or free -> unmapped -> ...
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None and not following.mapped, "free block must be followed by unmapped pages"
            if not self._map_block(following, min(size - candidate.size, following.size)):
                return None
            candidate = following
        pool.remove(candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """Returns the lowest-addressed run of free and unmapped blocks with `size` bytes of room,
        making a new segment when none has."""
        for unmapped in pool.unmapped_blocks():
            candidate = unmapped
            if _allocatable(candidate.prev):
                candidate = candidate.prev
            if _has_room(candidate, size):
                return candidate
        page_bytes = K_SMALL_BUFFER if pool.is_small else K_LARGE_BUFFER
        capacity = self.options.capacity_bytes
        address_space = _UNBOUNDED_ADDRESS_SPACE if capacity is None else capacity + capacity // 8
        address_space = page_bytes * ((address_space + page_bytes - 1) // page_bytes)
        segment = _Segment(self._new_address(address_space), expandable=True, page_bytes=page_bytes)
        self._add_segment()
        candidate = _Block(address_space, segment.base, pool, segment, mapped=False)
        pool.insert_unmapped(candidate)
        return candidate

    def _map_block(self, to_map: _Block, size: int) -> bool:
        """Maps the pages under the first `size` bytes of the unmapped block `to_map`."""
        page = to_map.segment.page_bytes
        offset = to_map.address - to_map.segment.base
        first_page = offset // page
        end_page = (offset + size + page - 1) // page
        mapped_bytes = (end_page - first_page) * page
        if mapped_bytes == 0 or not self._fits(mapped_bytes):
            return False
        pool = to_map.pool
        pool.remove_unmapped(to_map)
        to_map.mapped = True
        if mapped_bytes < to_map.size:
            remaining = _Block(
                to_map.size - mapped_bytes, to_map.address + mapped_bytes, pool, to_map.segment, mapped=False
            )
            remaining.splice(to_map, to_map.next)
            pool.insert_unmapped(remaining)
            to_map.size = mapped_bytes
        self._try_merge_blocks(to_map, to_map.prev)
        self._try_merge_blocks(to_map, to_map.next)
        pool.insert(to_map)
        self._reserve(mapped_bytes)
        return True

    def _unmap_block(self, block: _Block) -> None:
        """Unmaps the whole pages inside the free block `block`."""
        segment = block.segment
        page = segment.page_bytes
        start = block.address - segment.base
        first_page = (start + page - 1) // page
        end_page = (start + block.size) // page
        if first_page >= end_page:
            return
        pool = block.pool
        pool.remove(block)
        unmapped_address = segment.base + first_page * page
        unmapped_size = (end_page - first_page) * page
        before_size = unmapped_address - block.address
        if before_size > 0:
            before_free = _Block(before_size, block.address, pool, segment)
            before_free.splice(block.prev, block)
            pool.insert(before_free)
        after_size = block.size - before_size - unmapped_size
        if after_size > 0:
            after_free = _Block(after_size, unmapped_address + unmapped_size, pool, segment)
            after_free.splice(block, block.next)
            pool.insert(after_free)
        block.address = unmapped_address
        block.size = unmapped_size
        block.mapped = False
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        pool.insert_unmapped(block)
        self.reserved_bytes -= unmapped_size


def _allocatable(block: _Block | None) -> bool:
    return block is not None and not block.allocated


def _has_room(block: _Block | None, size: int) -> bool:
    room = 0
    while room < size and _allocatable(block):
        assert block is not None
        room += block.size
        block = block.next
    return room >= size


def _expandable_size(block: _Block) -> int:
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)
