"""Planning under a memory budget: `plan` (the fastest recipe that fits) and `find_batch_size`."""

from memwise.plan.batch_size import BatchSizeResult, find_batch_size
from memwise.plan.input_sizing import InputSizing
from memwise.plan.planner import Plan, PlanAlternative, PlanObjective, Planner, PlanReason, plan

__all__ = ["BatchSizeResult", "InputSizing", "Plan", "PlanAlternative", "PlanObjective", "PlanReason", "Planner",
           "find_batch_size", "plan"]
