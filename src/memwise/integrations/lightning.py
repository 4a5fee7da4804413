"""`MemwiseLightningCallback`: `memwise.watch` inside a Lightning `Trainer`.

    trainer = L.Trainer(..., callbacks=[MemwiseLightningCallback(out_dir="memwise-out", steps=20)])
"""

from typing import Any

from lightning.pytorch import Callback

from memwise.integrations.session import PlanLike, WatchSession


class MemwiseLightningCallback(Callback):
    """Watches the LightningModule's optimizer steps from `on_train_start` (after an optional plan
    is applied) and writes the report when `steps` are done or training ends.

    Lightning runs `training_step` and backward inside `optimizer.step(closure)`; memwise sees the
    closure and marks the phases from the forward and backward themselves.

    Args: see `WatchSession` (out_dir, steps, plan). The report is written by global rank 0 only.
    """

    def __init__(self, out_dir: Any = None, steps: int | None = None, plan: PlanLike = None) -> None:
        super().__init__()
        self.session = WatchSession(out_dir, steps, plan)

    @property
    def result(self) -> Any:
        return self.session.result

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        self.session.begin(pl_module, optimizer, write=trainer.is_global_zero)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.session.watch is not None:
            self.session.watch.begin_forward()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.end()
