"""Data pipeline throughput on the Kermany set: cold decoding, cached epochs, vs ResNet18 training.

Measures, at 64 and 224 px:
- cold decoding: ``build_cache`` into an empty cache folder (decode + resize + write), images/s;
- cached epochs: iterating a DataLoader over ``CxrDataset`` (augmentation on, batch 64), images/s;
- the cache's size on disk;
and, at 64 px, ResNet18 training throughput (forward + backward + SGD step, batch 64) for
comparison: the loader should deliver at least 5x what the model consumes.

Usage: ``.venv/bin/python benchmarks/data.py [--data ../shared/data/kermany-pneumonia]
[--repeats 3] [--workers 2] [--cache-dir /tmp/cxr-fl-bench-cache]``. The cache lives under /tmp
(never inside the repository) and is removed at the end. Prints medians over repeats.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common.data.cache import build_cache
from common.data.dataset import CxrDataset
from common.data.sources import load_catalog
from common.tasks import get_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-pneumonia"


def _resnet18() -> torch.nn.Module:
    try:
        from common.config import ModelConfig
        from common.models import build_model

        return build_model(ModelConfig(name="resnet18"), 2)
    except Exception:  # the model zoo may not be ready; fall back to torchvision's network
        import torchvision

        model = torchvision.models.resnet18(num_classes=2)
        model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        return model


def cold_decode(catalog, size: int, cache_root: Path, workers: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    folder = cache_root / f"cold-{size}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    cached = build_cache(catalog, size, folder, workers=workers)
    elapsed = time.perf_counter() - start
    return len(catalog) / elapsed, cached.nbytes_on_disk


def cached_epoch(cached, batch: int, loader_workers: int, max_images: int) -> float:  # type: ignore[no-untyped-def]
    ds = CxrDataset(cached, range(min(len(cached), max_images)), augment=True, seed=0)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=loader_workers)
    start = time.perf_counter()
    seen = sum(x.shape[0] for x, _ in loader)
    return seen / (time.perf_counter() - start)


def model_throughput(size: int, batch: int, steps: int) -> float:
    model = _resnet18()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 2, (batch,))
    for _ in range(2):  # warm-up
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads for the cold build")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--epoch-images", type=int, default=5216, help="images per timed cached epoch")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/cxr-fl-bench-cache"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    catalog = load_catalog("image-folder", args.data, get_task("normal-pneumonia"))
    print(
        f"data: {args.data} ({len(catalog)} images), repeats={args.repeats}, "
        f"decode threads={args.workers}, loader workers={args.loader_workers}, batch 64, "
        "augmentation on, torch threads=2"
    )
    rows = []
    try:
        for size in (64, 224):
            cold = [cold_decode(catalog, size, args.cache_dir, args.workers) for _ in range(args.repeats)]
            cached = build_cache(catalog, size, args.cache_dir / f"cold-{size}")
            epochs = [
                cached_epoch(cached, 64, args.loader_workers, args.epoch_images) for _ in range(args.repeats)
            ]
            rows.append((size, statistics.median(c[0] for c in cold), statistics.median(epochs), cold[0][1]))
        model64 = statistics.median(model_throughput(64, 64, 3) for _ in range(args.repeats))
    finally:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    print()
    print(f"{'size':>5} | {'cold decode img/s':>17} | {'cached epoch img/s':>18} | {'cache on disk':>13}")
    print("-" * 64)
    for size, cold_rate, epoch_rate, nbytes in rows:
        print(f"{size:>5} | {cold_rate:>17.0f} | {epoch_rate:>18.0f} | {nbytes / 1e6:>10.1f} MB")
    print()
    print(f"ResNet18 training at 64 px (batch 64): {model64:.0f} img/s")
    ratio = rows[0][2] / model64
    print(
        f"cached loader / model at 64 px: {ratio:.1f}x (target >= 5x): "
        f"{'OK' if ratio >= 5 else 'BELOW TARGET'}"
    )


if __name__ == "__main__":
    main()
