"""`memwise.watch` around a plain loop: allocator-exact totals (checked against `profile`'s plain
profiler reference), per-step growth, steps from the optimizer or `w.step()`, reports, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memwise
from memwise.core.errors import BadInputError
from memwise.doctor.runner import diagnose_workload
from memwise.measure.watch import WatchResult
from memwise.report.output import write_report
from memwise.report.tables import render_markdown


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4))


def _step(model, optimizer, x, y):
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture(scope="module")
def gpt_watched():
    workload = memwise.load_workload("gpt", {"preset": "tiny"})
    return workload, diagnose_workload(workload, memwise.Recipe(batch_size=4), steps=3).result


def test_totals_match_the_plain_profiler_reference(gpt_watched):
    workload, watched = gpt_watched
    profiled = memwise.profile(workload, memwise.Recipe(batch_size=4), steps=3, verify=True)
    # The reference is a plain torch.profiler pass with no memwise hooks, markers or dispatch mode.
    assert abs(watched.peak_bytes / profiled.reference_peak_bytes - 1) <= 0.01
    assert sum(watched.by_category.values()) == watched.peak_bytes
    param_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    assert watched.by_category["param"] == param_bytes == profiled.by_category["param"]
    assert watched.by_category["optimizer_state"] == profiled.by_category["optimizer_state"]
    assert set(watched.by_category) == set(profiled.by_category)


def test_per_step_memory_and_growth():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []
    planted = 16 * 1024 * 4
    with memwise.watch(model, optimizer) as w:
        for _ in range(5):
            kept.append(torch.ones(16 * 1024))
            _step(model, optimizer, torch.randn(16, 32), torch.randint(0, 4, (16,)))
    result = w.result()
    assert isinstance(result, WatchResult) and result.steps == 5 and result.mode == "train"
    assert [m.step for m in result.step_memory] == [0, 1, 2, 3, 4]
    # The loop's variables are the same size every step, so what grows is the planted tensor.
    assert [m.growth_bytes for m in result.step_memory[1:]] == [planted] * 4
    for memory in result.step_memory:
        assert memory.peak_bytes >= memory.live_bytes == sum(memory.live_by_category.values())
        assert sum(memory.peak_by_category.values()) == memory.peak_bytes
    assert max(m.peak_bytes for m in result.step_memory) == result.peak_bytes
    assert [h.kind for h in result.hazards] == ["tensors_accumulated"]


def test_result_renders_and_round_trips(gpt_watched, tmp_path):
    _, watched = gpt_watched
    paths = write_report(watched, tmp_path / "out", stem="watch")
    assert paths["html"].read_text().count("Peak:") >= 1
    assert "Memory by category at the peak" in render_markdown(watched)
    assert WatchResult.from_dict(watched.to_dict()) == watched


def test_optimizer_found_at_its_first_step_and_steps_limit():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    original_backward = torch.autograd.backward
    with memwise.watch(model, steps=2) as w:
        for _ in range(4):
            _step(model, optimizer, torch.randn(8, 32), torch.randint(0, 4, (8,)))
        assert torch.autograd.backward is original_backward  # unhooked after 2 steps
    assert w.result().steps == 2


def test_manual_steps_for_a_loop_without_optimizer():
    model = _mlp().eval()
    with memwise.watch(model) as w, torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 32))
            w.step()
    result = w.result()
    assert result.steps == 3 and result.mode == "infer" and result.hazards == ()


def test_no_step_says_how_to_mark_steps():
    model = _mlp()
    with memwise.watch(model) as w:
        model(torch.randn(8, 32))
    with pytest.raises(BadInputError, match=r"w\.step\(\)"):
        w.result()


def test_unsupported_device_is_refused():
    with pytest.raises(BadInputError, match="'meta'.*cpu or cuda"):
        memwise.watch(nn.Linear(2, 2, device="meta"))


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "net"}, "model must be a torch.nn.Module"),
    ({"model": nn.Linear(2, 2), "optimizer": 3}, "optimizer must be"),
    ({"model": nn.Linear(2, 2), "steps": 0}, "steps must be a positive integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        memwise.watch(**kwargs)


def test_one_watch_at_a_time():
    model = _mlp()
    with memwise.watch(model):
        with pytest.raises(BadInputError, match="already active"):
            with memwise.watch(model):
                pass


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("fixed", [False, True])
def test_dataloader_workers_copy_on_read(fixed):
    from tests.doctor.planted import plant_dataloader_worker_rss_growth

    planted = plant_dataloader_worker_rss_growth(fixed)
    hazards = [h for h in planted.result.hazards if h.kind == "dataloader_worker_rss_growth"]
    assert bool(hazards) == (not fixed), planted.result.hazards
    if not fixed:
        # Two workers read every row once and each copies the pages it touches: the growth is of the
        # order of the rows' Python objects (sizes from sys.getsizeof, independent of memwise), up to
        # twice them (both workers copy the pages they share), less what step 0 already copied.
        import sys

        from tests.doctor.planted import PythonRows

        rows = PythonRows(60_000).rows
        object_bytes = sys.getsizeof(rows) + sum(sys.getsizeof(row) + sum(sys.getsizeof(v) for v in row) for row in rows)
        assert 0.5 * object_bytes <= hazards[0].bytes <= 2.5 * object_bytes, (hazards[0].bytes, object_bytes)
        assert (hazards[0].location.file, hazards[0].location.line) == (planted.file, planted.line)
        assert "PythonRows" in hazards[0].message


def test_a_failing_loop_keeps_its_error_and_the_steps_seen():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    original_backward = torch.autograd.backward
    with pytest.raises(torch.OutOfMemoryError, match="step 3"):
        with memwise.watch(model, optimizer) as w:
            for step in range(5):
                if step == 3:
                    raise torch.OutOfMemoryError("step 3")
                _step(model, optimizer, torch.randn(8, 32), torch.randint(0, 4, (8,)))
    assert w.result().steps == 3 and torch.autograd.backward is original_backward
