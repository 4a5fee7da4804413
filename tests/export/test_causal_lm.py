"""Export of transformers causal LMs (random weights): inference outputs, without the KV cache."""

import pytest
import torch

from memwise.core.workload import Workload
from memwise.export import export

transformers = pytest.importorskip("transformers", reason="causal LM export tests need transformers")


def _workload(kind: str) -> Workload:
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=100, max_position_embeddings=64)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))

    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 100, (batch_size, 16))
        return {"input_ids": ids, "labels": ids}

    return Workload(model, make_batch=make_batch, name=kind, default_batch_size=2)


@pytest.mark.parametrize(("kind", "target"), [("qwen2", "onnx"), ("qwen2", "torch-export"), ("llama", "torch-export")])
def test_causal_lm_exports_without_kv_cache(kind, target, tmp_path):
    if target == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime")
    workload = _workload(kind)
    assert workload.model.config.use_cache
    result = export(workload, target, tmp_path / "lm.out")
    assert result.passed, result.max_abs_diff
    assert any("use_cache=False" in note for note in result.notes)
    assert workload.model.config.use_cache  # restored


class _TaggedOutput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, scale=None):
        return {"y": self.linear(x), "tag": "not a tensor", "nothing": None}


@pytest.mark.parametrize("target", ["torch-export", "torchscript"])
def test_non_tensor_outputs_are_dropped_with_a_note(target, tmp_path):
    result = export(_TaggedOutput(), target, tmp_path / "tagged.out", example_inputs=torch.randn(2, 4))
    assert result.passed and result.max_abs_diff == 0.0
    assert any("dropped non-tensor outputs of type str" in note for note in result.notes)


def test_encoder_decoder_gets_decoder_inputs_from_labels_and_exports(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16,
                                   vocab_size=100, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    workload = Workload(model, make_batch=lambda b: {"input_ids": torch.randint(0, 100, (b, 12)), "labels": torch.randint(0, 100, (b, 6))},
                        name="t5", default_batch_size=2)
    result = export(workload, "torch-export", tmp_path / "t5.pt2")
    assert result.passed, result.max_abs_diff
    assert any("use_cache=False" in note for note in result.notes)
