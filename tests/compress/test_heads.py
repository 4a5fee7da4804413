"""Attention-head pruning of BERT-style self-attention: exact shapes, same output shape, reload, identity."""

import pytest
import torch

from memwise.compress import load_compressed, prune_structured
from memwise.compress.load import save_compressed, serialize

transformers = pytest.importorskip("transformers", reason="attention-head pruning is tested on a transformers BertModel (memwise[hf])")

HIDDEN, HEADS, LAYERS = 32, 4, 2
HEAD_SIZE = HIDDEN // HEADS


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager",
    )
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    return model, inputs


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_attention_layers_are_found(bert):
    model, _ = bert
    assert prune_structured.attention_layers(model) == {f"encoder.layer.{index}.attention.self": HEADS for index in range(LAYERS)}
    assert prune_structured.attention_layers(torch.nn.Sequential(torch.nn.Linear(4, 4))) == {}


def test_removing_two_of_four_heads_shrinks_exactly_and_reloads(bert, tmp_path):
    model, inputs = bert
    layer = "encoder.layer.0.attention.self"
    pruned = prune_structured.prune_heads(model, {layer: [1, 3]})
    removed_width = 2 * HEAD_SIZE
    # query/key/value lose 2*8 rows (weights and biases), the output projection 2*8 columns
    expected_removed = 3 * removed_width * (HIDDEN + 1) + HIDDEN * removed_width
    assert prune_structured.parameter_count(model) - prune_structured.parameter_count(pruned) == expected_removed
    attention = pruned.get_submodule(layer)
    assert attention.num_attention_heads == 2 and attention.all_head_size == 2 * HEAD_SIZE
    assert attention.query.weight.shape == (2 * HEAD_SIZE, HIDDEN)
    assert pruned.encoder.layer[0].attention.output.dense.weight.shape == (HIDDEN, 2 * HEAD_SIZE)
    assert pruned.encoder.layer[1].attention.self.num_attention_heads == HEADS  # the other layer is untouched
    # the kept heads are the original heads 0 and 2, rows unchanged
    kept = torch.cat([torch.arange(0, HEAD_SIZE), torch.arange(2 * HEAD_SIZE, 3 * HEAD_SIZE)])
    torch.testing.assert_close(attention.value.weight, model.get_submodule(layer).value.weight[kept], rtol=0, atol=0)
    output = _forward(pruned, inputs)
    assert output.shape == _forward(model, inputs).shape
    assert not torch.equal(output, _forward(model, inputs))
    save_compressed(tmp_path / "model.pt", serialize(pruned))
    reloaded = load_compressed(tmp_path)
    assert reloaded.get_submodule(layer).query.weight.shape == (2 * HEAD_SIZE, HIDDEN)
    torch.testing.assert_close(_forward(reloaded, inputs), output, rtol=0, atol=0)


def test_removing_no_head_is_the_identity(bert):
    model, inputs = bert
    pruned = prune_structured.prune_heads(model, {"encoder.layer.0.attention.self": []})
    assert prune_structured.parameter_count(pruned) == prune_structured.parameter_count(model)
    torch.testing.assert_close(_forward(pruned, inputs), _forward(model, inputs), rtol=0, atol=0)
    assert prune_structured.heads_for_ratios(model, {"encoder.layer.0.attention.self": 0.1}) == {}


def test_cannot_remove_every_head_or_a_missing_one(bert):
    model, _ = bert
    with pytest.raises(ValueError, match="cannot remove heads"):
        prune_structured.prune_heads(model, {"encoder.layer.0.attention.self": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="cannot remove heads"):
        prune_structured.prune_heads(model, {"encoder.layer.0.attention.self": [4]})
    assert len(prune_structured.heads_for_ratios(model, {"encoder.layer.0.attention.self": 1.0})["encoder.layer.0.attention.self"]) == HEADS - 1


def test_weakest_heads_are_the_smallest_by_norm(bert):
    model, _ = bert
    layer = "encoder.layer.1.attention.self"
    damaged = prune_structured.prune_heads(model, {})
    with torch.no_grad():
        damaged.get_submodule(layer).query.weight[2 * HEAD_SIZE:3 * HEAD_SIZE] *= 0.01
        damaged.get_submodule(layer).key.weight[2 * HEAD_SIZE:3 * HEAD_SIZE] *= 0.01
        damaged.get_submodule(layer).value.weight[2 * HEAD_SIZE:3 * HEAD_SIZE] *= 0.01
        damaged.encoder.layer[1].attention.output.dense.weight[:, 2 * HEAD_SIZE:3 * HEAD_SIZE] *= 0.01
    assert prune_structured.weakest_heads(damaged, layer, 1) == [2]
    assert prune_structured.heads_for_ratios(damaged, {layer: 0.25}) == {layer: [2]}


def test_head_sensitivity_scan_measures_each_layer_alone(bert):
    model, inputs = bert
    reference = _forward(model, inputs)

    def evaluate(candidate):  # deterministic: cosine similarity to the original's embeddings
        return float(torch.nn.functional.cosine_similarity(_forward(candidate, inputs), reference, dim=-1).mean())

    layers = list(prune_structured.attention_layers(model))
    scan = prune_structured.head_sensitivity_scan(model, evaluate, layers, ratios=(0.25, 0.5))
    assert [item.layer for item in scan] == layers
    for item in scan:
        expected = evaluate(model) - evaluate(prune_structured.prune_heads(model, prune_structured.heads_for_ratios(model, {item.layer: 0.5})))
        assert item.drop_by_ratio[0.5] == pytest.approx(expected, abs=1e-7)
        assert item.drop_by_ratio[0.5] > 0
        assert item.parameters_removed_by_ratio[0.25] == 3 * HEAD_SIZE * (HIDDEN + 1) + HIDDEN * HEAD_SIZE
    worst = max(scan, key=lambda item: item.drop_by_ratio[0.5])
    ratios = prune_structured.ratios_from_scan(scan, tolerated_drop=worst.drop_by_ratio[0.5] - 1e-9)
    assert ratios.get(worst.layer, 0.0) < 0.5


def test_search_tries_head_pruning_as_a_trial_row(bert, tmp_path):
    import memwise

    model, inputs = bert
    reference = _forward(model, inputs)

    def evaluate(candidate):  # cosine similarity of the candidate's embeddings to the original's
        return float(torch.nn.functional.cosine_similarity(_forward(candidate, inputs), reference, dim=-1).mean())

    def make_batch(batch_size):
        generator = torch.Generator().manual_seed(batch_size)
        return {"input_ids": torch.randint(0, 64, (batch_size, 10), generator=generator)}

    workload = memwise.Workload(model, make_batch, evaluate=evaluate, name="tiny-bert")
    result = memwise.compress(workload, 0.2, methods="prune", budget_s=120)
    rows = [trial for trial in result.trials if trial.method.startswith("prune_heads")]
    assert rows, (result.trials, result.skipped)
    heads_removed = rows[0].methods[0].params["heads_removed"]
    assert heads_removed and all(0 < len(heads) < HEADS for heads in heads_removed.values())
    assert rows[0].metric_drop == pytest.approx(1.0 - rows[0].metric, abs=1e-6)
