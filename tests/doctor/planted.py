"""Small training loops that each plant one memory hazard (or, with `fixed=True`, its fix).

Each `plant_<kind>(fixed)` returns a `Planted`: the watch's result, the line the doctor should
point at (the line marked `# plant` in this file) and the planted size in bytes, worked out
independently of memwise (tensor sizes, or the storages autograd saved, collected with
`torch.autograd.graph.saved_tensors_hooks`). Shared by tests/doctor and benchmarks/doctor.
"""

import contextlib
import dataclasses
import inspect
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memwise.doctor.runner import diagnose_script
from memwise.measure.watch import WatchResult, watch

STEPS = 6
BATCH = 64


@dataclasses.dataclass
class Planted:
    kind: str
    result: WatchResult
    file: str
    line: int
    planted_bytes: int


def _line(function, marker: str = "# plant") -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, text in enumerate(lines) if marker in text)


def _mlp(width: int = 512) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, 10))


def _batches(steps: int = STEPS):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randn(BATCH, 128, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class _SavedStorages:
    """Bytes of the distinct storages autograd saves for backward (minus `exclude`d ones)."""

    def __init__(self, exclude) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def measure(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> int:
        """Runs one forward (and loss when `y` is given) outside any watch; returns the saved bytes."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            out = model(x)
            loss = F.cross_entropy(out, y) if y is not None else out
        del out, loss
        return self.nbytes

    def pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in self.exclude:
            self.storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def plant_graph_kept(fixed: bool) -> Planted:
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    outputs = []
    with watch(model, optimizer) as w:
        for x, y in _batches():
            out = model(x)  # plant
            loss = F.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.argmax(1).tolist() if fixed else out)
    return Planted("graph_kept", w.result(), __file__, _line(plant_graph_kept), BATCH * 10 * 4)


def plant_tensors_accumulated(fixed: bool) -> Planted:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    features = []
    with watch(model, optimizer) as w:
        for x, y in _batches():
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimizer.step()
            optimizer.zero_grad()
            feature = torch.cat([x, out.detach()], dim=1)  # plant
            features.append(feature.norm().item() if fixed else feature)
    return Planted("tensors_accumulated", w.result(), __file__, _line(plant_tensors_accumulated), BATCH * 138 * 4)


def plant_cache_never_evicts(fixed: bool) -> Planted:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cache = {}
    with watch(model, optimizer) as w:
        for step, (x, y) in enumerate(_batches()):
            if fixed:
                cache.clear()
            cache[step] = torch.softmax(x, dim=1)  # plant
            out = model(cache[step])
            F.cross_entropy(out, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return Planted("cache_never_evicts", w.result(), __file__, _line(plant_cache_never_evicts), BATCH * 128 * 4)


def plant_zero_grad_not_none(fixed: bool) -> Planted:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, optimizer) as w:
        for x, y in _batches():
            optimizer.zero_grad(set_to_none=fixed)  # plant
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return Planted("zero_grad_not_none", w.result(), __file__, _line(plant_zero_grad_not_none), _param_bytes(model))


def plant_grads_not_in_optimizer(fixed: bool) -> Planted:
    model = _mlp()
    if fixed:
        model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.01)
    with watch(model, optimizer) as w:
        for x, y in _batches():
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # plant
            optimizer.step()
            optimizer.zero_grad()
    return Planted("grads_not_in_optimizer", w.result(), __file__, _line(plant_grads_not_in_optimizer), _param_bytes(model[0]))


def plant_retain_graph_unused(fixed: bool) -> Planted:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = next(_batches())
    saved_bytes = _SavedStorages(exclude=[x, y, *model.parameters()]).measure(model, x, y)
    with watch(model, optimizer) as w:
        for x, y in _batches():
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=not fixed)  # plant
            optimizer.step()
            optimizer.zero_grad()
    return Planted("retain_graph_unused", w.result(), __file__, _line(plant_retain_graph_unused), saved_bytes)


def plant_eval_without_no_grad(fixed: bool) -> Planted:
    model = _mlp().eval()
    correct = 0
    x, _ = next(_batches())
    saved_bytes = _SavedStorages(exclude=[x, *model.parameters()]).measure(model, x)
    with watch(model) as w:
        for x, y in _batches():
            with torch.no_grad() if fixed else contextlib.nullcontext():
                out = model(x)  # plant
            correct += int((out.argmax(1) == y).sum())
            w.step()
    return Planted("eval_without_no_grad", w.result(), __file__, _line(plant_eval_without_no_grad), saved_bytes)


def plant_repeated_host_to_device_copy(fixed: bool) -> Planted:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    offsets = torch.randint(0, 3, (BATCH, 128), dtype=torch.int16)
    converted = offsets.float()
    with watch(model, optimizer) as w:
        for x, y in _batches():
            shift = converted if fixed else offsets.float()  # plant
            F.cross_entropy(model(x + shift), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return Planted("repeated_host_to_device_copy", w.result(), __file__, _line(plant_repeated_host_to_device_copy), BATCH * 128 * 4)


_WEIGHT_SCRIPT = '''
import torch
import torch.nn.functional as F
from torch import nn

FIXED = {fixed}
torch.manual_seed(0)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.head = nn.Linear(64, 1000, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.relu(self.emb(idx)))


model = TinyLM()
{plant}
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(8):
    idx = torch.randint(0, 1000, (16, 8))
    F.cross_entropy(model(idx).flatten(0, 1).float(), idx.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()
'''
_PLANTS = {
    "tied_weights_duplicated": (
        "model.head.weight = model.emb.weight if FIXED else nn.Parameter(model.emb.weight.detach().clone())  # plant",
        1000 * 64 * 4,
    ),
    "fp32_copy_beside_bf16": (
        "model = model.to(torch.bfloat16)\nmaster = None if FIXED else [p.detach().float() for p in model.parameters()]  # plant",
        1000 * 64 * 4,
    ),
}


def plant_weights(kind: str, fixed: bool, directory: Path) -> Planted:
    """Runs a script (through the doctor's script runner) that plants `kind`."""
    plant, planted_bytes = _PLANTS[kind]
    source = textwrap.dedent(_WEIGHT_SCRIPT).format(fixed=fixed, plant=plant)
    path = Path(directory) / f"train_{kind}.py"
    path.write_text(source)
    line = 1 + next(i for i, text in enumerate(source.splitlines()) if "# plant" in text)
    diagnosis = diagnose_script(path, steps=STEPS)
    return Planted(kind, diagnosis.result, str(path), line, planted_bytes)


IN_PROCESS = {
    "graph_kept": plant_graph_kept,
    "tensors_accumulated": plant_tensors_accumulated,
    "cache_never_evicts": plant_cache_never_evicts,
    "zero_grad_not_none": plant_zero_grad_not_none,
    "grads_not_in_optimizer": plant_grads_not_in_optimizer,
    "retain_graph_unused": plant_retain_graph_unused,
    "eval_without_no_grad": plant_eval_without_no_grad,
    "repeated_host_to_device_copy": plant_repeated_host_to_device_copy,
}
SCRIPTED = tuple(_PLANTS)


class PythonRows(torch.utils.data.Dataset):
    """Rows kept as Python lists of floats: each DataLoader worker copies the pages it reads."""

    def __init__(self, rows: int) -> None:
        self.rows = [[float(j) for j in range(i, i + 24)] for i in range(rows)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(self.rows[index])


class TensorRows(PythonRows):
    """The same rows in one tensor (the fix)."""

    def __init__(self, rows: int) -> None:
        self.rows = torch.arange(rows * 24, dtype=torch.float32).reshape(rows, 24)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index]


def plant_dataloader_worker_rss_growth(fixed: bool, rows: int = 60_000) -> Planted:
    """Two workers read every row once; the planted size is not known in advance (RSS), so it is 0."""
    model = nn.Linear(24, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader((TensorRows if fixed else PythonRows)(rows), batch_size=rows // 8, num_workers=2)
    with watch(model, optimizer) as w:
        for x in loader:
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    return Planted("dataloader_worker_rss_growth", w.result(), inspect.getsourcefile(PythonRows),
                   inspect.getsourcelines(PythonRows)[1], 0)
