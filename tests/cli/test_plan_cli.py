"""`memwise plan` and `memwise find-batch-size`: JSON fields, exit codes, bad input."""

import json

from click.testing import CliRunner

from memwise.cli.main import main
from memwise.core.recipe import Recipe

PLAN_FIELDS = {"feasible", "budget_bytes", "recipe", "predicted_peak_bytes", "measured_peak_bytes", "predicted_step_ms",
               "alternatives", "real_steps", "reason"}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_plan_json_out_file_and_recipe_round_trip(tmp_path):
    out = tmp_path / "plan.json"
    result = run("plan", "gpt", "--budget", "10MiB", "--format", "json", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert PLAN_FIELDS <= set(data) and data["feasible"] is True
    assert data["measured_peak_bytes"] <= data["budget_bytes"] == 10 * 2**20 and data["real_steps"] == 2
    assert Recipe.from_dict(json.loads(out.read_text())) == Recipe.from_dict(data["recipe"])
    assert (tmp_path / "plan-frontier.png").read_bytes()[:4] == b"\x89PNG"
    profiled = run("profile", "gpt", "--recipe", str(out), "--steps", "2", "--format", "json")
    assert profiled.exit_code == 0, profiled.output
    assert json.loads(profiled.stdout)["peak_bytes"] <= 10 * 2**20
    again = run("plan", "gpt", "--budget", "10MiB", "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr


def test_infeasible_budget_exits_3_with_the_minimum_and_its_recipe():
    result = run("plan", "mlp", "--arg", "width=64", "--arg", "depth=1", "--budget", "100KiB", "--format", "json")
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert data["feasible"] is False and data["measured_peak_bytes"] is None
    assert data["reason"]["min_peak_bytes"] > 100 * 2**10 * 0.95 and Recipe.from_dict(data["reason"]["recipe"])


def test_table_highlights_the_chosen_row_and_warns_about_a_huge_bare_number():
    result = run("plan", "mlp", "--arg", "width=64", "--arg", "depth=1", "--budget", "999999999999999")
    assert result.exit_code == 0, result.output
    assert "read as bytes" in result.stderr and "largest device in the catalog" in result.stderr
    assert "▶" in result.stdout and "frontier" in result.stdout


def test_a_step_failing_for_another_reason_exits_1_with_that_error(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(
        "import torch, memwise\n"
        "class Broken(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('the model is broken on purpose')\n"
        "def make():\n"
        "    return memwise.Workload(Broken(), lambda b: torch.randn(b, 4))\n"
    )
    result = run("plan", f"{script}:make", "--budget", "1GiB")
    assert result.exit_code == 1
    assert "broken on purpose" in result.stderr and "infeasible" not in result.output.lower()


def test_effective_batch_size_that_only_single_samples_divide_is_rejected():
    import memwise
    from memwise.plan import Planner

    args = {"width": 64, "depth": 1, "in_features": 1024}
    planner = Planner(memwise.load_workload("mlp", args), effective_batch_size=61)

    def smallest(batch: int) -> int:
        return min(planner.estimate(c.recipe.replace(batch_size=batch, micro_batch_size=None)).total_bytes
                   for c in planner.smallest_candidates())

    budget = int((smallest(2) + smallest(61)) / 2 / 0.95)  # a whole batch of 61 does not fit; of 2 does
    result = run("plan", "mlp", *[f"--arg={key}={value}" for key, value in args.items()],
                 "--budget", str(budget), "--effective-batch-size", "61")
    assert result.exit_code == 2, result.output
    assert "effective_batch_size: 61" in result.stderr and "divisors of 61 that work: 1" in result.stderr
    assert "60" in result.stderr.split("split into fitting micro-batches:")[1]


def test_find_batch_size_json_and_exit_3():
    result = run("find-batch-size", "gpt", "--arg", "seq_len=16-64", "--budget", "5MiB", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"batch_size", "trials", "predicted_peak_bytes", "measured_peak_bytes", "sized_for"} <= set(data)
    assert data["trials"] <= 2 and data["sized_for"]["shapes"][0][1] == 64 and data["measured_peak_bytes"] <= 5 * 2**20
    tiny = run("find-batch-size", "gpt", "--budget", "100KiB", "--format", "json")
    assert tiny.exit_code == 3 and json.loads(tiny.stdout)["batch_size"] is None


def test_plan_with_several_ranks_reports_nproc_strategy_and_no_confirmation():
    result = run("plan", "mlp", "--arg", "width=64", "--arg", "depth=1", "--budget", "1GiB", "--nproc", "2", "--strategy", "fsdp",
                 "--effective-batch-size", "8", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert PLAN_FIELDS <= set(data) and data["nproc"] == 2 and data["strategy"] == "fsdp"
    assert data["feasible"] is True and data["measured_peak_bytes"] is None and data["real_steps"] == 0
    assert all(alt["strategy"] == "fsdp" for alt in data["alternatives"])
    assert Recipe.from_dict(data["recipe"]).batch_size == 8


def test_strategy_without_several_ranks_and_an_indivisible_global_batch_exit_2():
    result = run("plan", "mlp", "--budget", "1GiB", "--strategy", "ddp")
    assert result.exit_code == 2 and "--strategy" in result.stderr and "--nproc" in result.stderr
    result = run("plan", "mlp", "--budget", "1GiB", "--nproc", "3", "--effective-batch-size", "8")
    assert result.exit_code == 2 and "effective_batch_size" in result.stderr and "multiple of 3" in result.stderr
