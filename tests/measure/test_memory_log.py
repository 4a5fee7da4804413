"""The memory log's rules on hand-written event streams (no torch involved)."""

from memwise.measure.memory_log import CATEGORIES, ROOT_MODULE, MemoryLog


def _train_log() -> MemoryLog:
    log = MemoryLog(mode="train", module_names=["a", "a.b"])
    log.preexisting("w", 1000, "param", "a.b")
    log.phase("idle", 0)
    log.alloc("x", 100)
    log.claim("input", [("x", None)])
    log.phase("forward", 0)
    log.enter("a")
    log.enter("a.b")
    log.alloc("saved", 300)     # alive when backward starts: activation
    log.alloc("scratch", 50)    # freed inside forward: temporary
    log.free("scratch")
    log.exit("a.b")
    log.exit("a")
    log.phase("backward", 0)
    log.alloc("g", 1000)
    log.free("saved")
    log.phase("optimizer", 0)
    log.claim("grad", [("g", "a.b")])
    log.alloc("m", 2000)
    log.phase("idle", 0)
    log.claim("optimizer_state", [("m", "a.b")])
    log.free("g")
    return log


def test_peak_and_categories_follow_the_rules():
    breakdown = _train_log().summarize()
    # live at the end of the optimizer phase: w 1000 + x 100 + g 1000 + m 2000
    assert breakdown.peak_bytes == 4100
    assert breakdown.baseline_bytes == 1000
    assert breakdown.phase_at_peak == "optimizer"
    assert breakdown.by_category["grad"] == 1000
    assert breakdown.by_category["optimizer_state"] == 2000
    assert breakdown.by_category["input"] == 100
    assert sum(breakdown.by_category.values()) == breakdown.peak_bytes
    assert set(breakdown.by_category) == set(CATEGORIES)


def test_activation_is_what_survives_forward():
    log = _train_log()
    log.events = log.events[: next(i for i, e in enumerate(log.events) if e[:2] == ("alloc", "g")) + 1]
    breakdown = log.summarize()
    assert breakdown.peak_bytes == 1000 + 100 + 300 + 1000
    assert breakdown.by_category["activation"] == 300
    assert breakdown.by_category["temporary"] == 1000  # the gradient is not claimed yet in this cut stream
    modules = {m.module: m for m in breakdown.by_module}
    assert modules["a.b"].activation_bytes == 300
    assert modules["a"].activation_bytes == 300  # rolled up to the parent
    assert modules[ROOT_MODULE].param_bytes == 1000


def test_infer_outputs_are_activations_and_inner_scratch_is_temporary():
    log = MemoryLog(mode="infer", module_names=["m"])
    log.phase("forward", 0)
    log.enter("m")
    log.alloc("inner", 64)
    log.alloc("out", 32)
    log.free("inner")
    log.exit("m")
    log.alloc("next", 16)
    breakdown = log.summarize()
    assert breakdown.peak_bytes == 96
    assert breakdown.by_category["temporary"] == 64
    assert breakdown.by_category["activation"] == 32


def test_unknown_frees_are_ignored_and_reused_keys_replace():
    log = MemoryLog(mode="infer")
    log.phase("forward", 0)
    log.free("never-seen")
    log.alloc("k", 10)
    log.alloc("k", 20)  # the allocator reused the address: the first block is gone
    assert log.summarize().peak_bytes == 20


def test_timeline_keeps_the_peak_sample():
    log = MemoryLog(mode="infer")
    log.phase("forward", 0)
    for index in range(5000):
        log.alloc(index, 1 if index != 2500 else 10_000)
        log.free(index)
    breakdown = log.summarize()
    timeline = breakdown.timeline
    assert len(timeline.x) <= 1200
    totals = [sum(timeline.bytes_by_category[c][i] for c in CATEGORIES) for i in range(len(timeline.x))]
    assert totals[timeline.peak_index] == breakdown.peak_bytes == 10_000
