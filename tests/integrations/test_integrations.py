"""The adapters in real frameworks on CPU: transformers' Trainer, Lightning's Trainer, Accelerate."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memwise.core.errors import BadInputError
from memwise.integrations.session import load_plan

pytestmark = pytest.mark.integration

STEPS = 5


def _check_report(result, out_dir, model):
    assert result is not None and result.steps == STEPS
    param_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())
    assert result.by_category["param"] == param_bytes
    assert result.by_category["optimizer_state"] > 0 and sum(result.by_category.values()) == result.peak_bytes
    assert result.hazards == ()
    saved = json.loads((out_dir / "watch.json").read_text())
    assert saved["peak_bytes"] == result.peak_bytes and (out_dir / "report.html").is_file()


def test_hf_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install memwise[integrations])")
    from memwise.integrations.hf_trainer import MemwiseTrainerCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    data = [{"input_ids": torch.randint(0, 256, (16,)), "labels": torch.tensor(i % 2)} for i in range(64)]
    callback = MemwiseTrainerCallback(out_dir=tmp_path / "memwise", steps=STEPS)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=STEPS + 2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    _check_report(callback.result, tmp_path / "memwise", model)




def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning", reason="needs lightning (pip install memwise[integrations])")
    from memwise.integrations.lightning import MemwiseLightningCallback

    class LitMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module = LitMLP()
    data = torch.utils.data.TensorDataset(torch.randn(64, 32), torch.randint(0, 4, (64,)))
    callback = MemwiseLightningCallback(out_dir=tmp_path / "memwise", steps=STEPS)
    trainer = L.Trainer(max_steps=STEPS + 2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    _check_report(callback.result, tmp_path / "memwise", module)
    # training_step runs inside optimizer.step(closure): its saved activations are still classified
    assert max(m.peak_by_category["activation"] for m in callback.result.step_memory) > 0


def test_accelerate_hook_with_a_plan(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate (pip install memwise[integrations])")
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    from memwise.integrations.accelerate import MemwiseAccelerateHook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.TensorDataset(torch.randn(64, 32), torch.randint(0, 4, (64,)))
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=8))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"recipe": {"checkpoint": "full"}}))
    hook = MemwiseAccelerateHook(out_dir=tmp_path / "memwise", steps=STEPS, plan=plan, is_main_process=accelerator.is_main_process)
    add_hook_to_module(accelerator.unwrap_model(model), hook)
    for x, y in loader:
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    remove_hook_from_module(accelerator.unwrap_model(model))
    _check_report(hook.result, tmp_path / "memwise", model)
    assert hook.session.handle is not None and hook.session.handle.recipe.checkpoint.value == "full"


def test_plan_files_are_checked(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="plan: cannot read"):
        load_plan(bad)
    with pytest.raises(BadInputError, match="unknown key 'precisoin'"):
        load_plan({"precisoin": "bf16"})
    assert load_plan({"recipe": {"precision": "bf16"}}).precision.value == "bf16"
