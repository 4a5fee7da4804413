"""The README's Python examples run as written."""

import re
from pathlib import Path

import memwise

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_workload_example_profiles_and_estimates():
    namespace: dict = {}
    exec(_python_blocks()[0], namespace)
    workload = namespace["make_workload"](width=64)
    measured = memwise.profile(workload, memwise.Recipe(batch_size=16), steps=2, verify=True)
    assert measured.peak_bytes == measured.reference_peak_bytes
    predicted = memwise.estimate(workload, memwise.Recipe(batch_size=16), "cpu")
    assert abs(predicted.peak_bytes / measured.peak_bytes - 1) <= 0.05


def test_readme_library_example_runs():
    namespace: dict = {}
    exec(_python_blocks()[0], namespace)
    exec(_python_blocks()[1], namespace)
    assert namespace["result"].peak_bytes > 0
    assert namespace["guess"].device == "A100-80GB"
