"""An untrained model is refused before any search: its metric is compared with a re-initialised copy."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from memwise.cli.main import main
from memwise.compress.target import target_from_workload
from memwise.core.errors import BadInputError
from memwise.workloads.registry import load_workload

TINY = str(Path(__file__).with_name("tiny_workload.py")) + ":tiny"


def test_untrained_user_workload_exits_2_naming_weights(tmp_path):
    result = CliRunner().invoke(main, ["compress", TINY, "--arg", "untrained=true", "--max-metric-drop", "0.02",
                                       "--methods", "quantize", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "looks untrained" in result.output and "re-initialised" in result.output and "--weights" in result.output
    assert not (tmp_path / "out").exists()


def test_untrained_model_with_trained_weights_is_accepted(tmp_path):
    trained = load_workload(TINY)
    weights = tmp_path / "weights.pt"
    torch.save(trained.model.state_dict(), weights)
    untrained = load_workload(TINY, {"untrained": True})
    target = target_from_workload(untrained, weights=weights)
    assert target.evaluate(target.model) > 0.9
    with pytest.raises(BadInputError, match="looks untrained"):
        target_from_workload(load_workload(TINY, {"untrained": True}))


def test_reinit_check_leaves_the_global_rng_alone():
    workload = load_workload(TINY)
    state = torch.random.get_rng_state()
    target_from_workload(workload)
    assert torch.equal(torch.random.get_rng_state(), state)
