"""`MemwiseTrainerCallback`: `memwise.watch` inside a Hugging Face `transformers.Trainer`.

    trainer = Trainer(..., callbacks=[MemwiseTrainerCallback(out_dir="memwise-out", steps=20)])
    trainer.train()   # memwise-out/report.html; callback.result.hazards
"""

from typing import Any

from transformers import TrainerCallback

from memwise.integrations.session import PlanLike, WatchSession


class MemwiseTrainerCallback(TrainerCallback):
    """Watches the Trainer's optimizer steps from `on_train_begin` (after an optional plan is
    applied to the model) and writes the report when `steps` are done or training ends.

    Args: see `WatchSession` (out_dir, steps, plan). The report is written by the main process only.
    """

    def __init__(self, out_dir: Any = None, steps: int | None = None, plan: PlanLike = None) -> None:
        self.session = WatchSession(out_dir, steps, plan)

    @property
    def result(self) -> Any:
        return self.session.result

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        self.session.begin(model, optimizer, write=state.is_world_process_zero)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.end()
