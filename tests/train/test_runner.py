"""memwise.train: OOM recovery keeps the effective batch and the result; budgets that cannot fit exit early."""

import json

import pytest
import torch
from click.testing import CliRunner

import memwise
from memwise.cli.main import main
from memwise.train.runner import InfeasibleBudgetError, smaller_micro_batch

STEPS = 4


def _workload():
    return memwise.load_workload("gpt", {"preset": "tiny", "seq_len": 32})


def _params(workload):
    return {name: value.detach().clone() for name, value in workload.model.state_dict().items()}


def _budget_between_micro_batches(small: int, large: int) -> int:
    """A budget that the large micro-batch exceeds and the small one fits, from tracked runs."""
    peaks = {}
    for micro in (small, large):
        result = memwise.train(_workload(), memwise.Recipe(batch_size=16, micro_batch_size=micro, optimizer="sgd"), 2)
        peaks[micro] = result.peak_bytes
    assert peaks[large] > peaks[small]
    return (peaks[large] + peaks[small]) // 2


def test_oom_recovery_keeps_effective_batch_and_matches_smaller_start():
    budget = _budget_between_micro_batches(4, 16)
    recipe = memwise.Recipe(batch_size=16, micro_batch_size=16, optimizer="sgd")
    recovered_workload = _workload()
    recovered = memwise.train(recovered_workload, recipe, STEPS, budget_bytes=budget)
    assert recovered.oom_events, "the large micro-batch should have run out of the budget"
    assert recovered.oom_events[0].step == 0
    assert recovered.oom_events[0].micro_batch_size_before == 16
    final = recovered.final_recipe
    assert final.batch_size == 16 and final.micro_batch_size * final.grad_accumulation_steps == 16
    assert recovered.steps_done == STEPS

    reference_workload = _workload()
    reference = memwise.train(reference_workload, recipe.replace(micro_batch_size=final.micro_batch_size), STEPS)
    # the failed attempt leaves nothing behind: every step's memory equals a run that started small
    assert [m.peak_bytes for m in recovered.memory] == [m.peak_bytes for m in reference.memory]
    assert [m.allocated_bytes for m in recovered.memory] == [m.allocated_bytes for m in reference.memory]
    assert recovered.loss_history == pytest.approx(reference.loss_history, rel=1e-6)
    expected = _params(reference_workload)
    for name, value in _params(recovered_workload).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)


def test_budget_that_can_never_fit_is_infeasible_with_the_micro_batch_1_minimum():
    """The minimum counts parameters, gradients, optimizer state and a one-sample step: it matches the
    guard's own peak of a run with batch 1 (measured here), and the parameters alone would be far off."""
    measured = max(m.peak_bytes for m in memwise.train(_workload(), memwise.Recipe(batch_size=1, optimizer="adam"), 2).memory)
    workload = _workload()
    param_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    with pytest.raises(InfeasibleBudgetError) as error:
        memwise.train(workload, memwise.Recipe(batch_size=4, optimizer="adam"), 2, budget_bytes=measured - 1024)
    assert abs(error.value.minimum_bytes / measured - 1) <= 0.01, (error.value.minimum_bytes, measured)
    assert error.value.minimum_bytes > 4 * param_bytes  # params + grads + two Adam moments, plus activations
    assert "micro-batch of 1" in str(error.value)


def test_infeasible_budget_keeps_the_checkpoint(tmp_path):
    workload = _workload()
    memwise.train(workload, memwise.Recipe(batch_size=2, optimizer="sgd"), 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    saved = {path.name: path.read_bytes() for path in tmp_path.glob("*.pt")}
    with pytest.raises(InfeasibleBudgetError):
        memwise.train(workload, memwise.Recipe(batch_size=2, optimizer="sgd"), 3, budget_bytes=4096,
                      checkpoint_dir=tmp_path, resume=True)
    assert {path.name: path.read_bytes() for path in tmp_path.glob("*.pt")} == saved


def test_smaller_micro_batch_divides():
    assert smaller_micro_batch(16) == 8
    assert smaller_micro_batch(9) == 3
    assert smaller_micro_batch(7) == 1
    assert smaller_micro_batch(1) is None


def test_cli_train_json_and_bad_recipe_file(tmp_path):
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"batch_size": 8, "optimizer": "sgd"}))
    result = CliRunner().invoke(main, ["train", "gpt", "--arg", "preset=tiny", "--arg", "seq_len=16", "--steps", "2",
                                       "--recipe", str(recipe_file), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"steps_done", "oom_events", "final_recipe", "peak_bytes", "loss_history"} <= set(data)
    assert data["steps_done"] == 2 and len(data["loss_history"]) == 2

    recipe_file.write_text(json.dumps({"batch_size": 8, "learning_rate": 3}))
    result = CliRunner().invoke(main, ["train", "gpt", "--steps", "1", "--recipe", str(recipe_file)])
    assert result.exit_code == 2 and "learning_rate" in result.output
    recipe_file.write_text(json.dumps({"precision": "fp8"}))
    result = CliRunner().invoke(main, ["train", "gpt", "--steps", "1", "--recipe", str(recipe_file)])
    assert result.exit_code == 2 and "fp8" in result.output


def test_cli_train_infeasible_budget_exits_3():
    result = CliRunner().invoke(main, ["train", "gpt", "--arg", "preset=tiny", "--steps", "1", "--budget", "1KiB"])
    assert result.exit_code == 3
    assert "minimum" in result.output


def test_a_model_the_estimator_cannot_follow_falls_back_to_the_state_it_holds(monkeypatch):
    """Without an estimate, the minimum is parameters + gradients + Adam's two fp32 moments, counted here by hand."""
    from memwise.estimate import estimator

    def cannot(*args, **kwargs):
        raise memwise.core.errors.SymbolicExecutionError("data-dependent shape")

    monkeypatch.setattr(estimator, "estimate", cannot)
    workload = _workload()
    param_count = sum(p.numel() for p in workload.model.parameters())
    warnings = []
    with pytest.raises(InfeasibleBudgetError) as error:
        memwise.train(workload, memwise.Recipe(batch_size=2, optimizer="adam"), 1, budget_bytes=1024,
                      log=lambda record: warnings.append(record.get("message", "")))
    assert error.value.minimum_bytes == 4 * param_count * 4
    assert any("data-dependent shape" in message for message in warnings)


def test_the_budget_check_changes_nothing_in_the_run():
    """The minimum's estimate runs real probe ops and draws one sample: the generators and the model stay as they were."""
    recipe = memwise.Recipe(batch_size=4, optimizer="adamw")
    plain_workload, checked_workload = _workload(), _workload()
    plain = memwise.train(plain_workload, recipe, 2, seed=0)
    checked = memwise.train(checked_workload, recipe, 2, seed=0, budget_bytes=2**30)
    assert checked.loss_history == plain.loss_history
    for name, value in _params(checked_workload).items():
        assert torch.equal(value, _params(plain_workload)[name]), name
