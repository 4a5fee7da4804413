"""The memory doctor: hazards found in a watched training loop, each with its line and its fix.

`hazards` holds the `Hazard` result and the rules that need no torch state; `memwise.measure.watch`
collects the evidence; `runner` runs a workload or a user's script under `watch`.
"""
