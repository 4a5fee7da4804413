"""Tests of the caching-allocator model.

Expected figures come from the rules of c10/cuda/CUDACachingAllocator.cpp worked by hand (the
comment on each test shows the working), and the property tests check the model against
independent computations over live blocks.
"""

from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memwise.core.errors import BadInputError
from memwise.estimate.cuda_allocator import (
    K_LARGE_BUFFER,
    K_SMALL_BUFFER,
    K_SMALL_SIZE,
    AllocatorReplay,
    _CachingAllocator,
    _Options,
    get_allocation_size,
    replay_caching_allocator,
    round_size,
)

MIB = 2**20


def replay(events, **options) -> AllocatorReplay:
    return replay_caching_allocator(events, **options)


# Rounding and segment sizes


def test_round_size_uses_512_byte_blocks() -> None:
    assert round_size(1) == 512
    assert round_size(511) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert round_size(10 * MIB + 1) == 10 * MIB + 512


def test_round_size_with_power2_divisions() -> None:
    # 4097 lies between 4096 and 8192; four divisions step by 1024, so it rounds to 5120.
    assert round_size(4097, roundup_power2_divisions=4) == 5120
    assert round_size(4097) == 4608
    assert round_size(MIB + 1, roundup_power2_divisions=4) == MIB + MIB // 4
    # Sizes up to 512 * divisions keep the plain rounding.
    assert round_size(1200, roundup_power2_divisions=4) == 1536


def test_get_allocation_size() -> None:
    assert get_allocation_size(512) == K_SMALL_BUFFER
    assert get_allocation_size(K_SMALL_SIZE) == K_SMALL_BUFFER
    assert get_allocation_size(K_SMALL_SIZE + 512) == K_LARGE_BUFFER
    assert get_allocation_size(10 * MIB - 512) == K_LARGE_BUFFER
    assert get_allocation_size(10 * MIB) == 10 * MIB
    assert get_allocation_size(11 * MIB) == 12 * MIB


# Segments and reuse


def test_one_byte_reserves_a_small_segment() -> None:
    result = replay([("alloc", "x", 1)])
    assert result.peak_reserved_bytes == 2 * MIB
    assert result.peak_allocated_bytes == 512
    assert result.peak_requested_bytes == 1
    assert result.peak_segments == 1


def test_five_mib_reserves_a_large_buffer() -> None:
    assert replay([("alloc", "x", 5 * MIB)]).peak_reserved_bytes == 20 * MIB


def test_eleven_mib_reserves_twelve_and_keeps_the_unsplit_remainder() -> None:
    # 11 MiB >= kMinLargeAlloc: the segment is rounded to 12 MiB. The 1 MiB remainder is not
    # > kSmallSize, so the block is not split and all 12 MiB count as allocated.
    result = replay([("alloc", "x", 11 * MIB)])
    assert result.peak_reserved_bytes == 12 * MIB
    assert result.peak_allocated_bytes == 12 * MIB
    assert result.peak_requested_bytes == 11 * MIB


def test_large_remainder_above_one_mib_is_split_off() -> None:
    # 10.5 MiB -> 12 MiB segment; the 1.5 MiB remainder is > kSmallSize, so it is split off.
    result = replay([("alloc", "x", 10 * MIB + MIB // 2)])
    assert result.peak_reserved_bytes == 12 * MIB
    assert result.peak_allocated_bytes == 10 * MIB + MIB // 2


def test_two_five_mib_allocations_share_one_segment() -> None:
    result = replay([("alloc", "a", 5 * MIB), ("alloc", "b", 5 * MIB)])
    assert result.peak_reserved_bytes == 20 * MIB
    assert result.peak_segments == 1
    assert result.peak_allocated_bytes == 10 * MIB


def test_free_then_same_size_reuses_the_cached_block() -> None:
    events = [("alloc", "a", 64 * MIB), ("free", "a"), ("alloc", "b", 64 * MIB), ("free", "b")] * 3
    result = replay(events)
    assert result.peak_reserved_bytes == 64 * MIB
    assert result.device_alloc_count == 1
    assert result.final_allocated_bytes == 0
    assert result.final_reserved_bytes == 64 * MIB  # the cache keeps the segment


def test_fragmented_segment_forces_a_new_one() -> None:
    # Three 6 MiB blocks split a 20 MiB segment into 6+6+6 and a 2 MiB tail. Freeing the middle
    # leaves free blocks of 6 and 2 MiB that cannot merge, so 8 MiB needs a second segment.
    events = [
        ("alloc", "a", 6 * MIB),
        ("alloc", "b", 6 * MIB),
        ("alloc", "c", 6 * MIB),
        ("free", "b"),
        ("alloc", "d", 8 * MIB),
    ]
    result = replay(events)
    assert result.peak_reserved_bytes == 40 * MIB
    assert result.peak_segments == 2
    assert result.allocated_at_peak_reserved_bytes == 20 * MIB
    assert result.unused_reserved_at_peak_bytes == 20 * MIB


def test_freed_neighbours_merge() -> None:
    # Freeing a and b merges them (and the tail) back into one 20 MiB block that fits 18 MiB.
    events = [
        ("alloc", "a", 6 * MIB),
        ("alloc", "b", 6 * MIB),
        ("free", "a"),
        ("free", "b"),
        ("alloc", "c", 18 * MIB),
    ]
    assert replay(events).peak_reserved_bytes == 20 * MIB


def test_small_and_large_pools_do_not_share_segments() -> None:
    result = replay([("alloc", "big", 5 * MIB), ("free", "big"), ("alloc", "small", 1000)])
    assert result.peak_reserved_bytes == 20 * MIB + 2 * MIB


def test_peak_allocated_counts_rounded_sizes() -> None:
    result = replay([("alloc", index, 1000) for index in range(3)])
    assert result.peak_allocated_bytes == 3 * 1024
    assert result.peak_requested_bytes == 3000


def test_zero_byte_allocations_are_ignored() -> None:
    result = replay([("alloc", "empty", 0), ("free", "empty")])
    assert result.peak_allocated_bytes == 0
    assert result.peak_reserved_bytes == 0
    assert result.peak_allocated_event_index is None
    assert result.event_count == 2


def test_unknown_frees_are_ignored_and_reallocating_a_key_frees_it_first() -> None:
    result = replay([("free", "never"), ("alloc", "k", 5 * MIB), ("alloc", "k", 5 * MIB)])
    assert result.peak_allocated_bytes == 5 * MIB
    assert result.final_allocated_bytes == 5 * MIB
    assert result.peak_reserved_bytes == 20 * MIB


def test_empty_cache_returns_free_segments() -> None:
    result = replay([("alloc", "a", 5 * MIB), ("alloc", "b", 1), ("free", "a"), ("empty_cache",)])
    assert result.peak_reserved_bytes == 22 * MIB
    assert result.final_reserved_bytes == 2 * MIB  # b still holds the small segment


# max_split_size


def test_max_split_size_keeps_oversize_blocks_from_small_requests() -> None:
    # Unlimited: the cached 40 MiB block is split for 16 MiB. With max_split_size 32 MiB it is
    # oversize and a request below 32 MiB may not use it, so a 16 MiB segment is made.
    events = [("alloc", "a", 40 * MIB), ("free", "a"), ("alloc", "b", 16 * MIB)]
    assert replay(events).peak_reserved_bytes == 40 * MIB
    assert replay(events, max_split_size_bytes=32 * MIB).peak_reserved_bytes == 56 * MIB


def test_max_split_size_limits_rounding_of_oversize_blocks() -> None:
    # A cached 64 MiB oversize block serves a 50 MiB request (waste < 20 MiB, whole block
    # allocated) but not a 40 MiB one (waste >= max_non_split_rounding = 20 MiB).
    near = replay([("alloc", "a", 64 * MIB), ("free", "a"), ("alloc", "b", 50 * MIB)], max_split_size_bytes=32 * MIB)
    assert near.peak_reserved_bytes == 64 * MIB
    assert near.peak_allocated_bytes == 64 * MIB
    far = replay([("alloc", "a", 64 * MIB), ("free", "a"), ("alloc", "b", 40 * MIB)], max_split_size_bytes=32 * MIB)
    assert far.peak_reserved_bytes == 104 * MIB
    wider = replay(
        [("alloc", "a", 64 * MIB), ("free", "a"), ("alloc", "b", 40 * MIB)],
        max_split_size_bytes=32 * MIB,
        max_non_split_rounding_bytes=32 * MIB,
    )
    assert wider.peak_reserved_bytes == 64 * MIB


# Capacity: releasing the cache before failing


def test_full_device_releases_cached_segments_and_retries() -> None:
    # 30 MiB cached + a new 32 MiB segment would exceed 40 MiB, so torch frees the cached
    # segment and retries: the step fits, at the cost of one cache flush.
    events = [("alloc", "a", 30 * MIB), ("free", "a"), ("alloc", "b", 32 * MIB)]
    unlimited = replay(events)
    bounded = replay(events, capacity_bytes=40 * MIB)
    assert unlimited.peak_reserved_bytes == 62 * MIB
    assert bounded.peak_reserved_bytes == 32 * MIB
    assert bounded.cache_flush_count == 1
    assert bounded.out_of_memory is None


def test_oversize_blocks_are_released_before_a_full_flush() -> None:
    events = [("alloc", "a", 64 * MIB), ("free", "a"), ("alloc", "b", 40 * MIB)]
    result = replay(events, max_split_size_bytes=32 * MIB, capacity_bytes=100 * MIB)
    assert result.out_of_memory is None
    assert result.cache_flush_count == 0
    assert result.final_reserved_bytes == 40 * MIB


def test_out_of_memory_is_reported_and_stops_the_replay() -> None:
    events = [("alloc", "a", 30 * MIB), ("alloc", "b", 32 * MIB), ("alloc", "c", 1)]
    result = replay(events, capacity_bytes=40 * MIB)
    assert result.out_of_memory is not None
    assert result.out_of_memory.event_index == 1
    assert result.out_of_memory.key == "b"
    assert result.out_of_memory.requested_bytes == 32 * MIB
    assert result.out_of_memory.allocated_bytes == 30 * MIB
    assert result.event_count == 2
    assert result.peak_reserved_bytes <= 40 * MIB


# Expandable segments


def test_expandable_segments_absorb_a_growing_request() -> None:
    # Default: the cached 30 MiB segment cannot hold 32 MiB -> a second segment (62 MiB).
    # Expandable: 30 MiB maps two 20 MiB pages; once freed, 32 MiB fits in the same 40 MiB.
    events = [("alloc", "a", 30 * MIB), ("free", "a"), ("alloc", "b", 32 * MIB)]
    default = replay(events)
    expandable = replay(events, expandable_segments=True)
    assert expandable.peak_reserved_bytes == 40 * MIB
    assert expandable.peak_reserved_bytes <= default.peak_reserved_bytes


def test_expandable_segments_fragmenting_pattern_reserves_no_more() -> None:
    events = [
        ("alloc", "a", 6 * MIB),
        ("alloc", "b", 6 * MIB),
        ("alloc", "c", 6 * MIB),
        ("free", "b"),
        ("alloc", "d", 8 * MIB),
    ]
    assert replay(events, expandable_segments=True).peak_reserved_bytes <= replay(events).peak_reserved_bytes


def test_expandable_segments_map_whole_pages() -> None:
    # Pages are 2 MiB in the small pool and 20 MiB in the large pool, so a lone 21 MiB tensor
    # reserves two large pages where a plain segment is rounded to 22 MiB.
    assert replay([("alloc", "x", 1)], expandable_segments=True).peak_reserved_bytes == 2 * MIB
    assert replay([("alloc", "x", 21 * MIB)], expandable_segments=True).peak_reserved_bytes == 40 * MIB
    assert replay([("alloc", "x", 21 * MIB)]).peak_reserved_bytes == 22 * MIB


def test_expandable_segments_unmap_free_pages_on_empty_cache() -> None:
    events = [("alloc", "a", 30 * MIB), ("alloc", "b", 30 * MIB), ("free", "b"), ("empty_cache",)]
    result = replay(events, expandable_segments=True)
    assert result.peak_reserved_bytes == 60 * MIB
    # a occupies [0, 30) MiB: page 0 and part of page 1 stay mapped, page 2 is unmapped.
    assert result.final_reserved_bytes == 40 * MIB


# Options, input errors and serialization


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"max_split_size_bytes": MIB}, "max_split_size_bytes"),
        ({"max_non_split_rounding_bytes": 0}, "max_non_split_rounding_bytes"),
        ({"roundup_power2_divisions": 3}, "roundup_power2_divisions"),
        ({"garbage_collection_threshold": 1.5}, "garbage_collection_threshold"),
        ({"capacity_bytes": 0}, "capacity_bytes"),
        ({"expandable_segments": "yes"}, "expandable_segments"),
    ],
)
def test_bad_options_name_the_option(options: dict, name: str) -> None:
    with pytest.raises(BadInputError, match=name):
        replay([], **options)


def test_garbage_collection_threshold_is_accepted_and_changes_nothing() -> None:
    events = [("alloc", "a", 30 * MIB), ("free", "a"), ("alloc", "b", 32 * MIB)]
    assert replay(events, garbage_collection_threshold=0.6) == replay(events)


@pytest.mark.parametrize(
    "event",
    [("alloc", "k"), ("alloc", "k", -1), ("alloc", "k", 1.5), ("alloc", "k", True), ("malloc", "k", 1), "alloc", ()],
)
def test_bad_events_name_their_index(event: object) -> None:
    with pytest.raises(BadInputError, match=r"events\[1\]"):
        replay([("alloc", "ok", 1), event])


def test_numpy_integer_sizes_are_accepted() -> None:
    numpy = pytest.importorskip("numpy")
    assert replay([("alloc", "k", numpy.int64(1000))]).peak_allocated_bytes == 1024


def test_unhashable_key_is_rejected() -> None:
    with pytest.raises(BadInputError, match="hashable"):
        replay([("alloc", ["k"], 1)])


def test_replay_round_trips_through_json() -> None:
    result = replay([("alloc", "a", 30 * MIB), ("alloc", "b", 32 * MIB)], capacity_bytes=40 * MIB)
    assert result.out_of_memory is not None
    assert AllocatorReplay.from_dict(result.to_dict()) == result
    clean = replay([("alloc", "a", 3 * MIB)], expandable_segments=True)
    assert AllocatorReplay.from_dict(clean.to_dict()) == clean


# Properties

KEYS = st.integers(min_value=0, max_value=7)
SIZES = st.one_of(
    st.integers(min_value=0, max_value=MIB),
    st.integers(min_value=MIB + 1, max_value=12 * MIB),
    st.integers(min_value=12 * MIB, max_value=64 * MIB),
)
ALLOC = st.tuples(st.just("alloc"), KEYS, SIZES)
FREE = st.tuples(st.just("free"), KEYS)
EVENTS = st.lists(st.one_of(ALLOC, ALLOC, FREE), max_size=60)
EVENTS_WITH_EMPTY_CACHE = st.lists(st.one_of(ALLOC, ALLOC, FREE, st.just(("empty_cache",))), max_size=60)
SMALL_EVENTS = st.lists(
    st.one_of(st.tuples(st.just("alloc"), KEYS, st.integers(min_value=0, max_value=MIB)), FREE), max_size=80
)
MODES = st.sampled_from(
    [
        {},
        {"expandable_segments": True},
        {"max_split_size_bytes": 24 * MIB},
    ]
)


def running_peaks(events, *, large_slack: int = 0) -> tuple[int, int]:
    """Independent reference: the peak of the summed rounded sizes of live allocations, and the
    same with `large_slack` bytes added to each large-pool allocation."""
    live: dict[Hashable, int] = {}
    peak = peak_with_slack = 0
    for event in events:
        if event[0] == "empty_cache":
            continue
        live.pop(event[1], None)
        if event[0] == "alloc" and event[2] > 0:
            live[event[1]] = round_size(event[2])
        peak = max(peak, sum(live.values()))
        peak_with_slack = max(
            peak_with_slack, sum(size + (large_slack if size > K_SMALL_SIZE else 0) for size in live.values())
        )
    return peak, peak_with_slack


def largest_request(events) -> int:
    return max((round_size(event[2]) for event in events if event[0] == "alloc" and event[2] > 0), default=0)


@settings(max_examples=150, deadline=None)
@given(events=EVENTS, mode=MODES)
def test_reserved_covers_allocated_covers_the_largest_block(events, mode) -> None:
    result = replay(events, **mode)
    assert result.peak_reserved_bytes >= result.peak_allocated_bytes >= largest_request(events)
    assert result.peak_reserved_bytes % K_SMALL_BUFFER == 0
    assert result.allocated_at_peak_reserved_bytes <= result.peak_reserved_bytes


@settings(max_examples=100, deadline=None)
@given(events=EVENTS_WITH_EMPTY_CACHE, mode=MODES)
def test_replay_is_deterministic(events, mode) -> None:
    assert replay(events, **mode) == replay(list(events), **mode)


@settings(max_examples=150, deadline=None)
@given(events=SMALL_EVENTS)
def test_small_pool_peak_allocated_is_the_peak_of_live_rounded_sizes(events) -> None:
    # Small-pool blocks always split (remainders are multiples of 512), so allocated is exact.
    peak, _ = running_peaks(events)
    assert replay(events).peak_allocated_bytes == peak


@settings(max_examples=150, deadline=None)
@given(events=EVENTS)
def test_peak_allocated_is_live_rounded_sizes_plus_at_most_one_mib_per_large_block(events) -> None:
    # A large block is left unsplit only when the remainder is <= kSmallSize (1 MiB).
    peak, peak_with_slack = running_peaks(events, large_slack=K_SMALL_SIZE)
    assert peak <= replay(events).peak_allocated_bytes <= peak_with_slack


@settings(max_examples=150, deadline=None)
@given(events=EVENTS)
def test_expandable_peak_allocated_is_exact(events) -> None:
    # With expandable segments any remainder >= 512 bytes is split off.
    peak, _ = running_peaks(events)
    assert replay(events, expandable_segments=True).peak_allocated_bytes == peak


@settings(max_examples=100, deadline=None)
@given(events=EVENTS, mode=MODES)
def test_ample_capacity_changes_nothing(events, mode) -> None:
    unlimited = replay(events, **mode)
    capacity = max(unlimited.peak_reserved_bytes, 1)
    bounded = replay(events, capacity_bytes=capacity, **mode)
    assert bounded.out_of_memory is None
    assert bounded.cache_flush_count == 0
    assert bounded.peak_reserved_bytes == unlimited.peak_reserved_bytes
    assert bounded.peak_allocated_bytes == unlimited.peak_allocated_bytes


@settings(max_examples=150, deadline=None)
@given(events=EVENTS, mode=MODES, capacity_mib=st.integers(min_value=2, max_value=200))
def test_reserved_never_exceeds_capacity(events, mode, capacity_mib) -> None:
    result = replay(events, capacity_bytes=capacity_mib * MIB, **mode)
    assert result.peak_reserved_bytes <= capacity_mib * MIB
    if result.out_of_memory is None:
        assert result.event_count == len(events)
    else:
        assert result.event_count == result.out_of_memory.event_index + 1


@settings(max_examples=100, deadline=None)
@given(events=EVENTS, mode=MODES)
def test_freeing_everything_then_emptying_the_cache_returns_all_memory(events, mode) -> None:
    keys = {event[1] for event in events}
    result = replay([*events, *(("free", key) for key in keys), ("empty_cache",)], **mode)
    assert result.final_allocated_bytes == 0
    assert result.final_reserved_bytes == 0


def check_invariants(allocator: _CachingAllocator, live: dict) -> None:
    """Walks every segment: blocks tile it without gaps, links agree, free neighbours are merged,
    the counters match the blocks, and every free block is findable in its pool."""
    blocks = list(live.values())
    for pool in (allocator.small_blocks, allocator.large_blocks):
        free = pool.free_blocks()
        unmapped = pool.unmapped_blocks()
        assert all(not block.allocated and block.mapped for block in free)
        assert all(not block.mapped for block in unmapped)
        blocks += free + unmapped
    assert len({id(block) for block in blocks}) == len(blocks)
    by_segment: dict[int, list] = {}
    for block in blocks:
        by_segment.setdefault(id(block.segment), []).append(block)
    mapped_bytes = 0
    for segment_blocks in by_segment.values():
        segment_blocks.sort(key=lambda block: block.address)
        assert segment_blocks[0].prev is None and segment_blocks[-1].next is None
        assert segment_blocks[0].address == segment_blocks[0].segment.base
        for left, right in zip(segment_blocks, segment_blocks[1:]):
            assert left.next is right and right.prev is left
            assert left.address + left.size == right.address
            both_free = not left.allocated and not right.allocated
            assert not (both_free and left.mapped == right.mapped), "free neighbours must merge"
        mapped_bytes += sum(block.size for block in segment_blocks if block.mapped)
    assert mapped_bytes == allocator.reserved_bytes
    assert sum(block.size for block in live.values()) == allocator.allocated_bytes
    assert len(by_segment) == allocator.segments


@settings(max_examples=150, deadline=None)
@given(
    events=EVENTS_WITH_EMPTY_CACHE,
    expandable=st.booleans(),
    max_split=st.sampled_from([None, 24 * MIB]),
    capacity_mib=st.sampled_from([None, 30, 64, 150]),
)
def test_block_structure_stays_consistent(events, expandable, max_split, capacity_mib) -> None:
    options = _Options.make(
        expandable_segments=expandable,
        max_split_size_bytes=max_split,
        max_non_split_rounding_bytes=None,
        roundup_power2_divisions=None,
        garbage_collection_threshold=None,
        capacity_bytes=None if capacity_mib is None else capacity_mib * MIB,
    )
    allocator = _CachingAllocator(options)
    live: dict = {}
    for index, event in enumerate(events):
        allocator.event_index = index
        if event[0] == "empty_cache":
            allocator.release_cached_blocks()
        else:
            old = live.pop(event[1], None)
            if old is not None:
                allocator.free(old)
            if event[0] == "alloc" and event[2] > 0:
                block = allocator.malloc(event[2])
                if block is None:
                    break
                assert block.size >= round_size(event[2])
                live[event[1]] = block
        allocator.end_event()
        check_invariants(allocator, live)
