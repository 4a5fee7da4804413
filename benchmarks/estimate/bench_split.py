"""The estimate's split of the peak by category against `profile`'s, on ResNet-50 and EfficientNet-B0.

Both nets are written out here with torchvision's layer shapes (torchvision does not import on the
CPU torch of this project): ResNet-50 (bottlenecks 3-4-6-3) and EfficientNet-B0 (MBConv with
squeeze-excitation, SiLU). Train step, fp32, SGD and AdamW. Prints the gradient, activation and
temporary bytes at the peak of each and their differences.

Run: python benchmarks/estimate/bench_split.py [--batch-size 8] [--image-size 128]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memwise  # noqa: E402
from common import print_table, write_rows  # noqa: E402


class _Bottleneck(nn.Module):
    def __init__(self, in_ch: int, mid: int, stride: int) -> None:
        super().__init__()
        out_ch = mid * 4
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
        )
        self.down = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
                     if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        in_ch = 64
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(blocks):
                layers.append(_Bottleneck(in_ch, mid, stride if index == 0 else 1))
                in_ch = mid * 4
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return nn.functional.cross_entropy(self.fc(pooled), y)


class _MBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        squeeze = max(1, in_ch // 4)
        self.expand = (nn.Sequential(nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
                       if expand != 1 else nn.Identity())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, squeeze, 1), nn.SiLU(), nn.Conv2d(squeeze, mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.depthwise(self.expand(x))
        out = self.project(hidden * self.se(hidden))
        return out + x if self.residual else out


class EfficientNetB0(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()]
        in_ch = 32
        for expand, kernel, stride, out_ch, blocks in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                                                       (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)):
            for index in range(blocks):
                layers.append(_MBConv(in_ch, out_ch, expand, kernel, stride if index == 0 else 1))
                in_ch = out_ch
        layers += [nn.Conv2d(in_ch, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return nn.functional.cross_entropy(self.fc(pooled), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", choices=("ResNet50", "EfficientNetB0"), action="append", help="default: both")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), action="append", help="default: both")
    options = parser.parse_args()
    size = options.image_size
    rows, table = [], []
    for net in (ResNet50, EfficientNetB0):
        if options.model and net.__name__ not in options.model:
            continue
        for optimizer in options.optimizer or ("sgd", "adamw"):
            torch.manual_seed(0)
            workload = memwise.Workload(net(), lambda b: (torch.randn(b, 3, size, size), torch.randint(0, 1000, (b,))), name=net.__name__)
            recipe = memwise.Recipe(batch_size=options.batch_size, optimizer=optimizer)
            started = time.perf_counter()
            measured = memwise.profile(workload, recipe, steps=2)
            estimated = memwise.estimate(workload, recipe, "cpu")
            row = {"model": net.__name__, "optimizer": optimizer, "measured_peak_bytes": measured.peak_bytes,
                   "estimated_peak_bytes": estimated.peak_bytes, "measured_phase": measured.phase_at_peak,
                   "estimated_phase": estimated.phase_at_peak, "wall_s": round(time.perf_counter() - started, 1)}
            for category in ("grad", "activation", "temporary"):
                row[f"measured_{category}_bytes"] = measured.by_category[category]
                row[f"estimated_{category}_bytes"] = estimated.by_category[category]
            rows.append(row)
            table.append([net.__name__, optimizer, measured.peak_bytes, f"{estimated.peak_bytes / measured.peak_bytes - 1:+.2%}",
                          f"{measured.phase_at_peak}/{estimated.phase_at_peak}"]
                         + [f"{measured.by_category[c]} / {estimated.by_category[c] - measured.by_category[c]:+d}"
                            for c in ("grad", "activation", "temporary")])
    print_table(f"split at the peak, batch {options.batch_size}, {size}x{size}, fp32 train (measured / estimate - measured)",
                ["model", "optimizer", "measured peak B", "estimate", "phase (m/e)", "grad B", "activation B", "temporary B"], table)
    write_rows("estimate_split", rows, {"batch_size": options.batch_size, "image_size": size})


if __name__ == "__main__":
    main()
