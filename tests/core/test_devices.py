import psutil
import pytest

from memwise.core.devices import (
    DEVICES,
    DeviceSpec,
    cpu_device,
    custom_device,
    get_device,
)
from memwise.core.errors import BadInputError

GIB = 2**30
REQUIRED = ("T4", "L4", "A10G", "RTX-3090", "RTX-4090", "A100-40GB", "A100-80GB", "H100-80GB", "H200")


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_device_resolves(name: str) -> None:
    spec = get_device(name)
    assert spec.name == name
    assert spec.kind == "cuda"
    assert 0 < spec.context_bytes < spec.memory_bytes
    assert spec.description


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("h100", "H100-80GB"),
        ("H100", "H100-80GB"),
        ("a100-80gb", "A100-80GB"),
        ("A100_40GB", "A100-40GB"),
        ("rtx4090", "RTX-4090"),
        ("RTX 4090", "RTX-4090"),
        ("4090", "RTX-4090"),
        ("rtx-3090", "RTX-3090"),
        ("3090", "RTX-3090"),
        ("t4", "T4"),
        ("l4", "L4"),
        ("a10g", "A10G"),
        ("h200", "H200"),
        # Names as torch.cuda.get_device_name() spells them.
        ("Tesla T4", "T4"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
    ],
)
def test_aliases_resolve_case_insensitively(alias: str, expected: str) -> None:
    assert get_device(alias) is DEVICES[expected]


def test_unknown_name_lists_the_catalog() -> None:
    with pytest.raises(BadInputError, match="H100-80GB") as info:
        get_device("V100-SXM9")
    message = str(info.value)
    for name in REQUIRED:
        assert name in message
    assert "V100-SXM9" in message


def test_ambiguous_a100_names_both_choices() -> None:
    with pytest.raises(BadInputError, match="A100-40GB or A100-80GB"):
        get_device("a100")


@pytest.mark.parametrize("bad", ["", "   ", None, 80])
def test_non_names_raise(bad: object) -> None:
    with pytest.raises(BadInputError, match="device"):
        get_device(bad)  # type: ignore[arg-type]


def test_capacities_are_ordered_as_the_products_are() -> None:
    memory = {name: get_device(name).memory_bytes for name in REQUIRED}
    assert memory["T4"] < memory["L4"]
    assert memory["L4"] == memory["A10G"] == memory["RTX-3090"] == memory["RTX-4090"] == 24 * GIB
    assert memory["RTX-4090"] < memory["A100-40GB"]
    assert memory["A100-80GB"] == 2 * memory["A100-40GB"]
    assert memory["A100-80GB"] == memory["H100-80GB"]
    assert memory["H100-80GB"] < memory["H200"]


def test_hopper_context_is_not_smaller_than_turing() -> None:
    assert get_device("H100-80GB").context_bytes >= get_device("T4").context_bytes


def test_custom_device_reads_sizes() -> None:
    spec = custom_device("12GiB", name="my-gpu", context_bytes="256MiB")
    assert spec.memory_bytes == 12 * GIB
    assert spec.context_bytes == 256 * 2**20
    assert spec.name == "my-gpu"
    assert spec.kind == "cuda"
    assert custom_device(8 * GIB, context_bytes=0).context_bytes == 0


def test_custom_device_rejects_bad_sizes() -> None:
    with pytest.raises(BadInputError, match="memory_bytes"):
        custom_device(0)
    with pytest.raises(BadInputError, match="context_bytes"):
        custom_device("1GiB", context_bytes="2GiB")


def test_cpu_device_is_this_machine() -> None:
    spec = cpu_device()
    assert spec.kind == "cpu"
    assert spec.context_bytes == 0
    assert spec.memory_bytes == psutil.virtual_memory().total
    assert get_device("CPU") == spec


def test_device_spec_round_trips_through_json() -> None:
    spec = get_device("H200")
    data = spec.to_dict()
    assert data["version"] == 1
    assert DeviceSpec.from_dict(data) == spec


def test_device_spec_rejects_unknown_keys_and_kinds() -> None:
    data = get_device("T4").to_dict()
    data["memory_gb"] = 16
    with pytest.raises(BadInputError, match="memory_gb"):
        DeviceSpec.from_dict(data)
    with pytest.raises(BadInputError, match="kind"):
        DeviceSpec(name="x", kind="tpu", memory_bytes=GIB, context_bytes=0, description="")
