"""Input pipeline benchmarks, side by side in one run.

1. Throughput: the loader `tune_loader` recommends against `DataLoader(dataset, batch_size)` with its
   defaults, on a dataset whose transform is CPU-heavy (a 5x5 box blur and 20 pointwise passes per image, in numpy).
2. Host memory: PSS of the main process and 4 forked workers after each worker has read every sample
   once, over a Python-list dataset (lists of floats: reading a sample touches its objects' refcounts,
   so each worker copies the pages it reads) against a MemmapDataset of the same data.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data/bench_loader.py
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

from memwise.data import MemmapDataset, tree_pss_bytes, tune_loader  # noqa: E402


class BlurDataset(torch.utils.data.Dataset):
    """Square images, each blurred with a 5x5 box filter and `passes` pointwise passes in numpy on every read."""

    def __init__(self, count: int, size: int = 128, passes: int = 60) -> None:
        self.images = np.random.default_rng(0).random((count, size, size), dtype=np.float32)
        self.size, self.passes = size, passes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        padded = np.pad(image, 2, mode="edge")
        size = self.size
        blurred = sum(padded[dy:dy + size, dx:dx + size] for dy in range(5) for dx in range(5)) / 25.0
        for _ in range(self.passes):  # more passes: a transform that costs as much as real augmentation (~1 ms)
            blurred = np.sqrt(np.abs(blurred * 1.0001 + 1e-3))
        return torch.from_numpy(np.ascontiguousarray(blurred))


class ListDataset(torch.utils.data.Dataset):
    """Samples kept as Python lists of floats (what a naive JSON/CSV loader produces)."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(self.rows[index])


def throughput(loader: DataLoader, epochs: int) -> float:
    samples, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            samples += len(batch)
    return samples / (time.perf_counter() - started)


def workers_pss(dataset: torch.utils.data.Dataset, workers: int) -> int:
    """PSS of the tree while `workers` persistent workers hold the state left by reading every sample once."""
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, persistent_workers=True, prefetch_factor=1)
    for _ in loader:  # each worker reads its share of the batches...
        pass
    for _ in loader:  # ...and, over two epochs, with round-robin batches, touches them again
        pass
    iterator = iter(loader)
    next(iterator)
    pss = tree_pss_bytes()
    del iterator, loader
    gc.collect()
    return pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024, help="images in the blur dataset")
    parser.add_argument("--image-size", type=int, default=128, help="side of the blur dataset's images")
    parser.add_argument("--passes", type=int, default=60, help="pointwise passes of the transform per image")
    parser.add_argument("--rows", type=int, default=20000, help="rows in the memory comparison")
    parser.add_argument("--width", type=int, default=256, help="floats per row")
    args = parser.parse_args()

    dataset = BlurDataset(args.samples, args.image_size, args.passes)
    config = tune_loader(dataset, 32)
    # Alternate the two loaders and keep the median of each: the machine is shared, so back-to-back
    # single runs can differ by more than the effect.
    default_rates, tuned_rates = [], []
    for _ in range(3):
        default_rates.append(throughput(DataLoader(dataset, batch_size=32), epochs=2))
        tuned_rates.append(throughput(config.make_loader(dataset), epochs=2))
    default_rate, tuned_rate = statistics.median(default_rates), statistics.median(tuned_rates)
    rows = [["default DataLoader (num_workers=0)", f"{default_rate:,.0f}", "1.00"],
            [f"tuned {config.dataloader_kwargs()}", f"{tuned_rate:,.0f}", f"{tuned_rate / default_rate:.2f}"]]
    print_table(f"Tuned vs default loader, CPU-heavy transform ({args.samples} {args.image_size}x{args.image_size} images, {args.passes} passes, batch 32, 2 epochs, median of 3 alternating runs)",
                ["loader", "samples/s", "ratio"], rows)

    data = np.random.default_rng(1).random((args.rows, args.width)).astype(np.float32)
    baseline = tree_pss_bytes()
    list_dataset = ListDataset(data.tolist())
    list_pss = workers_pss(list_dataset, 4)
    del list_dataset
    gc.collect()
    with tempfile.TemporaryDirectory() as directory:
        memmap_dataset = MemmapDataset.write(Path(directory) / "rows.mm", [row for row in data])
        memmap_pss = workers_pss(memmap_dataset, 4)
    payload = data.nbytes
    mem_rows = [["Python list of floats", f"{list_pss / 2**20:,.1f}", f"{(list_pss - baseline) / 2**20:,.1f}"],
                ["MemmapDataset", f"{memmap_pss / 2**20:,.1f}", f"{(memmap_pss - baseline) / 2**20:,.1f}"]]
    print_table(f"Host memory (PSS) of main + 4 workers, {args.rows} rows x {args.width} float32 ({payload / 2**20:.1f} MiB of data)",
                ["dataset", "PSS of tree (MiB)", "above the process before (MiB)"], mem_rows)
    print(f"list / memmap PSS growth: {(list_pss - baseline) / max(memmap_pss - baseline, 1):.1f}x")
    write_rows("data_loader", [
        {"benchmark": "throughput", "default_samples_per_s": default_rate, "tuned_samples_per_s": tuned_rate,
         "ratio": tuned_rate / default_rate, "tuned": config.dataloader_kwargs()},
        {"benchmark": "workers_pss", "workers": 4, "baseline_pss_bytes": baseline, "list_pss_bytes": list_pss,
         "memmap_pss_bytes": memmap_pss, "payload_bytes": payload},
    ], vars(args))


if __name__ == "__main__":
    main()
