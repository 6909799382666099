"""Partitioners over hand-built catalogs: coverage, determinism, skew, patients, errors, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.catalog import Catalog, ImageRecord
from common.errors import ConfigError, DataError, UnknownNameError
from common.tasks import Task, get_task
from simulation.partition import (
    PARTITIONERS,
    Partition,
    PartitionSettings,
    label_counts,
    label_skew,
    partition_catalog,
    write_partition,
)

FIVE = Task("five-classes", "multiclass", ("a", "b", "c", "d", "e"))
NPC = get_task("normal-pneumonia-covid")


class ConstantReader:
    """An in-memory source: every image is an 8x8 square whose grey level encodes its key."""

    def read(self, record: ImageRecord) -> np.ndarray:
        return np.full((8, 8), int(record.key) % 256, dtype=np.uint8)

    def fingerprint(self, record: ImageRecord) -> str:
        return record.key


class FolderReader:
    """A file-based source: ``key`` is a path under ``root`` (like the real readers)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, record: ImageRecord) -> Path:
        return self.root / record.key

    def read(self, record: ImageRecord) -> np.ndarray:
        return np.asarray(Image.open(self.path(record)))

    def fingerprint(self, record: ImageRecord) -> str:
        return record.key


def make_catalog(
    labels: list[int] | np.ndarray,
    task: Task = NPC,
    *,
    patients: list[str | None] | None = None,
    sites: list[str | None] | None = None,
    source: str = "mem",
    reader: object | None = None,
) -> Catalog:
    labels = np.asarray(labels, dtype=np.int64)
    records = [
        ImageRecord(
            source=source,
            key=str(i),
            source_labels=(task.classes[c],),
            patient_id=patients[i] if patients else None,
            site=sites[i] if sites else None,
        )
        for i, c in enumerate(labels.tolist())
    ]
    targets = np.eye(task.num_classes, dtype=np.float32)[labels]
    return Catalog(task, records, targets, {source: reader or ConstantReader()})


def balanced(n_per_class: int, num_classes: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), n_per_class)


def assert_exact_cover(partition: Partition, n: int) -> None:
    joined = np.concatenate(partition.sites)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


ALL_KWARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "pathological": {"classes_per_site": 2},
    "quantity-skew": {"alpha": 1.0},
    "natural": {},
}


def test_registry_lists_the_five_partitioners() -> None:
    assert PARTITIONERS.names() == sorted(ALL_KWARGS)


@pytest.mark.parametrize("name", sorted(ALL_KWARGS))
def test_every_image_in_exactly_one_site(name: str) -> None:
    labels = balanced(40, 3)
    sites = [f"hospital-{i % 4}" for i in range(len(labels))]
    catalog = make_catalog(labels, sites=sites)
    partition = partition_catalog(catalog, name, 4, seed=3, min_site_size=2, **ALL_KWARGS[name])
    assert partition.num_sites == 4
    assert partition.site_names == ("site_00", "site_01", "site_02", "site_03")
    assert_exact_cover(partition, len(labels))
    assert partition.settings.seed == 3
    # the per-site counts add up to the global ones
    np.testing.assert_array_equal(label_counts(partition, catalog).sum(axis=0), [40, 40, 40])


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity-skew"])
def test_same_seed_same_partition_other_seed_differs(name: str) -> None:
    catalog = make_catalog(balanced(50, 3))
    kwargs = {"min_site_size": 2, **ALL_KWARGS[name]}
    first = partition_catalog(catalog, name, 3, seed=7, **kwargs)
    again = partition_catalog(catalog, name, 3, seed=7, **kwargs)
    other = partition_catalog(catalog, name, 3, seed=8, **kwargs)
    for a, b in zip(first.sites, again.sites, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first.sites, other.sites, strict=True))


def test_iid_sites_are_equal_sized_and_mixed() -> None:
    catalog = make_catalog(balanced(60, 3))
    partition = partition_catalog(catalog, "iid", 3, seed=0)
    assert partition.sizes() == [60, 60, 60]
    # contiguous label blocks in the catalog must not become single-class sites
    assert (label_counts(partition, catalog) > 0).all()


def test_label_skew_is_mean_total_variation_hand_computed() -> None:
    # global label mix (3/8, 5/8); site 0 (3/4, 1/4) and site 1 (0, 1) are each at TV 3/8
    catalog = make_catalog([0, 0, 0, 1, 1, 1, 1, 1])
    settings = PartitionSettings(partitioner="iid", num_sites=2, seed=0)
    partition = Partition(
        sites=(np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])), settings=settings, site_names=("s0", "s1")
    )
    assert label_skew(partition, catalog) == pytest.approx(0.375)
    sites = (np.array([0, 3, 4, 5]), np.array([1, 2, 6, 7]))
    same = Partition(sites=sites, settings=settings, site_names=("x", "y"))
    # site 0 (1/4, 3/4), site 1 (2/4, 2/4): TV 1/8 each
    assert label_skew(same, catalog) == pytest.approx(0.125)


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    """Measure: mean total-variation distance of each site's label mix from the global mix."""
    catalog = make_catalog(balanced(200, 5), FIVE)

    def skews(alpha: float) -> list[float]:
        kwargs = {"alpha": alpha, "min_site_size": 5}
        runs = [partition_catalog(catalog, "dirichlet", 4, seed=s, **kwargs) for s in range(3)]
        return [label_skew(p, catalog) for p in runs]

    skew = {alpha: skews(alpha) for alpha in (0.1, 10.0)}
    assert min(skew[0.1]) > 0.4
    assert max(skew[10.0]) < 0.15
    assert np.mean(skew[0.1]) > 3 * np.mean(skew[10.0])


def test_dirichlet_impossible_min_size_is_a_clear_error() -> None:
    catalog = make_catalog(balanced(30, 2), get_task("normal-pneumonia"))
    with pytest.raises(DataError, match=r"alpha=0\.01"):
        partition_catalog(catalog, "dirichlet", 6, seed=0, alpha=0.01, min_site_size=5)


@pytest.mark.parametrize(("sites", "k"), [(3, 1), (5, 2), (2, 2)])
def test_pathological_gives_each_site_at_most_k_classes(sites: int, k: int) -> None:
    catalog = make_catalog(balanced(30, 3))
    partition = partition_catalog(catalog, "pathological", sites, seed=1, classes_per_site=k, min_site_size=1)
    counts = label_counts(partition, catalog)
    assert ((counts > 0).sum(axis=1) <= k).all()
    assert (counts.sum(axis=0) == 30).all()  # no class left out
    if k == 1:
        assert sorted(np.flatnonzero(row)[0] for row in counts) == [0, 1, 2]


def test_pathological_that_would_drop_a_class_is_refused() -> None:
    catalog = make_catalog(balanced(10, 5), FIVE)
    with pytest.raises(ConfigError, match="classes-per-site"):
        partition_catalog(catalog, "pathological", 2, seed=0, classes_per_site=2, min_site_size=1)


def test_quantity_skew_small_alpha_gives_unequal_sizes_with_iid_labels() -> None:
    catalog = make_catalog(balanced(200, 3))

    def spread(alpha: float) -> float:
        kwargs = {"alpha": alpha, "min_site_size": 5}
        runs = [partition_catalog(catalog, "quantity-skew", 5, seed=s, **kwargs) for s in range(3)]
        sizes = [np.array(p.sizes()) for p in runs]
        return float(np.mean([x.std() / x.mean() for x in sizes]))

    assert spread(0.2) > 0.6
    assert spread(100.0) < 0.2
    partition = partition_catalog(catalog, "quantity-skew", 5, seed=0, alpha=100.0, min_site_size=5)
    assert label_skew(partition, catalog) < 0.15
    assert min(partition.sizes()) >= 5


def test_natural_split_follows_site_metadata() -> None:
    labels = balanced(20, 3)
    names = ["alpha", "beta", "gamma"]
    sites = [names[i % 3] for i in range(len(labels))]
    catalog = make_catalog(labels, sites=sites)
    partition = partition_catalog(catalog, "natural", None, seed=0, min_site_size=1)
    assert partition.num_sites == 3
    assert partition.natural_ids == (("alpha",), ("beta",), ("gamma",))
    for s, idx in enumerate(partition.sites):
        assert {sites[i] for i in idx} == {names[s]}

    merged = partition_catalog(catalog, "natural", 2, seed=0, min_site_size=1)
    assert_exact_cover(merged, len(labels))
    assert sorted(n for ids in merged.natural_ids or () for n in ids) == names
    site_of = merged.site_of(len(labels))
    for name in names:  # a natural site is never cut in two
        assert len(set(site_of[np.asarray(sites) == name].tolist())) == 1
    assert sorted(merged.sizes()) == [20, 40]


def test_natural_split_by_source() -> None:
    kermany = make_catalog(balanced(5, 2), source="kermany")
    covid = make_catalog(balanced(4, 3), source="covid")
    catalog = Catalog.concat([kermany, covid])
    partition = partition_catalog(catalog, "natural", None, seed=0, min_site_size=1, natural_by="source")
    assert partition.natural_ids == (("covid",), ("kermany",))
    assert partition.sizes() == [12, 10]


def test_natural_split_errors() -> None:
    catalog = make_catalog(balanced(10, 3))
    with pytest.raises(DataError, match="--natural-by source"):
        partition_catalog(catalog, "natural", 2, seed=0, min_site_size=1)
    with_sites = make_catalog(balanced(10, 3), sites=["a", "b"] * 15)
    with pytest.raises(DataError, match="--sites 2 or fewer"):
        partition_catalog(with_sites, "natural", 3, seed=0, min_site_size=1)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological", "quantity-skew"])
def test_no_patient_is_split_across_sites(name: str) -> None:
    labels = np.repeat(np.arange(3), 60)  # 60 patients of 3 images each, one label per patient
    patients = [f"p{i // 3}" for i in range(len(labels))]
    catalog = make_catalog(labels, patients=patients)
    partition = partition_catalog(catalog, name, 4, seed=2, min_site_size=2, **ALL_KWARGS[name])
    assert_exact_cover(partition, len(labels))
    site_of = partition.site_of(len(labels))
    by_patient: dict[str, set[int]] = {}
    for p, s in zip(patients, site_of.tolist(), strict=True):
        by_patient.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())


def test_without_patient_grouping_patients_do_get_split() -> None:
    patients = [f"p{i // 3}" for i in range(180)]
    catalog = make_catalog(np.repeat(np.arange(3), 60), patients=patients)
    site_of = partition_catalog(catalog, "iid", 4, seed=2, by_patient=False).site_of(180)
    assert any(len(set(site_of[i : i + 3].tolist())) > 1 for i in range(0, 180, 3))


def test_mixed_label_patient_is_placed_by_its_majority_label() -> None:
    # patient "m" has two pneumonia images and one normal: with k=1 it goes to the pneumonia site
    labels = [0] * 10 + [1] * 10 + [1, 1, 0]
    patients = [None] * 20 + ["m", "m", "m"]
    catalog = make_catalog(labels, get_task("normal-pneumonia"), patients=patients)
    partition = partition_catalog(catalog, "pathological", 2, seed=0, classes_per_site=1, min_site_size=1)
    site_of = partition.site_of(len(labels))
    assert len(set(site_of[20:].tolist())) == 1
    assert site_of[20] == site_of[10]


def test_bad_inputs_raise_named_errors() -> None:
    catalog = make_catalog(balanced(10, 3))
    with pytest.raises(UnknownNameError, match="dirichlet, iid, natural, pathological, quantity-skew"):
        partition_catalog(catalog, "random", 2, seed=0)
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            partition_catalog(catalog, "dirichlet", 2, seed=0, alpha=alpha)
    with pytest.raises(ConfigError, match="sites"):
        partition_catalog(catalog, "iid", 0, seed=0)
    with pytest.raises(DataError, match="31 sites"):
        partition_catalog(catalog, "iid", 31, seed=0, min_site_size=1)
    with pytest.raises(DataError, match="4 sites of at least 10"):
        partition_catalog(catalog, "iid", 4, seed=0)
    with pytest.raises(ConfigError, match="classes-per-site"):
        partition_catalog(catalog, "pathological", 2, seed=0, classes_per_site=4, min_site_size=1)
    patients = [f"p{i // 10}" for i in range(30)]
    by_patient = make_catalog(balanced(10, 3), patients=patients)
    with pytest.raises(DataError, match="4 sites of at least 1 patients"):
        partition_catalog(by_patient, "iid", 4, seed=0, min_site_size=1)


def test_class_missing_from_the_data_warns_or_raises() -> None:
    catalog = make_catalog(balanced(10, 2))  # no covid-19 image for a 3-class task
    partition_catalog(catalog, "iid", 2, seed=0, min_site_size=1)
    with pytest.raises(DataError, match="covid-19"):
        partition_catalog(catalog, "iid", 2, seed=0, min_site_size=1, require_all_classes=True)


def test_a_finding_seen_only_beside_an_earlier_one_counts_as_present() -> None:
    task = get_task("nih14")
    targets = np.zeros((20, task.num_classes), dtype=np.float32)
    targets[np.arange(20), np.arange(20) % task.num_classes] = 1.0
    edema = task.classes.index("Edema")
    targets[:, edema] = 0.0
    targets[0, [0, edema]] = 1.0  # Edema only with the first finding, so never an image's primary label
    records = [ImageRecord(source="mem", key=str(i), source_labels=("x",)) for i in range(20)]
    catalog = Catalog(task, records, targets, {"mem": ConstantReader()})

    partition_catalog(catalog, "iid", 2, seed=0, min_site_size=1, require_all_classes=True)

    targets[0, edema] = 0.0
    with pytest.raises(DataError, match="Edema"):
        partition_catalog(
            Catalog(task, records, targets, {"mem": ConstantReader()}),
            "iid",
            2,
            seed=0,
            min_site_size=1,
            require_all_classes=True,
        )


def test_write_partition_of_in_memory_source_writes_pngs(tmp_path: Path) -> None:
    catalog = make_catalog(balanced(6, 3), sites=["x"] * 18, patients=[f"p{i}" for i in range(18)])
    partition = partition_catalog(catalog, "iid", 3, seed=4, min_site_size=1)
    out = write_partition(tmp_path / "out", catalog, partition, source_paths={"mem": None})
    assert out == (tmp_path / "out").resolve()
    assert sorted(p.name for p in out.iterdir()) == [
        "images",
        "label_distribution.md",
        "label_distribution.png",
        "partition.json",
        "site_00.csv",
        "site_01.csv",
        "site_02.csv",
    ]
    seen: list[int] = []
    for s in range(3):
        with open(out / f"site_{s:02d}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "label", "site", "patient_id", "view"]
        assert len(rows) == partition.sizes()[s]
        for row in rows:
            path = Path(row["path"])
            assert path.is_absolute()
            assert path.is_file()
            key = int(np.asarray(Image.open(path))[0, 0])  # the grey level encodes the record key
            seen.append(key)
            assert row["label"] == NPC.classes[key // 6]
            assert row["patient_id"] == f"p{key}"
            assert row["site"] == "x"
    assert sorted(seen) == list(range(18))
    summary = json.loads((out / "partition.json").read_text())
    assert summary["settings"]["seed"] == 4
    assert summary["settings"]["partitioner"] == "iid"
    assert summary["sizes"] == {"site_00": 6, "site_01": 6, "site_02": 6}
    assert sum(c["normal"] for c in summary["label_counts"].values()) == 6
    assert summary["images_written"] == 18
    table = (out / "label_distribution.md").read_text()
    assert "| site | normal | pneumonia | covid-19 | total |" in table
    assert "| **all** | 6 | 6 | 6 | 18 |" in table
    with Image.open(out / "label_distribution.png") as png:
        assert png.size[0] > 100


def test_write_partition_of_file_source_points_at_the_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(12):
        Image.fromarray(np.full((4, 4), i, dtype=np.uint8)).save(root / f"{i}.png")
    labels = balanced(4, 3)
    records = [ImageRecord("folder", f"{i}.png", (NPC.classes[c],), view="PA") for i, c in enumerate(labels)]
    catalog = Catalog(NPC, records, np.eye(3, dtype=np.float32)[labels], {"folder": FolderReader(root)})
    partition = partition_catalog(catalog, "dirichlet", 2, seed=0, alpha=1.0, min_site_size=1)
    out = write_partition(tmp_path / "out", catalog, partition, source_paths={"folder": str(root)})
    assert not (out / "images").exists()
    paths = []
    for s in range(2):
        with open(out / f"site_{s:02d}.csv", newline="") as f:
            for row in csv.DictReader(f):
                paths.append(row["path"])
                assert row["view"] == "PA"
    assert sorted(paths) == sorted(str(root / f"{i}.png") for i in range(12))
    assert json.loads((out / "partition.json").read_text())["sources"] == {"folder": str(root)}


class BrokenReader(ConstantReader):
    def read(self, record: ImageRecord) -> np.ndarray:
        if record.key == "7":
            raise DataError("image 7 is truncated")
        return super().read(record)


def test_write_partition_failure_leaves_nothing(tmp_path: Path) -> None:
    catalog = make_catalog(balanced(4, 3), reader=BrokenReader())
    partition = partition_catalog(catalog, "iid", 2, seed=0, min_site_size=1)
    with pytest.raises(DataError, match="image 7"):
        write_partition(tmp_path / "out", catalog, partition, source_paths={"mem": None})
    assert list(tmp_path.iterdir()) == []


def test_write_partition_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    catalog = make_catalog(balanced(4, 3))
    partition = partition_catalog(catalog, "iid", 2, seed=0, min_site_size=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="--overwrite"):
        write_partition(tmp_path / "out", catalog, partition, source_paths={"mem": None})
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match="not an earlier partition"):
        write_partition(tmp_path / "out", catalog, partition, source_paths={"mem": None}, overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    write_partition(tmp_path / "new", catalog, partition, source_paths={"mem": None})
    (tmp_path / "new" / "stale.csv").write_text("old")
    write_partition(tmp_path / "new", catalog, partition, source_paths={"mem": None}, overwrite=True)
    assert not (tmp_path / "new" / "stale.csv").exists()
    assert (tmp_path / "new" / "site_01.csv").is_file()


@pytest.mark.realdata
def test_kermany_dirichlet_keeps_patients_together(shared_data: Path) -> None:
    from common.data.sources import load_catalog

    catalog = load_catalog("image-folder", shared_data / "kermany-pneumonia", get_task("normal-pneumonia"))
    partition = partition_catalog(catalog, "dirichlet", 5, seed=1, alpha=0.5)
    assert_exact_cover(partition, len(catalog))
    site_of = partition.site_of(len(catalog))
    sites_of_patient: dict[str, set[int]] = {}
    for record, site in zip(catalog.records, site_of.tolist(), strict=True):
        assert record.patient_id is not None
        sites_of_patient.setdefault(record.patient_id, set()).add(site)
    assert len(sites_of_patient) > 1000  # Kermany has far fewer patients than images
    assert all(len(s) == 1 for s in sites_of_patient.values())
    np.testing.assert_array_equal(label_counts(partition, catalog).sum(axis=0), [1341, 3875])
