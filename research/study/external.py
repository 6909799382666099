"""The study's ``external`` table: leave one source out, test on it, with bootstrap intervals.

COVID-19 CXR classifiers are known to learn where an image came from instead of the disease
(DeGrave et al., Nature Machine Intelligence 2021). In the study's pool most sources hold a
single class, so a held-out AUROC drawn from the training sources may not transfer. A cell of
this table trains the federation on the pool *without* one source (or one slice of a source:
some of its classes) and scores the teacher and the delivered students on it:

- the **external** test set: the study's held-out test images of the left-out slice, paired
  with the held-out test images of every *other* class (from the other sources), so that an
  AUROC is defined even for a one-class source: for the BIMCV COVID-19 images it is "BIMCV COVID
  vs the other sources' normal and pneumonia images". Nothing of it was in any training pool.
- the **in-distribution** reference: the same cell's held-out test images of the training
  sources (everything held out except the slice).

Every AUROC comes with a stratified bootstrap percentile interval from
:func:`common.evaluation.evaluate_scores`, the routine of ``cxr-fl-client evaluate``
(:mod:`common.bootstrap`), seeded. The composition of each test set (images per class and per
source) is recorded beside the numbers.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError
from common.run_settings import coerce
from common.tasks import get_task

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ("path", "label", "site", "patient_id", "view")
EXTERNAL_KEYS = {"holdouts", "variants", "bootstrap", "bootstrap-seed", "seeds"}
HOLDOUT_KEYS = {"name", "site", "classes", "about"}
VARIANT_KEYS = {"name", "about", "run"}


@dataclass(frozen=True)
class Holdout:
    """A slice left out of training: every image of ``site`` (of ``classes`` only, when given)."""

    name: str
    site: str
    classes: tuple[str, ...] = ()
    about: str = ""

    def contains(self, row: Mapping[str, str]) -> bool:
        return row["site"] == self.site and (not self.classes or row["label"] in self.classes)


@dataclass(frozen=True)
class ExternalVariant:
    """The external table run again with some run settings changed (e.g. histogram equalisation)."""

    name: str
    about: str
    run: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ExternalSettings:
    """The ``[external]`` table of the study's TOML file."""

    holdouts: tuple[Holdout, ...] = ()
    variants: tuple[ExternalVariant, ...] = ()
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    seeds: tuple[int, ...] | None = None  # None: the study's first seed


def check_name(value: Any, where: str) -> str:
    """A study table's ``name``: lower-case letters, digits and '-' (it becomes part of cell names)."""
    name = str(value or "")
    if not name or not all(c.isalnum() or c == "-" for c in name) or name != name.lower():
        raise ConfigError(where, name, "lower-case letters, digits and '-'")
    return name


def parse_seeds(value: Any, where: str, example: str = "[0, 1, 2]") -> tuple[int, ...] | None:
    """A study table's ``seeds``: None when absent, else a non-empty list of integers."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise ConfigError(where, value, f"a list of integer seeds, e.g. {example}")
    return tuple(value)


def check_keys(table: Mapping[str, Any], allowed: set[str], where: str, path: Path) -> None:
    """ConfigError naming the first key of a study TOML table that is not ``allowed``."""
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"key '{where}{key}' in {path}", table[key], "one of " + ", ".join(sorted(allowed))
            )


def parse_external(
    raw: Any,
    task_name: str,
    run: Mapping[str, Any],
    path: Path,
    check_run: Callable[[dict[str, Any]], object],
) -> ExternalSettings:
    """The ``[external]`` table, checked (names, sites, classes, variants' run settings)."""
    if not raw:
        return ExternalSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"'external' in {path}", raw, "an [external] table")
    check_keys(raw, EXTERNAL_KEYS, "external.", path)
    classes = get_task(task_name).classes
    holdouts: list[Holdout] = []
    for i, table in enumerate(raw.get("holdouts", [])):
        where = f"external.holdouts[{i}]."
        check_keys(table, HOLDOUT_KEYS, where, path)
        name = check_name(table.get("name"), f"{where}name in {path}")
        if name in {h.name for h in holdouts}:
            raise ConfigError(f"{where}name in {path}", name, "a name no other holdout has")
        site = str(table.get("site", ""))
        if not site:
            raise ConfigError(f"{where}site in {path}", "", "the source's value of the pool's site column")
        chosen = table.get("classes", [])
        if not isinstance(chosen, list) or not all(c in classes for c in chosen):
            raise ConfigError(f"{where}classes in {path}", chosen, "a list of some of " + ", ".join(classes))
        holdouts.append(Holdout(name, site, tuple(chosen), str(table.get("about", ""))))
    variants: list[ExternalVariant] = []
    for i, table in enumerate(raw.get("variants", [])):
        where = f"external.variants[{i}]."
        check_keys(table, VARIANT_KEYS, where, path)
        name = check_name(table.get("name"), f"{where}name in {path}")
        if name in {v.name for v in variants}:
            raise ConfigError(f"{where}name in {path}", name, "a name no other variant has")
        changed = dict(table.get("run", {}))
        if not changed:
            raise ConfigError(f"{where}run in {path}", "{}", "the run settings the variant changes")
        check_run({**run, **changed})
        variants.append(ExternalVariant(name, str(table.get("about", "")), tuple(sorted(changed.items()))))
    seeds = parse_seeds(raw.get("seeds"), f"external.seeds in {path}", "[0]")
    bootstrap = coerce(f"key 'external.bootstrap' in {path}", raw.get("bootstrap", 1000), int)
    if bootstrap < 1:
        raise ConfigError(f"key 'external.bootstrap' in {path}", bootstrap, "an integer >= 1 (resamples)")
    return ExternalSettings(
        holdouts=tuple(holdouts),
        variants=tuple(variants),
        bootstrap=bootstrap,
        bootstrap_seed=coerce(f"key 'external.bootstrap-seed' in {path}", raw.get("bootstrap-seed", 0), int),
        seeds=seeds,
    )


# ----------------------------------------------------------------------------- the data of a cell


@dataclass(frozen=True)
class ExternalData:
    """The manifests of one external cell and what each holds."""

    pool: Path
    external: Path
    in_distribution: Path
    composition: dict[str, Any]


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _write_rows(path: Path, rows: Sequence[Mapping[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def composition(rows: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Images in all, per class, and per source and class (the site column)."""
    by_source: dict[str, dict[str, int]] = {}
    for (site, label), n in sorted(Counter((r["site"], r["label"]) for r in rows).items()):
        by_source.setdefault(site, {})[label] = n
    return {
        "images": len(rows),
        "by_class": dict(sorted(Counter(r["label"] for r in rows).items())),
        "by_source": by_source,
    }


def split_external(
    holdout: Holdout, pool: Path, test: Path, folder: Path, classes: Sequence[str]
) -> ExternalData:
    """Write the cell's training pool (without the slice) and its two test sets into ``folder``.

    Raises DataError (one line) when the slice is absent from the held-out test set, when leaving
    it out would leave a class with no training image, or when the external test set would hold
    one class only (no AUROC).
    """
    pool_rows = read_rows(pool)
    test_rows = read_rows(test)
    train = [r for r in pool_rows if not holdout.contains(r)]
    left_out = [r for r in pool_rows if holdout.contains(r)]
    if not left_out:
        sites = sorted({r["site"] for r in pool_rows})
        raise DataError(
            f"external holdout '{holdout.name}': no image of the pool has site '{holdout.site}'"
            + (f" and class {', '.join(holdout.classes)}" if holdout.classes else "")
            + f"; the pool's sites are {', '.join(sites)}"
            " (fix [[external.holdouts]] in the study's TOML file)"
        )
    missing = [c for c in classes if not any(r["label"] == c for r in train)]
    if missing:
        raise DataError(
            f"external holdout '{holdout.name}': without it the pool has no '{missing[0]}' image to train "
            "on; hold out a slice of that source instead (classes = [...] in [[external.holdouts]])"
        )
    sliced = [r for r in test_rows if holdout.contains(r)]
    held_classes = {r["label"] for r in sliced}
    paired = [r for r in test_rows if not holdout.contains(r) and r["label"] not in held_classes]
    external = sliced + paired
    if not sliced or len({r["label"] for r in external}) < 2:
        raise DataError(
            f"external holdout '{holdout.name}': the held-out test set has "
            f"{len(sliced)} image(s) of the slice and no image of another class to pair them with; "
            "raise data.cxr.test-images or choose another source"
        )
    in_distribution = [r for r in test_rows if not holdout.contains(r)]
    _write_rows(folder / "pool.csv", train)
    _write_rows(folder / "external.csv", external)
    _write_rows(folder / "in_distribution.csv", in_distribution)
    return ExternalData(
        folder / "pool.csv",
        folder / "external.csv",
        folder / "in_distribution.csv",
        {
            "holdout": {
                "name": holdout.name,
                "site": holdout.site,
                "classes": list(holdout.classes) or sorted(held_classes),
            },
            "slice_classes": sorted(held_classes),
            "pool": composition(train),
            "left_out_of_pool": composition(left_out),
            "external": composition(external),
            "external_slice": composition(sliced),
            "external_paired": composition(paired),
            "in_distribution": composition(in_distribution),
        },
    )


# ----------------------------------------------------------------------------- scoring


def interval_scores(
    model: Any, dataset: Any, task: Any, *, slice_classes: Sequence[str], n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """Macro-AUROC and the slice's class AUROC (one-vs-rest), each with its 95% bootstrap interval.

    The figures come from :func:`common.evaluation.evaluate_scores`, the routine of
    ``cxr-fl-client evaluate``, on the model's probabilities.
    """
    from torch.utils.data import DataLoader

    from common.evaluation import EvaluationSettings, evaluate_scores
    from common.local import EVAL_BATCH_SIZE
    from common.training import evaluate

    scored = evaluate(model, DataLoader(dataset, batch_size=EVAL_BATCH_SIZE), task)
    result = evaluate_scores(
        task, scored.targets, scored.scores, EvaluationSettings(n_bootstrap=n_bootstrap, seed=seed)
    )
    per_class = {c.name: c.auroc.to_dict() for c in result.classes}
    return {
        "n": result.n_images,
        "auroc_macro": result.auroc_macro.to_dict(),
        "auroc": per_class,
        "slice_auroc": {name: per_class[name] for name in slice_classes},
        "balanced_accuracy": result.balanced_accuracy.to_dict(),
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "level": 0.95, "method": "percentile"},
    }


def score_external_cell(
    cell: Any, experiment_dir: Path, data: ExternalData, external: ExternalSettings
) -> dict[str, Any]:
    """Teacher and delivered students of an external cell on its external and in-distribution sets."""
    import json
    from dataclasses import asdict

    from common.checkpoint import load_model_state, sha256_file
    from common.local import build_loaded_model, load_eval_dataset, site_data_request, student_config
    from common.run_settings import run_settings_from_config

    run_dir = experiment_dir / "run"
    settings = run_settings_from_config(json.loads((run_dir / "run_config.json").read_text(encoding="utf-8")))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    partition = json.loads((experiment_dir / "partition" / "partition.json").read_text(encoding="utf-8"))
    task = settings.task
    sets = {
        name: load_eval_dataset(
            site_data_request(settings.run, task, "manifest", path, Path(settings.run.cache_dir), whole=True)
        )
        for name, path in (("external", data.external), ("in_distribution", data.in_distribution))
    }
    slice_classes = data.composition["slice_classes"]

    def score(config: Any, state: Any) -> dict[str, Any]:
        model = build_loaded_model(config, task, state)
        return {
            name: interval_scores(
                model,
                dataset,
                task,
                slice_classes=slice_classes,
                n_bootstrap=external.bootstrap,
                seed=external.bootstrap_seed,
            )
            for name, dataset in sets.items()
        }

    teacher = settings.teacher
    record: dict[str, Any] = {
        "cell": {**asdict(cell), "overrides": dict(cell.overrides), "name": cell.name},
        "partition": {
            "sizes": partition["sizes"],
            "label_counts": partition["label_counts"],
            "label_skew_tv": partition["label_skew_tv"],
            "natural_ids": partition.get("natural_ids"),
        },
        "composition": data.composition,
        "best_round": summary["best_round"],
        "teachers": {"federated": score(teacher, load_model_state(run_dir / "checkpoints" / "best.pt"))},
        "delivered": {},
    }
    student = student_config(settings.distill, teacher, teacher.norm)
    scored: dict[str, dict[str, Any]] = {}  # sites delivering the same folder's weights score once
    for site in sorted(partition["sizes"]):
        folder = run_dir / "sites" / site
        delivered = json.loads((folder / "delivered.json").read_text(encoding="utf-8"))
        weights = folder / delivered["folder"] / "student.pt"
        digest = sha256_file(weights)
        if digest not in scored:
            scored[digest] = score(student, load_model_state(weights))
        record["delivered"][site] = {
            "folder": delivered["folder"],
            "delivered": delivered["delivered"],
            "sha256": digest,
            **scored[digest],
        }
    return record


# ----------------------------------------------------------------------------- the report


def _ci(scores: Mapping[str, Any] | None) -> str:
    """``0.912 (0.880-0.941)`` from an interval's dict (the format of ``cxr-fl-client evaluate``)."""
    from common.bootstrap import Interval
    from common.evaluation import format_interval

    if scores is None:
        return "–"
    return format_interval(
        Interval(
            float(scores["value"]), float(scores["low"]), float(scores["high"]), int(scores["resamples"])
        )
    )


def _mix(counts: Mapping[str, Any]) -> str:
    """``site: class n, class n; site: ...`` of a composition's ``by_source``."""
    parts = []
    for site, labels in counts["by_source"].items():
        short = site.removeprefix("https://").removeprefix("http://").removeprefix("www.").rstrip("/")
        parts.append(f"{short}: " + ", ".join(f"{label} {n}" for label, n in labels.items()))
    return "; ".join(parts) or "–"


def _model_rows(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The teacher, then each distinct delivered student (the sites that deliver it named)."""
    rows: list[tuple[str, Mapping[str, Any]]] = [("FedAvg teacher", result["teachers"]["federated"])]
    by_weights: dict[str, list[str]] = {}
    for site, scores in result.get("delivered", {}).items():
        by_weights.setdefault(scores["sha256"], []).append(site)
    for sites in by_weights.values():
        first = result["delivered"][sites[0]]
        who = "every site" if len(sites) == len(result["delivered"]) else ", ".join(sites)
        rows.append((f"delivered student ({first['delivered']}; {who})", first))
    return rows


def external_section(
    settings: Any, cells: Mapping[str, Mapping[str, Any]], table_cells: Any, summary: dict[str, Any]
) -> list[str]:
    """The "Leave-one-source-out" section of study.md; fills ``summary['tables']['external']``."""
    external: ExternalSettings = settings.external
    ran = [c for c in table_cells("external", settings) if c.name in cells]
    if not ran:
        return []
    lines = [
        "## Leave-one-source-out (external validity)",
        "",
        "Each cell trains the federation (Dirichlet 0.5 over "
        f"{settings.sites} sites, FedAvg, the study's run settings) on the training pool *without* "
        "one source (or one slice of a source), then scores the FedAvg teacher and the student each "
        "site delivers (its `delivered.json`) on two test sets drawn from the study's held-out test "
        "set (never from the training pool): **external**, the held-out images of the left-out "
        "slice paired with the held-out images of every other class from the other sources (a "
        "one-class source has no AUROC of its own), and **in-distribution**, the held-out images "
        "of the sources the cell trained on. 'slice AUROC' is the left-out class against the rest "
        "(one-vs-rest) on that set. Intervals: 95% stratified bootstrap percentile intervals, "
        f"{external.bootstrap} resamples, seed {external.bootstrap_seed}, computed by the routine "
        "of `cxr-fl-client evaluate` (`common/bootstrap.py`). An interval is the range of AUROCs "
        "the same model would plausibly score on another test set of the same make-up: two "
        "models whose intervals overlap widely are not shown to differ; it says nothing about "
        "sources not in the test set.",
        "",
        "Test sets (images per source and class; a source is its value of the pool's site column, "
        "a URL without its scheme for the COVID-19 Radiography sources):",
        "",
    ]
    composition_rows = []
    seen: set[str] = set()
    for cell in ran:
        if cell.holdout in seen:
            continue
        seen.add(cell.holdout)
        comp = cells[cell.name]["composition"]
        composition_rows.append(
            [
                f"without {cell.holdout}",
                f"{comp['left_out_of_pool']['images']} ({_mix(comp['left_out_of_pool'])})",
                f"{comp['pool']['images']}",
                f"{comp['external_slice']['images']} ({_mix(comp['external_slice'])})",
                f"{comp['external_paired']['images']} ({_mix(comp['external_paired'])})",
                f"{comp['in_distribution']['images']} ({_mix(comp['in_distribution'])})",
            ]
        )
    lines += _table(
        [
            "cell",
            "left out of the pool",
            "pool trained on",
            "external: the slice",
            "external: paired other classes",
            "in-distribution",
        ],
        composition_rows,
    )
    rows = []
    records = []
    for cell in ran:
        result = cells[cell.name]
        slice_classes = result["composition"]["slice_classes"]
        label = (
            f"without {cell.holdout}"
            + (f", **{cell.variant}**" if cell.variant else "")
            + f" (seed {cell.seed})"
        )
        models = {}
        for model, scores in _model_rows(result):
            ext, ind = scores["external"], scores["in_distribution"]
            rows.append(
                [
                    label,
                    model,
                    _ci(ext["auroc_macro"]),
                    "; ".join(f"{c} {_ci(ext['slice_auroc'].get(c))}" for c in slice_classes),
                    _ci(ind["auroc_macro"]),
                    "; ".join(f"{c} {_ci(ind['slice_auroc'].get(c))}" for c in slice_classes),
                ]
            )
            models[model] = {
                "external": {"auroc_macro": ext["auroc_macro"], "slice_auroc": ext["slice_auroc"]},
                "in_distribution": {"auroc_macro": ind["auroc_macro"], "slice_auroc": ind["slice_auroc"]},
            }
        records.append(
            {
                "cell": cell.name,
                "holdout": cell.holdout,
                "variant": cell.variant,
                "run": dict(cell.overrides),
                "seed": cell.seed,
                "slice_classes": slice_classes,
                "composition": result["composition"],
                "models": models,
            }
        )
    summary["tables"]["external"] = records
    lines += _table(
        [
            "cell",
            "model",
            "external macro-AUROC (95% CI)",
            "external slice AUROC",
            "in-distribution macro-AUROC",
            "in-distribution slice AUROC",
        ],
        rows,
    )
    lines += [
        "How to read it: the in-distribution columns are what a held-out test set drawn from the "
        "training sources reports; the external columns are closer to what a hospital whose images "
        "come from a source the federation never saw would get. An external slice AUROC far below "
        "the in-distribution one (or near 0.5) means the model recognised the class by its sources "
        "rather than by the disease, and its in-distribution figure should not be promised to a new "
        "hospital.",
        "",
    ]
    if external.variants:
        lines += ["Variants (the same cells with these run settings):", ""]
        lines += [
            f"- **{v.name}**: {v.about} (" + ", ".join(f"{k} = {val}" for k, val in v.run) + ")"
            for v in external.variants
        ]
        lines.append("")
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    spec = "|".join("---" if i < 2 else "---:" for i in range(len(header)))
    return [
        "| " + " | ".join(header) + " |",
        "|" + spec + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
