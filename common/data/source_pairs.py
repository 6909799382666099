"""``--source``/``--data`` pairs read and joined into one catalog.

Library code shared by the simulation's command line (``partition``, ``run``), its experiments
and studies, and the coordinator's ``cxr-fl-server pretrain`` (public data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from common.data.cache import build_cache
from common.data.catalog import Catalog
from common.data.duplicates import find_duplicates
from common.data.sources import SOURCES, load_catalog
from common.errors import ConfigError
from common.tasks import get_task

logger = logging.getLogger(__name__)


def parse_source_options(pairs: list[str], formats: list[str]) -> list[dict[str, str]]:
    """Per-source option dicts from ``KEY=VALUE`` (every source) or ``FORMAT.KEY=VALUE`` items."""
    per_source: list[dict[str, str]] = [{} for _ in formats]
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("source-option", item, "KEY=VALUE or FORMAT.KEY=VALUE, e.g. n-images=200")
        fmt, dot, name = key.strip().rpartition(".")
        if dot and fmt not in formats:
            raise ConfigError("source-option", item, "a FORMAT. prefix naming one of " + ", ".join(formats))
        for i, source_fmt in enumerate(formats):
            if not dot or source_fmt == fmt:
                per_source[i][name] = value.strip()
    return per_source


def load_sources(
    formats: list[str],
    paths: list[Path | None],
    task_name: str,
    *,
    option_pairs: list[str] | None = None,
    strict: bool = False,
) -> tuple[Catalog, dict[str, str | None], dict[str, dict[str, str]]]:
    """Load and join the ``--source``/``--data`` pairs into one catalog.

    Returns the catalog, ``{source id: absolute data path or None}`` and
    ``{source id: its options}`` for the record.
    ``paths`` may be empty when every source needs no files (``synthetic``).
    """
    task = get_task(task_name)
    if not formats:
        raise ConfigError("source", "", "at least one --source FORMAT")
    if paths and len(paths) != len(formats):
        raise ConfigError(
            "data",
            [str(p) for p in paths],
            f"one --data PATH per --source ({len(formats)} sources, {len(paths)} paths), in the same order",
        )
    options = parse_source_options(option_pairs or [], formats)
    repeated = {f for f in formats if formats.count(f) > 1}
    seen: dict[str, int] = {}
    catalogs = []
    source_paths: dict[str, str | None] = {}
    source_options: dict[str, dict[str, str]] = {}
    for i, fmt in enumerate(formats):
        path = paths[i] if paths else None
        if path is not None and not SOURCES.get(fmt).needs_path:
            raise ConfigError(
                "data",
                str(path),
                f"no --data for --source {fmt}, which reads no files; for these files name their format "
                "with --source FORMAT ("
                + ", ".join(n for n in SOURCES.names() if SOURCES.get(n).needs_path)
                + ")",
            )
        name = None
        if fmt in repeated:
            seen[fmt] = seen.get(fmt, 0) + 1
            name = str(seen[fmt])
        catalog = load_catalog(fmt, path, task, name=name, options=options[i], strict=strict)
        catalogs.append(catalog)
        source_id = fmt if name is None else f"{fmt}:{name}"
        source_paths[source_id] = str(Path(path).expanduser().resolve()) if path is not None else None
        source_options[source_id] = options[i]
    return Catalog.concat(catalogs), source_paths, source_options


def drop_duplicate_images(
    catalog: Catalog, cache_dir: Path | None, tell: Callable[[str], None] = logger.warning
) -> Catalog:
    """The catalog without exact duplicates (same decoded pixels; the first copy is kept).

    Public CXR sets re-publish each other's images; a copy on both sides of a split would leak
    test images into training. Decoding happens once into the image cache (at 32 px; the pixel
    hashes are of the full-resolution images), and unreadable images are left out as well.
    """
    cached = build_cache(catalog, 32, cache_dir)
    report = find_duplicates(cached, level="exact")
    if report.n_duplicates:
        tell(f"dropping duplicates: {report.summary(cached, limit=3)}")
    return cached.catalog.subset(report.keep_rows())
