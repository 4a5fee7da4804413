"""Thin adapters that run `memwise.watch` inside a framework's training loop.

Each imports its framework only when used (install with `pip install memwise[integrations]`):
`hf_trainer.MemwiseTrainerCallback` (transformers), `lightning.MemwiseLightningCallback`
(Lightning), `accelerate.MemwiseAccelerateHook` (Accelerate). All share `session.WatchSession`:
optionally apply a plan (a Recipe JSON) with `memwise.apply_`, watch the steps, write the report.
"""
