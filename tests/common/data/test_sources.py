"""Every source adapter on a tiny layout of its publisher's format, and its bad-input errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.data.sources import SOURCES, kermany_patient, load_catalog
from common.data.sources.medmnist import download_medmnist
from common.errors import ConfigError, DataError, IntegrityError, UnknownNameError
from common.tasks import get_task
from tests.common.data.helpers import write_csv, write_image

NPC = get_task("normal-pneumonia-covid")
NP = get_task("normal-pneumonia")
NIH = get_task("nih14")
CHEX = get_task("chexpert-competition")


def test_registry_has_every_format() -> None:
    assert SOURCES.names() == sorted(
        [
            "image-folder",
            "covid19-radiography",
            "ieee8023",
            "nih14",
            "chexpert",
            "medmnist",
            "dicom",
            "manifest",
            "synthetic",
        ]
    )
    with pytest.raises(UnknownNameError, match="image-folder"):
        load_catalog("dicom-folder", Path("."), NP)


@pytest.mark.parametrize(
    ("name", "patient", "subtype"),
    [
        ("person1_bacteria_1.jpeg", "person1", "bacteria"),
        ("person1000_virus_1681.jpeg", "person1000", "virus"),
        ("IM-0115-0001.jpeg", "IM-0115", None),
        ("IM-0640-0001-0001.jpeg", "IM-0640", None),
        ("NORMAL2-IM-1018-0001.jpeg", "NORMAL2-IM-1018", None),
        ("scan.png", None, None),
    ],
)
def test_kermany_patient_ids(name: str, patient: str | None, subtype: str | None) -> None:
    assert kermany_patient(name) == (patient, subtype)


def test_image_folder_with_split_folders(kermany_dir: Path) -> None:
    cat = load_catalog("image-folder", kermany_dir, NP)
    assert len(cat) == 8
    assert cat.class_counts() == {"normal": 4, "pneumonia": 4}
    by_key = {r.key: r for r in cat.records}
    rec = by_key["train/PNEUMONIA/person2_virus_3.jpeg"]
    assert (rec.patient_id, rec.meta["subtype"], rec.meta["split"]) == ("person2", "virus", "train")
    assert by_key["train/NORMAL/IM-0115-0002.jpeg"].patient_id == "IM-0115"
    np.testing.assert_array_equal(cat.targets[cat.records.index(rec)], [0.0, 1.0])
    assert cat.read(0).dtype == np.uint8
    assert cat.read(0).shape == (20, 24)


def test_image_folder_split_option_and_class_folder_root(kermany_dir: Path) -> None:
    assert len(load_catalog("image-folder", kermany_dir, NP, options={"splits": "test"})) == 2
    assert len(load_catalog("image-folder", kermany_dir / "train", NP)) == 6
    with pytest.raises(ConfigError, match="splits"):
        load_catalog("image-folder", kermany_dir, NP, options={"splits": "val"})


def test_image_folder_errors(kermany_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_catalog("image-folder", tmp_path / "missing", NP)
    (kermany_dir / "train" / "COVID").mkdir()
    with pytest.raises(DataError, match=r"class folder .*COVID has no images"):
        load_catalog("image-folder", kermany_dir, NP)
    write_image(kermany_dir / "train" / "COVID" / "c1.png")
    with pytest.raises(DataError, match=r"'COVID' \(1\).*drop-unmapped"):
        load_catalog("image-folder", kermany_dir, NP)
    assert len(load_catalog("image-folder", kermany_dir, NP, options={"drop-unmapped": "true"})) == 8
    assert load_catalog("image-folder", kermany_dir, NPC).class_counts()["covid-19"] == 1
    with pytest.raises(ConfigError, match="option 'colour'"):
        load_catalog("image-folder", kermany_dir, NP, options={"colour": "1"})


def _covid_db(root: Path, xlsx: bool = False) -> Path:
    for cls, n in (("COVID", 3), ("Normal", 2), ("Lung_Opacity", 1), ("Viral Pneumonia", 2)):
        for i in range(1, n + 1):
            write_image(root / cls / "images" / f"{cls}-{i}.png", seed=i)
        rows = [
            (f"{cls.upper()}-{i}", "PNG", "24*20", f"https://site-{cls}.example") for i in range(1, n + 1)
        ]
        header = ("FILE NAME", "FORMAT", "SIZE", "URL")
        if xlsx and cls == "COVID":
            from openpyxl import Workbook

            wb = Workbook()
            wb.active.append(header)
            for row in rows:
                wb.active.append(row)
            wb.save(root / f"{cls}.metadata.xlsx")
        else:
            write_csv(root / f"{cls}.metadata.csv", header, rows)
    return root


def test_covid19_radiography_maps_labels_and_keeps_url(tmp_path: Path) -> None:
    root = _covid_db(tmp_path / "db", xlsx=True)
    with pytest.raises(DataError, match=r"'Lung_Opacity' \(1\)"):
        load_catalog("covid19-radiography", root, NPC)
    cat = load_catalog("covid19-radiography", root, NPC, options={"drop_unmapped": True})
    assert cat.class_counts() == {"normal": 2, "pneumonia": 2, "covid-19": 3}
    assert {r.site for r in cat.records if r.source_labels == ("COVID",)} == {"https://site-COVID.example"}
    mapped = load_catalog("covid19-radiography", root, NPC, options={"label-map": "Lung_Opacity=pneumonia"})
    assert mapped.class_counts()["pneumonia"] == 3
    only = load_catalog(
        "covid19-radiography", root, get_task("normal-covid"), options={"classes": "COVID,Normal"}
    )
    assert only.class_counts() == {"normal": 2, "covid-19": 3}


def test_covid19_radiography_csv_without_url_column(tmp_path: Path) -> None:
    root = _covid_db(tmp_path / "db")
    write_csv(root / "Normal.metadata.csv", ("FILE NAME", "FORMAT"), [("Normal-1", "PNG")])
    with pytest.raises(DataError, match=r"Normal.metadata.csv: missing column\(s\) 'URL'"):
        load_catalog("covid19-radiography", root, NPC, options={"drop-unmapped": "true"})


def test_ieee8023(tmp_path: Path) -> None:
    root = tmp_path / "covid-chestxray-dataset"
    rows = [
        ("Pneumonia/Viral/COVID-19", "PA", "X-ray", "Milan, Italy", "p1", "a.png", "images"),
        ("Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "Milan, Italy", "p1", "b.png", "images"),
        ("Pneumonia/Bacterial/Streptococcus", "PA", "X-ray", "Spain", "p2", "c.png", "images"),
        ("No Finding", "AP", "X-ray", "", "p3", "d.png", "images"),
        ("Pneumonia/Viral/COVID-19", "L", "X-ray", "", "p4", "e.png", "images"),
        ("Pneumonia/Viral/COVID-19", "Axial", "CT", "", "p5", "f.png", "images"),
        ("Tuberculosis", "PA", "X-ray", "", "p6", "g.png", "images"),
    ]
    for i, row in enumerate(rows):
        write_image(root / "images" / row[5], seed=i)
    write_csv(
        root / "metadata.csv",
        ("finding", "view", "modality", "location", "patientid", "filename", "folder"),
        rows,
    )
    with pytest.raises(DataError, match="Tuberculosis"):
        load_catalog("ieee8023", root, NPC)
    cat = load_catalog("ieee8023", root, NPC, options={"drop-unmapped": "true"})
    assert cat.class_counts() == {"normal": 1, "pneumonia": 1, "covid-19": 2}
    assert [r.site for r in cat.records][:2] == ["Milan, Italy", "Milan, Italy"]
    assert len(load_catalog("ieee8023", root, NPC, options={"drop-unmapped": "TRUE", "views": "PA"})) == 2


def _nih(root: Path) -> Path:
    header = (
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
    )
    rows = [
        ("00000001_000.png", "Cardiomegaly|Effusion", 0, 1, 57, "M", "PA"),
        ("00000001_001.png", "No Finding", 1, 1, 58, "M", "PA"),
        ("00000002_000.png", "Hernia", 0, 2, 80, "F", "AP"),
        ("00000003_000.png", "Mass", 0, 3, 40, "F", "PA"),
    ]
    for i, row in enumerate(rows[:3]):  # the last image is absent (a partial download)
        write_image(root / "images" / row[0], seed=i)
    write_csv(root / "Data_Entry_2017_v2020.csv", header, rows)
    return root


def test_nih14_multilabel_and_cross_task(tmp_path: Path) -> None:
    root = _nih(tmp_path / "nih")
    cat = load_catalog("nih14", root, NIH)
    assert len(cat) == 3
    counts = cat.class_counts()
    assert (counts["Cardiomegaly"], counts["Effusion"], counts["Hernia"], counts["Mass"]) == (1, 1, 1, 0)
    assert cat.records[0].patient_id == "1"
    assert cat.records[2].view == "AP"
    assert not np.isnan(cat.targets).any()
    assert cat.primary_labels().tolist() == [1, NIH.num_classes, 13]
    chex = load_catalog("nih14", root, CHEX)
    np.testing.assert_array_equal(chex.targets[0], [0, 1, 0, 0, 1])  # Effusion = Pleural Effusion
    with pytest.raises(DataError, match="strict"):
        load_catalog("nih14", root, NIH, strict=True)
    with pytest.raises(DataError, match="multi-label"):
        load_catalog("nih14", root, NPC)


def test_nih14_missing_columns(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "x.png")
    write_csv(tmp_path / "Data_Entry_2017.csv", ("Image Index", "Finding Labels"), [("x.png", "Mass")])
    with pytest.raises(
        DataError, match=r"Data_Entry_2017.csv: missing column\(s\) 'Patient ID', 'View Position'"
    ):
        load_catalog("nih14", tmp_path, NIH)


@pytest.mark.parametrize(("policy", "expected"), [("ones", 1.0), ("zeros", 0.0), ("ignore", np.nan)])
def test_chexpert_uncertainty(tmp_path: Path, policy: str, expected: float) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    header = (
        "Path",
        "Sex",
        "Frontal/Lateral",
        "AP/PA",
        "No Finding",
        "Cardiomegaly",
        "Edema",
        "Pleural Effusion",
    )
    rows = [
        (
            "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
            "F",
            "Frontal",
            "AP",
            "",
            "-1.0",
            "1.0",
            "",
        ),
        (
            "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg",
            "F",
            "Lateral",
            "",
            "",
            "1.0",
            "",
            "",
        ),
        (
            "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg",
            "M",
            "Frontal",
            "PA",
            "1.0",
            "0.0",
            "",
            "",
        ),
    ]
    for i, row in enumerate(rows):
        write_image(tmp_path / row[0], seed=i)
    csv_path = write_csv(root / "train.csv", header, rows)
    cat = load_catalog("chexpert", csv_path, CHEX, options={"uncertainty": policy})
    assert len(cat) == 2  # the lateral view is left out
    # columns: Atelectasis (absent -> NaN), Cardiomegaly, Consolidation (absent), Edema, Pleural Effusion
    np.testing.assert_array_equal(cat.targets[0], [np.nan, expected, np.nan, 1.0, 0.0])
    assert cat.records[0].patient_id == "patient00001"
    assert cat.records[1].view == "PA"
    assert cat.read(1).shape == (20, 24)
    with pytest.raises(ConfigError, match="uncertainty"):
        load_catalog("chexpert", csv_path, CHEX, options={"uncertainty": "maybe"})


def test_manifest_relative_paths_multiclass_and_multilabel(tmp_path: Path) -> None:
    write_image(tmp_path / "export" / "img" / "a.png", seed=1)
    write_image(tmp_path / "export" / "img" / "b.png", seed=2)
    write_image(tmp_path / "elsewhere.png", seed=3)
    rows = [
        ("img/a.png", "normal", "h1", "p1", "PA"),
        ("img/b.png", "PNEUMONIA", "h1", "p2", "AP"),
        (str(tmp_path / "elsewhere.png"), "covid-19", "h2", "", ""),
    ]
    csv_path = write_csv(
        tmp_path / "export" / "site.csv", ("path", "label", "site", "patient_id", "view"), rows
    )
    cat = load_catalog("manifest", csv_path, NPC)
    assert cat.class_counts() == {"normal": 1, "pneumonia": 1, "covid-19": 1}
    assert [r.site for r in cat.records] == ["h1", "h1", "h2"]
    assert cat.records[2].patient_id is None
    assert cat.read(2).shape == (20, 24)
    ml_rows = [("img/a.png", "Mass|Effusion"), ("img/b.png", "")]
    ml_csv = write_csv(tmp_path / "export" / "ml.csv", ("path", "label"), ml_rows)
    ml = load_catalog("manifest", ml_csv, NIH)
    assert ml.class_counts()["Mass"] == 1
    assert ml.targets[1].sum() == 0
    bad = write_csv(tmp_path / "bad.csv", ("file", "label"), [("a.png", "normal")])
    with pytest.raises(DataError, match=r"bad.csv: missing column\(s\) 'path'"):
        load_catalog("manifest", bad, NPC)


def test_synthetic_is_deterministic_and_balanced() -> None:
    opts = {"n_images": 60, "seed": 3, "image_size": 32, "n-sites": 2}
    a = load_catalog("synthetic", None, NPC, options=opts)
    b = load_catalog("synthetic", None, NPC, options=opts)
    assert len(a) == 60
    assert a.records == b.records
    np.testing.assert_array_equal(a.read(5), b.read(5))
    assert a.read(0).shape == (32, 32)
    counts = a.class_counts()
    assert min(counts.values()) >= 10
    patients = {r.patient_id for r in a.records}
    assert 20 <= len(patients) < 60
    assert {r.site for r in a.records} == {"synthetic-site-0", "synthetic-site-1"}
    other = load_catalog("synthetic", None, NPC, options={**opts, "seed": 4})
    assert not np.array_equal(a.read(0), other.read(0))
    skewed = load_catalog("synthetic", None, NP, options={"n-images": 200, "class-weights": "1,0"})
    assert skewed.class_counts() == {"normal": 200, "pneumonia": 0}
    with pytest.raises(DataError, match="multi-label"):
        load_catalog("synthetic", None, NIH)
    with pytest.raises(ConfigError, match="n-images"):
        load_catalog("synthetic", None, NPC, options={"n-images": "many"})


def _npz(path: Path, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_npz(tmp_path: Path) -> None:
    path = _npz(tmp_path / "pneumoniamnist_64.npz")
    cat = load_catalog("medmnist", path, NP)
    assert len(cat) == 11
    assert cat.class_counts() == {"normal": 6, "pneumonia": 5}
    assert cat.records[6].key == "val/0"
    assert cat.records[6].meta["split"] == "val"
    with np.load(path) as npz:
        np.testing.assert_array_equal(cat.read(6), npz["val_images"][0])
    assert len(load_catalog("medmnist", tmp_path, NP, options={"splits": "test"})) == 3


@pytest.fixture
def loopback_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_medmnist_download_checks_md5(tmp_path: Path, loopback_server: tuple[str, Path]) -> None:
    url, served = loopback_server
    npz = _npz(served / "pneumoniamnist_64.npz")
    md5 = hashlib.md5(npz.read_bytes()).hexdigest()
    dest = tmp_path / "downloads"
    got = download_medmnist("pneumoniamnist", 64, dest, base_url=url, md5=md5)
    assert got == dest / "pneumoniamnist_64.npz"
    assert got.read_bytes() == npz.read_bytes()
    assert len(load_catalog("medmnist", got, NP)) == 11
    with pytest.raises(IntegrityError, match="does not match"):
        download_medmnist("pneumoniamnist", 64, tmp_path / "other", base_url=url, md5="0" * 32)
    assert list((tmp_path / "other").iterdir()) == []  # nothing half-written left behind
    with pytest.raises(ConfigError, match="md5"):
        download_medmnist("pneumoniamnist", 128, dest, base_url=url)
    with pytest.raises(DataError, match="cannot download"):
        download_medmnist("chestmnist", 28, tmp_path / "x", base_url=url)  # 404


@pytest.mark.parametrize("difficulty", ["2", "-0.1", "hard", "nan"])
def test_a_synthetic_difficulty_outside_0_to_1_is_refused_naming_the_option(difficulty: str) -> None:
    with pytest.raises(ConfigError, match="difficulty"):
        load_catalog("synthetic", None, NP, options={"n_images": 6, "difficulty": difficulty})


def test_synthetic_difficulty_zero_draws_the_original_images() -> None:
    from common.data.synthetic import render_synthetic_cxr

    easy = render_synthetic_cxr("pneumonia", 11, 32)
    assert np.array_equal(render_synthetic_cxr("pneumonia", 11, 32, difficulty=0.0), easy)
    assert not np.array_equal(render_synthetic_cxr("pneumonia", 11, 32, difficulty=0.7), easy)
