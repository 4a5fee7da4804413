"""Finding the dataset a Workload trains on."""

from typing import Any

from memwise.core.errors import BadInputError
from memwise.core.workload import Workload


def dataset_of(workload: Workload) -> Any:
    """The map-style dataset of `workload`: `workload.extras["dataset"]`.

    A user workload exposes its dataset by passing `extras={"dataset": my_dataset}` to `Workload`.
    """
    dataset = workload.extras.get("dataset")
    if dataset is None:
        raise BadInputError(
            f"workload {workload.name!r} exposes no dataset; pass extras={{'dataset': your_dataset}} to Workload "
            "(the built-in digits-cnn has one)"
        )
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise BadInputError(f"workload {workload.name!r}: extras['dataset'] is a {type(dataset).__name__}, not a map-style dataset")
    return dataset
