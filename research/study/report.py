"""The study's report: ``study.md`` (tables, mean and spread over seeds, targets) and its plots.

Reads the finished cells (``OUT/cells/*/result.json``), the held-out set descriptions
(``OUT/data/*/holdout.json``) and the table timings (``OUT/tables/*.json``); writes
``study.md``, ``study.json`` and ``study_*.png`` into the results folder. Rows whose cells have
not run yet are left out and listed as missing, so the report can be built after any table.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from common.checkpoint import metadata_path
from common.errors import DataError
from common.jsonio import write_json
from common.run_settings import load_schema
from research.study.cells import SPLITS, TABLES, Cell, StudySettings, table_cells
from research.study.markdown import Stat
from research.study.markdown import markdown_table as _table
from research.study.markdown import stat as _stat
from research.study.privacy import PUBLIC_SCORES_FILE, public_weights
from research.study.recipe import add_recipe_targets, recipe_section

METRIC = "auroc_macro"
NOTES_FILE = "study_notes.md"


def load_cells(out: Path) -> dict[str, dict[str, Any]]:
    cells = {}
    for path in sorted((out / "cells").glob("*/result.json")):
        cells[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    return cells


def restore_cells(out: Path, results: Path) -> int:
    """Write each cell of the committed ``results/study.json`` that ``out`` lacks as
    ``out/cells/NAME/result.json``, so that a fresh clone resumes the study (finished cells are
    skipped, and checked against the current settings like any other) instead of running every
    cell again, and its report keeps them. Cells already in ``out`` are left as they are.
    Returns how many were written."""
    committed = results / "study.json"
    if not committed.is_file():
        raise DataError(f"{committed}: no study results to restore (run the study's tables instead)")
    cells = json.loads(committed.read_text(encoding="utf-8")).get("cells", {})
    written = 0
    for name, record in sorted(cells.items()):
        if Path(name).name != name or name.startswith("."):
            raise DataError(f"{committed}: cell name {name!r} is not a plain folder name")
        folder = out / "cells" / name
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        write_json(folder / "result.json", record)
        written += 1
    return written


def _teacher(result: dict[str, Any] | None, which: str, metric: str = METRIC) -> float | None:
    if result is None or which not in result["teachers"]:
        return None
    return float(result["teachers"][which][metric])


def _best_local(result: dict[str, Any] | None, metric: str = METRIC) -> float | None:
    if result is None or "local" not in result["teachers"]:
        return None
    return max(float(m[metric]) for m in result["teachers"]["local"].values())


def _mean_local(result: dict[str, Any] | None, metric: str = METRIC) -> float | None:
    if result is None or "local" not in result["teachers"]:
        return None
    return statistics.fmean(float(m[metric]) for m in result["teachers"]["local"].values())


def _students(result: dict[str, Any] | None, kind: str, metric: str = METRIC) -> float | None:
    """The mean over sites of the students' held-out metric (``kind`` is ``kd`` or ``no_kd``)."""
    if result is None or "students" not in result:
        return None
    if any(kind not in s for s in result["students"].values()):  # e.g. no no-KD baseline in the cell
        return None
    return statistics.fmean(float(s[kind][metric]) for s in result["students"].values())


def _metric(scores: dict[str, Any] | None, metric: str = METRIC) -> float | None:
    return None if scores is None else float(scores[metric])


def _delivered(result: dict[str, Any] | None, metric: str = METRIC) -> float | None:
    """The mean over sites of the student each site deploys by default (its delivered.json).

    Records from before per-site delivery (one federated student, the same at every site) give
    that student's score.
    """
    if result is None:
        return None
    if "delivered" in result:  # a site without a delivered student counts 0 (study_sites.py)
        return statistics.fmean(
            0.0 if s.get("failed") else float(s[metric]) for s in result["delivered"].values()
        )
    if "federated_student" in result:
        return float(result["federated_student"][metric])
    return None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


class StudyReport:
    """Builds the markdown, JSON and plots from the finished cells."""

    def __init__(self, settings: StudySettings) -> None:
        self.settings = settings
        self.cells = load_cells(settings.out)
        self.seeds = settings.seeds
        self.summary: dict[str, Any] = {"targets": {}, "tables": {}}

    def cell(self, table: str, predicate: Any) -> list[dict[str, Any]]:
        names = [c.name for c in table_cells(table, self.settings) if predicate(c)]
        return [self.cells[n] for n in names if n in self.cells]

    def by_name(self, name: str) -> dict[str, Any] | None:
        return self.cells.get(name)

    def _name(self, dataset: str, split: str, strategy: str, seed: int, **cell: Any) -> str:
        """The name of the cell with these fields (derived from the cell, never re-spelled)."""
        return Cell("", dataset, split, strategy, seed, **cell).name

    def _headline(self, seed: int, **cell: Any) -> dict[str, Any] | None:
        """The finished FedAvg cell on the Dirichlet 0.5 split of the CXR data with these fields."""
        return self.by_name(self._name("cxr", "dirichlet-0.5", "fedavg", seed, **cell))

    # ------------------------------------------------------------------ sections

    def setup(self) -> list[str]:
        s = self.settings
        lines = ["## Setup", ""]
        for name in ("cxr", "nih"):
            path = s.out / "data" / name / "holdout.json"
            if not path.is_file():
                continue
            info = json.loads(path.read_text(encoding="utf-8"))
            test = ", ".join(f"{k} {v}" for k, v in info["test"].items() if k != "images")
            pool = ", ".join(f"{k} {v}" for k, v in info["pool"].items() if k != "images")
            lines += [
                f"- **{name}** ({info['task']}; "
                f"{', '.join(Path(p).name for p in info['sources'].values() if p)}): "
                f"{info['images_read']} images read, {info['duplicates_dropped']} exact duplicates dropped; "
                f"held-out test set {info['test']['images']} images ({test}); training pool "
                f"{info['pool']['images']} images ({pool}); {info['unused']} images unused. Both drawn by "
                f"patient, stratified by label, seed {info['holdout_seed']}.",
            ]
        run = {**load_schema(), **s.run}  # what the cells ran: pyproject's default where the study sets none
        lines += [
            f"- Teacher `{run.get('teacher-name')}` at {run.get('image-size')} px, "
            f"{run.get('num-rounds')} rounds x {run.get('local-epochs')} local epoch(s), "
            f"{run.get('optimizer')} lr {run.get('lr')}, batch {run.get('batch-size')}; "
            f"each site keeps {run.get('val-fraction')} of its images for validation "
            f"(picks the best round) and {run.get('test-fraction')} as its own test split (not used here).",
            f"- Pooled and local-only teachers get the same epoch budget "
            f"({int(run['num-rounds']) * int(run['local-epochs'])} epochs) "
            "from the same initial "
            "weights. FedProx uses proximal-mu "
            f"{s.proximal_mu}.",
            f"- Students: `{run.get('kd-student')}` at every site, "
            f"{run.get('kd-epochs')} epochs, {run.get('kd-optimizer')} lr {run.get('kd-lr')}, "
            f"KD temperature {run.get('kd-temperature')}, "
            f"alpha {run.get('kd-alpha')}; the no-KD student has the same network, epochs and optimiser.",
            f"- DP: Opacus DP-SGD at every site, delta {s.dp_delta}, GroupNorm teacher; "
            + ", ".join(f"{k} {v}" for k, v in s.dp_run.items())
            + ". The no-DP reference of the privacy table uses the same GroupNorm teacher.",
            f"- Sites: {s.sites} (IID, Dirichlet), one per source URL (natural), {s.nih_sites} for NIH; "
            f"seeds {list(s.seeds)} (partition and training) for the headline rows, "
            f"seed {s.seeds[0]} elsewhere.",
            "- Every number is a macro-AUROC on the held-out test set unless named otherwise; "
            "`a ± b (n=k)` is the mean and standard deviation over k seeds.",
            "",
        ]
        timings = []
        for path in sorted((s.out / "tables").glob("*.json")):
            info = json.loads(path.read_text(encoding="utf-8"))
            timings.append((info["table"], info["seconds"], info["machine"]))
        if timings:
            machine = timings[0][2]
            lines += [
                f"Machine: {machine['platform']}, {machine['cpus']} CPUs ({machine['processor']}), Python "
                f"{machine['python']}, torch {machine['torch']}, no GPU; run on {machine['date']}.",
                "",
            ]
            lines += _table(
                ["table", "command", "wall time of its commands", "sum of its cells' own times"],
                [
                    [
                        t,
                        f"`python -m research.study {t} --config research/study/study.toml`",
                        f"{sec / 60:.1f} min",
                        self.cells_minutes(t),
                    ]
                    for t, sec, _ in timings
                ],
            )
            lines += [
                "The wall time adds up the invocations of a table recorded in this work folder "
                "(`tables/`, resumed runs included; cells shared with a table run earlier, or "
                "restored from study.json, are skipped). The last column is what the table "
                "costs from scratch: the sum of the recorded run times of all its cells. Timings of "
                "cells that ran while other jobs used the same 2 cores are longer than on a quiet "
                "machine.",
                "",
            ]
        return lines

    def cells_minutes(self, table: str) -> str:
        """The summed run time of a table's cells ("–" while any has not run)."""
        names = [c.name for c in table_cells(table, self.settings)]
        if any(n not in self.cells for n in names):
            return "–"
        seconds = sum(float(self.cells[n]["seconds"]["total"]) for n in names)
        return f"{seconds / 60:.1f} min"

    def headline(self) -> list[str]:
        s = self.settings
        eps = s.dp_headline_epsilon
        rows = []

        def add(
            key: str, what: str, measured: Stat, reference: Stat, derived: Stat, target: str, ok: bool | None
        ) -> None:
            if ok is not None and len(derived.values) < len(s.seeds):  # the targets are over every seed
                verdict = f"{'met' if ok else 'missed'} on {len(derived.values)} of {len(s.seeds)} seeds"
                ok = None
            else:
                verdict = "–" if ok is None else ("met" if ok else "**missed**")
            rows.append([what, measured.text(), reference.text(), derived.text(), target, verdict])
            self.summary["targets"][key] = {
                "measured": measured.values,
                "reference": reference.values,
                "derived": derived.values,
                "derived_mean": derived.mean,
                "target": target,
                "met": ok,
            }

        d05 = [self._headline(seed) for seed in s.seeds]
        d05 = [r for r in d05 if r is not None]
        fed = _stat(_teacher(r, "federated") for r in d05)
        pooled = _stat(_teacher(r, "pooled") for r in d05)
        ratio = _stat(_ratio(_teacher(r, "federated"), _teacher(r, "pooled")) for r in d05)
        add(
            "fedavg_vs_pooled",
            "FedAvg teacher vs pooled, Dirichlet 0.5 (ratio)",
            fed,
            pooled,
            ratio,
            ">= 0.98",
            None if not ratio.values else ratio.mean >= 0.98,
        )
        nat = [self.by_name(self._name("cxr", "natural", "fedavg", seed)) for seed in s.seeds]
        nat = [r for r in nat if r is not None]
        nat_fed = _stat(_teacher(r, "federated") for r in nat)
        nat_local = _stat(_best_local(r) for r in nat)
        nat_gap = _stat(_minus(_teacher(r, "federated"), _best_local(r)) for r in nat)
        add(
            "natural_vs_best_local",
            "FedAvg teacher vs best local-only, natural split (difference)",
            nat_fed,
            nat_local,
            nat_gap,
            "> 0",
            None if not nat_gap.values else nat_gap.mean > 0,
        )
        # the students' rows come from the students table: each seed's run with the KD site
        # students, their no-KD twins and the delivered (federated) student, scored against
        # that run's own FedAvg teacher
        st = [r for seed in s.seeds if (r := self._students_cell(seed)) is not None]
        st_teacher = _stat(_teacher(r, "federated") for r in st)
        kd = _stat(_students(r, "kd") for r in st)
        kd_gap = _stat(_minus(_students(r, "kd"), _teacher(r, "federated")) for r in st)
        add(
            "kd_student_vs_teacher",
            "KD site student (mean of sites, distilled at the site alone) vs its FedAvg teacher, "
            "Dirichlet 0.5 (difference)",
            kd,
            st_teacher,
            kd_gap,
            ">= -0.01",
            None if not kd_gap.values else kd_gap.mean >= -0.01,
        )
        delivered = _stat(_delivered(r) for r in st)
        delivered_gap = _stat(_minus(_delivered(r), _teacher(r, "federated")) for r in st)
        add(
            "delivered_student_vs_teacher",
            "Delivered student (the default: federated KD student, "
            f"{s.federated_student_rounds} rounds; mean of sites) vs its FedAvg teacher, "
            "Dirichlet 0.5 (difference)",
            delivered,
            st_teacher,
            delivered_gap,
            ">= -0.01",
            None if not delivered_gap.values else delivered_gap.mean >= -0.01,
        )
        nokd = _stat(_students(r, "no_kd") for r in st)
        kd_nokd = _stat(
            k - n
            for r in st
            if (k := _students(r, "kd")) is not None and (n := _students(r, "no_kd")) is not None
        )
        add(
            "kd_vs_no_kd",
            "KD site student vs no-KD site student (mean of sites, difference)",
            kd,
            nokd,
            kd_nokd,
            "> 0 in every seed",
            None if not kd_nokd.values else all(v > 0 for v in kd_nokd.values),
        )
        # the headline DP row: the best product setting ([[privacy.variants]] headline-variant),
        # against the same setting without DP
        variant = s.dp_headline_variant
        gn = {seed: self._headline(seed, norm="group", variant=variant) for seed in s.seeds}
        dp = {seed: self._headline(seed, dp_epsilon=eps, norm="group", variant=variant) for seed in s.seeds}
        no_dp = _stat(_teacher(gn[seed], "federated") for seed in s.seeds)
        with_dp = _stat(_teacher(dp[seed], "federated") for seed in s.seeds)
        cost = _stat(
            a - b
            for seed in s.seeds
            if (a := _teacher(gn[seed], "federated")) is not None
            and (b := _teacher(dp[seed], "federated")) is not None
        )
        add(
            "dp_cost",
            f"DP at epsilon {eps:g}"
            + (f" (setting '{variant}')" if variant else "")
            + ": FedAvg teacher vs the same teacher without DP (cost)",
            with_dp,
            no_dp,
            cost,
            "<= 0.05",
            None if not cost.values else cost.mean <= 0.05,
        )
        add_recipe_targets(
            s,
            self.cells,
            lambda key, what, m, r, d, target, ok: add(key, what, _stat(m), _stat(r), _stat(d), target, ok),
        )
        return [
            "## Headline: the targets",
            "",
            *_table(
                ["comparison", "measured", "reference", "difference or ratio", "target", "verdict"], rows
            ),
        ]

    def splits(self) -> list[str]:
        s = self.settings
        seed = s.seeds[0]
        pooled = _teacher(self._headline(seed), "pooled")
        rows = []
        plot_rows = []
        for split in SPLITS:
            fedavg = self.by_name(self._name("cxr", split, "fedavg", seed))
            fedprox = self.by_name(self._name("cxr", split, "fedprox", seed))
            if fedavg is None and fedprox is None:
                continue
            ref = fedavg or fedprox
            assert ref is not None
            sizes = "/".join(str(v) for v in ref["site_train_images"].values())
            fa, fp = _teacher(fedavg, "federated"), _teacher(fedprox, "federated")
            rows.append(
                [
                    split,
                    sizes,
                    _fmt(ref["partition"]["label_skew_tv"], 2),
                    _fmt(pooled),
                    f"{_fmt(_best_local(fedavg))} / {_fmt(_mean_local(fedavg))}",
                    _fmt(fa),
                    _fmt(fp),
                    _fmt(fa / pooled if fa is not None and pooled else None),
                ]
            )
            plot_rows.append((split, pooled, _best_local(fedavg), fa, fp))
        self.summary["tables"]["splits"] = plot_rows
        if plot_rows:
            from research.study.plots import plot_splits

            plot_splits(plot_rows, self.settings.results / "study_splits.png")
        return [
            f"## Teachers by split (seed {seed})",
            "",
            "Train images per site, the partition's label skew (total variation from the pooled label mix, "
            "0 = IID), and held-out macro-AUROC. The pooled teacher is trained once on the union of the "
            "Dirichlet 0.5 sites' training splits.",
            "",
            *_table(
                [
                    "split",
                    "train images per site",
                    "label skew",
                    "pooled",
                    "local-only best / mean",
                    "FedAvg",
                    "FedProx",
                    "FedAvg / pooled",
                ],
                rows,
            ),
            "![teachers by split](study_splits.png)",
            "",
        ]

    def _students_cell(self, seed: int) -> dict[str, Any] | None:
        """The finished students-table cell of a seed (KD, no-KD and delivered students)."""
        result = self._headline(seed, kd=True, federated_student=True)
        return result if result is not None and "students" in result else None

    def students(self) -> list[str]:
        s = self.settings
        per_seed = []
        for seed in s.seeds:
            result = self._students_cell(seed)
            if result is None:
                continue
            kd = [float(v["kd"][METRIC]) for v in result["students"].values()]
            nokd = [float(v["no_kd"][METRIC]) for v in result["students"].values()]
            delivered = [
                0.0 if v.get("failed") else float(v[METRIC]) for v in result.get("delivered", {}).values()
            ]
            teacher = _teacher(result, "federated")
            per_seed.append(
                [
                    str(seed),
                    _fmt(teacher),
                    f"{statistics.fmean(kd):.3f} ({min(kd):.3f}–{max(kd):.3f})",
                    f"{statistics.fmean(nokd):.3f} ({min(nokd):.3f}–{max(nokd):.3f})",
                    _fmt(_metric(result.get("federated_student"))),
                    f"{statistics.fmean(delivered):.3f} ({min(delivered):.3f}–{max(delivered):.3f})"
                    if delivered
                    else "–",
                    _fmt(_minus(_delivered(result), teacher)),
                ]
            )
        if not per_seed:
            return []
        r = {**load_schema(), **s.run}
        lines = [
            "## Students (Dirichlet 0.5, FedAvg teacher)",
            "",
            "One run per seed: the FedAvg teacher; at each site a MobileNetV2 distilled from it on the "
            "site's images alone (KD site student) and the same student trained on the site's labels "
            f"alone (no KD, same recipe); then the federated student ({s.federated_student_rounds} extra "
            "rounds in which every site distils the round's global student from the teacher for "
            f"{r.get('local-epochs')} epoch(s) and the server averages them), which is what each site "
            "delivers by default (its `delivered.json`; a local fine-tune replaces it only where "
            "`kd-personalise-epochs` > 0 and it wins on the site's validation split). Site students: "
            "mean over sites (lowest–highest). Held-out macro-AUROC.",
            "",
            *_table(
                [
                    "seed",
                    "FedAvg teacher",
                    "KD site students",
                    "no-KD site students",
                    "federated student",
                    "delivered students",
                    "delivered − teacher",
                ],
                per_seed,
            ),
        ]
        first = self._students_cell(s.seeds[0])
        if first is not None:
            rows, plot = [], []
            for site, scores in first["students"].items():
                counts = first["partition"]["label_counts"].get(site, {})
                mix = ", ".join(f"{k} {v}" for k, v in counts.items())
                kd_auc, nokd_auc = float(scores["kd"][METRIC]), float(scores["no_kd"][METRIC])
                chosen = first.get("delivered", {}).get(site)
                rows.append(
                    [
                        site,
                        str(first["site_train_images"][site]),
                        mix,
                        _fmt(kd_auc),
                        _fmt(nokd_auc),
                        _fmt(kd_auc - nokd_auc),
                        "–"
                        if chosen is None
                        else "failed"
                        if chosen.get("failed")
                        else f"{float(chosen[METRIC]):.3f} ({chosen['delivered']})",
                    ]
                )
                plot.append((site, kd_auc, nokd_auc))
            from research.study.plots import plot_students

            plot_students(plot, _teacher(first, "federated") or math.nan, s.results / "study_students.png")
            lines += [
                f"Per site, seed {s.seeds[0]}:",
                "",
                *_table(
                    [
                        "site",
                        "train images",
                        "images by label",
                        "KD site student",
                        "no-KD student",
                        "KD - no-KD",
                        "delivered student",
                    ],
                    rows,
                ),
                "![students](study_students.png)",
                "",
            ]
        return lines

    def privacy(self) -> list[str]:
        s = self.settings
        rows = []
        points = []
        ref = _stat(_teacher(self._headline(seed, norm="group"), "federated") for seed in s.seeds)
        if ref.values:
            rows.append(["no DP (GroupNorm)", ref.text(), "–", "–", "–"])
            points.append((math.inf, ref.mean, ref.sd))
        for eps in s.dp_epsilons:
            found = [
                r
                for seed in s.seeds
                if (
                    r := self.by_name(
                        self._name("cxr", "dirichlet-0.5", "fedavg", seed, dp_epsilon=eps, norm="group")
                    )
                )
            ]
            if not found:
                continue
            auroc = _stat(_teacher(r, "federated") for r in found)
            bal = _stat(_teacher(r, "federated", "balanced_accuracy") for r in found)
            spent = _stat(
                max(r["dp_epsilon_spent"].values()) if r["dp_epsilon_spent"] else None for r in found
            )
            rows.append(
                [f"epsilon {eps:g}", auroc.text(), bal.text(), spent.text(2), _fmt(ref.mean - auroc.mean)]
            )
            points.append((eps, auroc.mean, auroc.sd))
        rows += self._privacy_variant_rows(ref)
        if not rows:
            return []
        from research.study.plots import plot_privacy

        plot_privacy(points, self.settings.results / "study_privacy.png")
        return [
            "## Differential privacy (Dirichlet 0.5, FedAvg, DP-SGD at every site)",
            "",
            *_table(
                [
                    "setting",
                    "macro-AUROC",
                    "balanced accuracy",
                    "epsilon spent (max over sites)",
                    "cost vs no DP",
                ],
                rows,
            ),
            "![privacy](study_privacy.png)",
            "",
            *self._privacy_variant_notes(),
        ]

    def _privacy_variant_notes(self) -> list[str]:
        """What each variant is, and where the coordinator's public teacher came from (its sidecar)."""
        s = self.settings
        if not s.privacy_variants:
            return []
        lines = [
            "Each product setting below the plain rows has its own no-DP teacher (same settings, "
            "same seeds); its cost is against that teacher.",
            "",
        ]
        lines += [f"- **{v.name}**: {v.about}" for v in s.privacy_variants]
        sidecar = metadata_path(public_weights(s.out, str(s.run.get("teacher-name", ""))))
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            images = meta["images"]
            checks = "; ".join(
                f"{Path(c['manifest']).name}: {c['overlapping_images']} of its {c['manifest_images']}"
                for c in meta["overlap_checks"]
            )
            val = meta.get("val_metrics", {}).get("val_auroc_macro")
            lines += [
                "",
                f"The public teacher ({meta['teacher']['name']}, {meta['teacher']['norm']} norm, "
                f"{meta['training']['epochs']} epochs, no DP) trained on {images['train']} images and "
                f"validated on {images['val']}"
                + (f" (macro-AUROC {val:.3f})" if val is not None else "")
                + "; none shares a file or a patient with the pool or the held-out test set, and the "
                f"exact-duplicate check found copies under other names ({checks}), "
                f"{images['dropped_overlap']} image(s) dropped. Weights hash "
                f"`{meta['weights_sha256'][:16]}…`.",
            ]
            scores_path = sidecar.parent / PUBLIC_SCORES_FILE
            alone = json.loads(scores_path.read_text(encoding="utf-8")) if scores_path.is_file() else {}
            if alone:
                lines += [
                    "",
                    "Scored alone on the held-out test set, before any federated round, the public "
                    f"teacher reaches macro-AUROC {alone['auroc_macro']:.3f} (balanced accuracy "
                    f"{alone['balanced_accuracy']:.3f}): what the private rounds add is the difference "
                    "between that and the rows above.",
                ]
            self.summary["tables"]["public_pretraining"] = {
                "held_out_scores": alone,
                "images": images,
                "overlap_checks": meta["overlap_checks"],
                "val_metrics": meta.get("val_metrics", {}),
                "weights_sha256": meta["weights_sha256"],
                "training": meta["training"],
            }
        return [*lines, ""]

    def _privacy_variant_rows(self, plain_no_dp: Stat) -> list[list[str]]:
        """Each [[privacy.variants]] setting: its no-DP teacher and its DP teacher at the headline epsilon."""
        s = self.settings
        eps = s.dp_headline_epsilon
        rows = []
        for variant in s.privacy_variants:
            seeds = s.seeds if variant.seeds is None else [x for x in variant.seeds if x in s.seeds]
            pairs = [
                (
                    self._headline(seed, norm="group", variant=variant.name),
                    self._headline(seed, dp_epsilon=eps, norm="group", variant=variant.name),
                )
                for seed in seeds
            ]
            no_dp = _stat(_teacher(a, "federated") for a, _ in pairs)
            found = [b for _, b in pairs if b is not None]
            with_dp = _stat(_teacher(b, "federated") for b in found)
            if not no_dp.values and not with_dp.values:
                continue
            cost = _stat(
                x - y
                for a, b in pairs
                if (x := _teacher(a, "federated")) is not None and (y := _teacher(b, "federated")) is not None
            )
            bal = _stat(_teacher(b, "federated", "balanced_accuracy") for b in found)
            spent = _stat(
                max(b["dp_epsilon_spent"].values()) if b["dp_epsilon_spent"] else None for b in found
            )
            label = f"**{variant.name}** (seeds {', '.join(map(str, seeds))})"
            rows.append([f"{label}: no DP", no_dp.text(), "–", "–", "–"])
            rows.append([f"{label}: epsilon {eps:g}", with_dp.text(), bal.text(), spent.text(2), cost.text()])
            self.summary["tables"].setdefault("privacy_variants", {})[variant.name] = {
                "about": variant.about,
                "pretrained": variant.pretrained,
                "run": dict(variant.run),
                "seeds": list(seeds),
                "no_dp": no_dp.values,
                "dp": with_dp.values,
                "cost": cost.values,
                "dp_vs_plain_no_dp": _minus(with_dp.mean, plain_no_dp.mean) if plain_no_dp.values else None,
            }
        return rows

    def nih(self) -> list[str]:
        s = self.settings
        result = self.by_name(self._name("nih", "iid", "fedavg", s.seeds[0]))
        if result is None:
            return []
        info_path = s.out / "data" / "nih" / "holdout.json"
        test_counts = json.loads(info_path.read_text(encoding="utf-8"))["test"] if info_path.is_file() else {}
        findings = [k.split("/", 1)[1] for k in result["teachers"]["federated"] if k.startswith("auroc/")]
        rows = []
        for finding in findings:
            key = f"auroc/{finding}"
            rows.append(
                [
                    finding,
                    str(test_counts.get(finding, "–")),
                    _fmt(_teacher(result, "pooled", key)),
                    _fmt(_teacher(result, "federated", key)),
                    _fmt(_students(result, "kd", key)),
                    _fmt(_students(result, "no_kd", key)),
                ]
            )
        rows.append(
            [
                "**macro**",
                str(test_counts.get("images", "–")) + " images",
                _fmt(_teacher(result, "pooled")),
                _fmt(_teacher(result, "federated")),
                _fmt(_students(result, "kd")),
                _fmt(_students(result, "no_kd")),
            ]
        )
        return [
            f"## Multi-label check: NIH ChestX-ray14 ({s.nih_sites} IID sites, seed {s.seeds[0]}; "
            "small sample)",
            "",
            "Per-finding held-out AUROC. **A small-sample check, not a benchmark:** 1,000 images in all, so "
            "several findings have only a handful of positives in the test set (second column) and their "
            "AUROC is noisy or undefined (–).",
            "",
            *_table(
                [
                    "finding",
                    "test positives",
                    "pooled teacher",
                    "FedAvg teacher",
                    "KD students (mean)",
                    "no-KD students (mean)",
                ],
                rows,
            ),
        ]

    def attempts(self) -> list[str]:
        """Each attempt beside the cells it varies (same seeds, the study's settings)."""
        rows = []
        recipe = {self.settings.recipe.new, self.settings.recipe.old}
        for attempt in self.settings.attempts:
            if attempt.name in recipe:  # their own section (study_recipe.py)
                continue
            cells = [c for c in table_cells("attempts", self.settings) if c.variant == attempt.name]
            ran = [c for c in cells if c.name in self.cells]
            if not ran:
                continue
            seeds = ", ".join(str(c.seed) for c in ran)
            changed = ", ".join(f"{k} = {v}" for k, v in attempt.run)
            base = [self.cells.get(c.base.name) for c in ran]
            rows.append([f"study settings (seed {seeds})", *self._attempt_columns(base)])
            rows.append(
                [f"**{attempt.name}**: {changed}", *self._attempt_columns([self.cells[c.name] for c in ran])]
            )
            self.summary["tables"].setdefault("attempts", {})[attempt.name] = {
                "about": attempt.about,
                "run": dict(attempt.run),
                "cells": [c.name for c in ran],
                "base": [c.base.name for c in ran],
            }
        if not rows:
            return []
        lines = [
            "## What was tried for the missed targets",
            "",
            "Each attempt runs cells of the study again with some run settings changed, set beside "
            "the cells of the same seeds with the study's settings (mean ± standard deviation over "
            "the seeds named). The attempts are the `[[attempts]]` of `research/study/study.toml` "
            "(table `attempts`).",
            "",
        ]
        for a in self.settings.attempts:
            if a.name not in recipe:
                lines.append(f"- **{a.name}**: {a.about}")
        lines.append("")
        lines += _table(
            [
                "cells",
                "FedAvg teacher",
                "pooled teacher",
                "FedAvg / pooled",
                "KD site students",
                "no-KD site students",
                "delivered students",
                "delivered − teacher",
            ],
            rows,
        )
        return lines

    @staticmethod
    def _attempt_columns(results: list[dict[str, Any] | None]) -> list[str]:
        if any(r is None for r in results):
            return ["not run", *["–"] * 6]
        teacher = [_teacher(r, "federated") for r in results]
        pooled = [_teacher(r, "pooled") for r in results]
        student = [_delivered(r) for r in results]
        return [
            _stat(teacher).text(),
            _stat(pooled).text(),
            _stat(_ratio(t, p) for t, p in zip(teacher, pooled, strict=True)).text(),
            _stat(_students(r, "kd") for r in results).text(),
            _stat(_students(r, "no_kd") for r in results).text(),
            _stat(student).text(),
            _stat(_minus(f, t) for f, t in zip(student, teacher, strict=True)).text(),
        ]

    def external(self) -> list[str]:
        """The leave-one-source-out table (research/study/external.py)."""
        from research.study.external import external_section

        return external_section(self.settings, self.cells, table_cells, self.summary)

    def missing(self) -> list[str]:
        wanted = {c.name for t in TABLES for c in table_cells(t, self.settings)}
        absent = sorted(wanted - set(self.cells))
        if not absent:
            return []
        return ["## Cells not run yet", "", ", ".join(f"`{n}`" for n in absent), ""]

    def build(self) -> Path:
        results = self.settings.results
        results.mkdir(parents=True, exist_ok=True)
        sections = [
            self.headline(),
            self.splits(),
            self.students(),
            self.privacy(),
            self.nih(),
            self.attempts(),
            recipe_section(self.settings, self.cells, self.summary),
            self.external(),
        ]
        notes_path = results / NOTES_FILE
        notes = (
            [*notes_path.read_text(encoding="utf-8").strip().splitlines(), ""] if notes_path.is_file() else []
        )
        lines = [
            "# Real-data study: federation, differential privacy and distillation on public chest X-rays",
            "",
            "Made by `python -m research.study all --config research/study/study.toml` (each table is "
            "also its own command, see Setup); settings in `research/study/study.toml`. "
            "Task: normal / pneumonia / COVID-19 on "
            "Kermany paediatric pneumonia + the COVID-19 Radiography subset in ../shared/data.",
            "",
            *sections[0],
            *notes,
            *self.setup(),
            *[line for section in sections[1:] for line in section],
            *self.missing(),
        ]
        path = results / "study.md"
        path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
        write_json(results / "study.json", {**self.summary, "cells": self.cells})
        return path


def build_study_report(settings: StudySettings) -> Path:
    return StudyReport(settings).build()
