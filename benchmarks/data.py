"""Data pipeline throughput on the Kermany set: cold decoding, cached epochs, vs ResNet18 training.

Measures, at 64 and 224 px:
- cold decoding: ``build_cache`` into an empty cache folder (decode + resize + write), images/s;
- cached epochs: iterating a DataLoader over ``CxrDataset`` (augmentation on, batch 64), images/s;
- the cache's size on disk;
and, at 64 px, ResNet18 training throughput (forward + backward + SGD step, batch 64) for
comparison: the loader should deliver at least 5x what the model consumes.

Then the cold decoding rate per *file format* (``--format-images N``, 0 to skip): the first N
Kermany images (224 px copies in ../shared/data) are written, under the cache folder, as PNG,
JPEG (quality 95) and DICOM (12 bits stored, MONOCHROME2, window set: uncompressed, RLE and
JPEG 2000 lossless), and each set is
decoded cold into a 64 px cache through its source (``image-folder`` or ``dicom``). The real CR
chest image of ``pydicom-data`` (1955 x 1841, 15 bits, MONOCHROME1) is timed too, uncompressed and
as its JPEG 2000 copies: full-resolution images per second through the DICOM pixel pipeline.
``--only-formats`` skips the first part.

Usage: ``.venv/bin/python benchmarks/data.py [--data ../shared/data/kermany-pneumonia]
[--repeats 3] [--workers 2] [--cache-dir /tmp/cxr-fl-bench-cache] [--format-images 200]
[--only-formats]``. The cache lives under /tmp
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


def _write_format_sets(catalog, n: int, root: Path) -> dict[str, tuple[str, Path]]:  # type: ignore[no-untyped-def]
    """The first ``n`` images as PNG, JPEG and DICOM sets: {label: (format, folder)}."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        generate_uid,
    )

    sets = {
        "PNG": ("image-folder", root / "png"),
        "JPEG q95": ("image-folder", root / "jpeg"),
        "DICOM uncompressed": ("dicom", root / "dcm"),
        "DICOM RLE": ("dicom", root / "dcm-rle"),
        "DICOM JPEG 2000 lossless": ("dicom", root / "dcm-j2k"),
    }
    labels = ["path,label"]
    for i in range(min(n, len(catalog))):
        grey = catalog.read(i)
        cls = catalog.task.classes[int(catalog.targets[i].argmax())]
        (root / "png" / cls).mkdir(parents=True, exist_ok=True)
        (root / "jpeg" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey).save(root / "png" / cls / f"{i:05d}.png")
        Image.fromarray(grey).save(root / "jpeg" / cls / f"{i:05d}.jpeg", quality=95)
        stored = grey.astype(np.uint16) * 16  # 12 bits stored, as a CR/DX detector writes
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.Rows, ds.Columns = grey.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = stored.tobytes()
        for folder, syntax in (("dcm", None), ("dcm-rle", RLELossless), ("dcm-j2k", JPEG2000Lossless)):
            copy = ds.copy()
            copy.file_meta = ds.file_meta.copy()
            if syntax is not None:
                copy.compress(syntax, stored)
            (root / folder).mkdir(parents=True, exist_ok=True)
            copy.save_as(root / folder / f"{i:05d}.dcm", enforce_file_format=True)
        labels.append(f"{i:05d}.dcm,{cls}")
    for folder in ("dcm", "dcm-rle", "dcm-j2k"):
        (root / folder / "labels.csv").write_text("\n".join(labels) + "\n")
    return sets


def format_rates(
    catalog, n: int, cache_root: Path, workers: int, repeats: int
) -> list[tuple[str, float, int]]:  # type: ignore[no-untyped-def]
    """Cold decode rate (img/s, 64 px cache) and bytes on disk of each file format's set."""
    root = cache_root / "formats"
    sets = _write_format_sets(catalog, n, root)
    task = get_task("normal-pneumonia")
    rows = []
    for label, (fmt, folder) in sets.items():
        fmt_catalog = load_catalog(fmt, folder, task)
        rates = [
            cold_decode(fmt_catalog, 64, cache_root / "formats-cache", workers)[0] for _ in range(repeats)
        ]
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".png", ".jpeg", ".dcm"))
        rows.append((label, statistics.median(rates), size))
    return rows


def real_dicom_rates(repeats: int) -> list[tuple[str, float]]:
    """Full-size decodes per second of pydicom-data's CR chest image and its JPEG 2000 copies."""
    from pydicom.data import get_testdata_file

    from common.data.dicom import decode_dicom_file

    rows = []
    import pydicom

    for name in ("RG1_UNCI.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm"):
        path = Path(get_testdata_file(name, download=False))
        label = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        decode_dicom_file(path)  # warm-up (imports, plugin discovery)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode_dicom_file(path)
            times.append(time.perf_counter() - start)
        rows.append((f"{name} (CR chest 1955x1841, 15 bit, {label})", 1.0 / statistics.median(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads for the cold build")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--epoch-images", type=int, default=5216, help="images per timed cached epoch")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/cxr-fl-bench-cache"))
    parser.add_argument("--format-images", type=int, default=200, help="images per file-format set")
    parser.add_argument("--only-formats", action="store_true", help="only the file-format comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    catalog = load_catalog("image-folder", args.data, get_task("normal-pneumonia"))
    print(
        f"data: {args.data} ({len(catalog)} images), repeats={args.repeats}, "
        f"decode threads={args.workers}, loader workers={args.loader_workers}, batch 64, "
        "augmentation on, torch threads=2"
    )
    rows = []
    format_rows: list[tuple[str, float, int]] = []
    real_rows: list[tuple[str, float]] = []
    model64 = 0.0
    try:
        if args.format_images > 0:
            format_rows = format_rates(
                catalog, args.format_images, args.cache_dir, args.workers, args.repeats
            )
            real_rows = real_dicom_rates(args.repeats)
        for size in () if args.only_formats else (64, 224):
            cold = [cold_decode(catalog, size, args.cache_dir, args.workers) for _ in range(args.repeats)]
            cached = build_cache(catalog, size, args.cache_dir / f"cold-{size}")
            epochs = [
                cached_epoch(cached, 64, args.loader_workers, args.epoch_images) for _ in range(args.repeats)
            ]
            rows.append((size, statistics.median(c[0] for c in cold), statistics.median(epochs), cold[0][1]))
        if not args.only_formats:
            model64 = statistics.median(model_throughput(64, 64, 3) for _ in range(args.repeats))
    finally:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    if format_rows:
        print()
        print(f"cold decode into a 64 px cache, {args.format_images} Kermany images per format:")
        print(f"{'format':>26} | {'img/s':>7} | {'files on disk':>13}")
        for label, rate, nbytes in format_rows:
            print(f"{label:>26} | {rate:>7.0f} | {nbytes / 1e6:>10.1f} MB")
        for label, rate in real_rows:
            print(f"{label}: {rate:.2f} img/s (full-size DICOM pixel pipeline)")
    if args.only_formats:
        return
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
