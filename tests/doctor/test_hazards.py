"""One planted loop per hazard: the doctor finds it, on the planted line, with the planted size;
the same loop with the fix reports nothing; clean built-in workloads report nothing."""

import pytest
import torch

import memwise
from memwise.doctor.hazards import (
    FRAGMENTATION_MIN_BYTES,
    HAZARD_KINDS,
    WORKER_RSS_MIN_GROWTH_BYTES,
    Hazard,
    Location,
    fragmentation_hazard,
    hazards_text,
    worker_rss_hazard,
)
from memwise.doctor.runner import diagnose_workload
from tests.doctor.planted import IN_PROCESS, SCRIPTED, plant_weights

BYTES_TOLERANCE = 0.05


def _check_found(planted):
    hazards = planted.result.hazards
    assert [h.kind for h in hazards] == [planted.kind], hazards_text(hazards)
    hazard = hazards[0]
    assert (hazard.location.file, hazard.location.line) == (planted.file, planted.line)
    assert planted.planted_bytes > 0
    assert abs(hazard.bytes / planted.planted_bytes - 1) <= BYTES_TOLERANCE, (hazard.bytes, planted.planted_bytes)
    assert hazard.fix and hazard.message


@pytest.mark.parametrize("kind", sorted(IN_PROCESS))
def test_planted_hazard_is_found_on_its_line(kind):
    _check_found(IN_PROCESS[kind](fixed=False))


@pytest.mark.parametrize("kind", sorted(IN_PROCESS))
def test_fixed_loop_reports_nothing(kind):
    assert IN_PROCESS[kind](fixed=True).result.hazards == ()


@pytest.mark.parametrize("kind", SCRIPTED)
def test_planted_weight_hazard_in_a_script(kind, tmp_path):
    _check_found(plant_weights(kind, fixed=False, directory=tmp_path))
    assert plant_weights(kind, fixed=True, directory=tmp_path).result.hazards == ()


def test_growth_needs_the_steps_to_repeat():
    """One tensor kept once (a best checkpoint, a warm-up cache) is not growth."""
    from tests.doctor.planted import _batches, _mlp

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    kept = []
    with memwise.watch(model, optimizer) as w:
        for step, (x, y) in enumerate(_batches()):
            out = model(x)
            torch.nn.functional.cross_entropy(out, y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 2:
                kept.append(out.detach().clone())
    assert w.result().hazards == ()


@pytest.mark.parametrize("spec,args", [("mlp", {}), ("gpt", {"preset": "tiny"}), ("digits-cnn", {})])
def test_clean_builtin_workloads_report_no_hazard(spec, args):
    diagnosis = diagnose_workload(memwise.load_workload(spec, args), steps=6)
    assert diagnosis.result.steps == 6
    assert diagnosis.result.hazards == (), hazards_text(diagnosis.result.hazards)


def test_cuda_fragmentation_from_allocator_stats():
    """The CUDA path's rule on a mocked `torch.cuda.memory_stats()` dict (no GPU on the CI machine)."""
    where = Location(file="train.py", line=3)
    gib = 2**30
    fragmented = {"reserved_bytes.all.current": 10 * gib, "allocated_bytes.all.current": 4 * gib}
    hazard = fragmentation_hazard(fragmented, 7, where)
    assert hazard is not None and hazard.kind == "cuda_fragmentation"
    assert hazard.bytes == 6 * gib and hazard.steps == (7,) and "expandable_segments" in hazard.fix
    healthy = {"reserved_bytes.all.current": 5 * gib, "allocated_bytes.all.current": 4 * gib}
    assert fragmentation_hazard(healthy, 7, where) is None
    small = {"reserved_bytes.all.current": FRAGMENTATION_MIN_BYTES // 2, "allocated_bytes.all.current": 1}
    assert fragmentation_hazard(small, 7, where) is None


def test_worker_rss_rule_needs_a_steady_rise():
    where = Location(file="data.py", line=10)
    step = WORKER_RSS_MIN_GROWTH_BYTES
    rising = [(0, 100 * step), (1, 101 * step), (2, 102 * step), (3, 103 * step)]
    hazard = worker_rss_hazard(rising, where, "TokenDataset")
    assert hazard is not None and hazard.bytes == 3 * step and hazard.steps == (0, 1, 2, 3)
    noisy = [(0, 100 * step), (1, 103 * step), (2, 100 * step), (3, 103 * step)]
    assert worker_rss_hazard(noisy, where, "TokenDataset") is None
    flat = [(0, 100 * step), (1, 100 * step + 1000)]
    assert worker_rss_hazard(flat, where, "TokenDataset") is None


def test_hazard_json_round_trips():
    hazard = IN_PROCESS["zero_grad_not_none"](fixed=False).result.hazards[0]
    assert Hazard.from_dict(hazard.to_dict()) == hazard
    assert hazard.kind in HAZARD_KINDS
    with pytest.raises(ValueError, match="unknown key 'where'"):
        Hazard.from_dict({**hazard.to_dict(), "where": 1})
