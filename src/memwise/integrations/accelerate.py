"""`MemwiseAccelerateHook`: `memwise.watch` as an Accelerate `ModelHook`.

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hook = MemwiseAccelerateHook(out_dir="memwise-out", steps=20, is_main_process=accelerator.is_main_process)
    add_hook_to_module(accelerator.unwrap_model(model), hook)
    ...                                 # the loop, with accelerator.backward(loss)
    remove_hook_from_module(accelerator.unwrap_model(model))   # or after `steps` steps: hook.result
"""

from typing import Any

from accelerate.hooks import ModelHook

from memwise.integrations.session import PlanLike, WatchSession


class MemwiseAccelerateHook(ModelHook):
    """Starts watching the module it is attached to (after an optional plan is applied), finds the
    optimizer at its first step (Accelerate's wrapper is looked through) and writes the report when
    `steps` are done or the hook is removed.

    Args: see `WatchSession` (out_dir, steps, plan); `is_main_process`: write the report (pass
    `accelerator.is_main_process`).
    """

    def __init__(self, out_dir: Any = None, steps: int | None = None, plan: PlanLike = None, *, is_main_process: bool = True) -> None:
        self.session = WatchSession(out_dir, steps, plan)
        self.is_main_process = is_main_process

    @property
    def result(self) -> Any:
        return self.session.result

    def init_hook(self, module: Any) -> Any:
        self.session.begin(module, write=self.is_main_process)
        return module

    def detach_hook(self, module: Any) -> Any:
        self.session.end()
        return module
