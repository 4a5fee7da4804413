import math

import pytest
import torch

from memwise.core.blocks import find_blocks
from memwise.core.errors import BadInputError
from memwise.workloads.gpt import GPT, PRESETS, GPTConfig, gpt


def _expected_parameters(config: GPTConfig) -> int:
    """nanoGPT's count: tied embedding/head once, position embedding, 12C^2 + 13C per block, final LN."""
    width = config.n_embd
    per_block = 12 * width * width + 13 * width
    return config.vocab_size * width + config.block_size * width + config.n_layer * per_block + 2 * width


def test_gpt2_124m_preset_has_124_439_808_parameters_with_tied_weights():
    with torch.device("meta"):
        workload = gpt(preset="gpt2-124m")
    model = workload.model
    assert all(parameter.is_meta for parameter in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(parameter.numel() for parameter in model.parameters()) == 124_439_808


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_count_matches_the_formula(preset):
    with torch.device("meta"):
        model = gpt(preset=preset).model
    assert sum(parameter.numel() for parameter in model.parameters()) == _expected_parameters(PRESETS[preset])


def test_loss_at_initialization_is_close_to_uniform_over_the_vocabulary():
    workload = gpt(preset="tiny", seed=0)
    loss = workload.model(*workload.make_batch(8))
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(512)) < 0.5


def test_is_causal_a_later_token_does_not_change_earlier_logits():
    model = gpt(preset="tiny").model.eval()
    idx = torch.randint(512, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 512
    with torch.no_grad():
        logits, changed_logits = model(idx), model(changed)
    assert logits.shape == (2, 16, 512)
    torch.testing.assert_close(changed_logits[:, :10], logits[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed_logits[:, 10:], logits[:, 10:])


def test_make_batch_returns_next_token_targets_of_seq_len():
    workload = gpt(preset="tiny", seq_len=32)
    idx, targets = workload.make_batch(4)
    assert idx.shape == targets.shape == (4, 32) and idx.dtype == torch.int64
    torch.testing.assert_close(idx[:, 1:], targets[:, :-1])
    assert int(idx.max()) < 512
    assert gpt(preset="tiny").make_batch(1)[0].shape == (1, 64)  # seq_len defaults to block_size


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    workload = gpt(preset="tiny")
    batch = workload.make_batch(4)
    optimizer = torch.optim.AdamW(workload.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = workload.model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_overrides_change_the_preset_and_the_name():
    workload = gpt(preset="tiny", n_layer=3, n_embd=96, n_head=3)
    assert len(find_blocks(workload.model)) == 3
    assert workload.model.config.n_embd == 96 and workload.model.config.block_size == 64
    assert workload.name == "gpt-tiny(n_layer=3,n_head=3,n_embd=96)"
    assert gpt().name == "gpt-tiny" and gpt().default_batch_size == 8


def test_the_blocks_are_transformer_h():
    assert [name for name, _ in find_blocks(gpt().model)] == ["transformer.h.0", "transformer.h.1"]


def test_unknown_preset_lists_the_presets():
    with pytest.raises(BadInputError, match="tiny, small, gpt2-124m"):
        gpt(preset="huge")


def test_n_embd_not_divisible_by_n_head_is_rejected():
    with pytest.raises(BadInputError, match="n_embd=64 is not divisible by n_head=3"):
        gpt(n_head=3)


def test_seq_len_longer_than_block_size_is_rejected():
    with pytest.raises(BadInputError, match="seq_len=65 exceeds block_size=64"):
        gpt(seq_len=65)


@pytest.mark.parametrize(("argument", "value"), [("n_layer", "abc"), ("vocab_size", 0), ("seq_len", 1.5), ("n_head", True)])
def test_a_bad_size_names_the_argument(argument, value):
    with pytest.raises(BadInputError, match=argument):
        gpt(**{argument: value})


def test_input_longer_than_block_size_is_rejected():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    with pytest.raises(BadInputError, match="block_size=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
