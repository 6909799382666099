"""The ``dicom`` source: selection with reasons, the viewer pixel pipeline, pseudonymised patients."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from client.cli import app as client_app
from common.data import dicom
from common.data.cache import build_cache
from common.data.dicom import decode_dicom_file
from common.data.readers import decode_image_file
from common.data.sources import load_catalog
from common.errors import DataError
from common.tasks import get_task
from simulation.cli import app as simulation_app
from tests.common.data.dicom_helpers import SECRET_VALUES, centre_is_bright, dicom_site, write_dicom
from tests.common.data.helpers import write_csv

runner = CliRunner()
TASK = get_task("normal-pneumonia")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return dicom_site(tmp_path / "site")


def _real(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def test_check_counts_four_and_four_and_the_reasons(site: Path, tmp_path: Path) -> None:
    args = ["check", "--format", "dicom", "--data", str(site), "--task", "normal-pneumonia"]
    result = runner.invoke(client_app, [*args, "--image-size", "16", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "8 readable images" in out
    assert "│ normal    │      4 │" in out
    assert "│ pneumonia │      4 │" in out
    assert "│ modality CT not selected │     1 │" in out
    assert "│ multi-frame object       │     1 │" in out
    assert "PA 6, AP 2" in out
    assert "patients         │ 7" in out  # n0 and n1 share one


def test_catalog_selection_views_and_modalities(site: Path) -> None:
    catalog = load_catalog("dicom", site, TASK, options={"views": "PA"})
    assert len(catalog) == 6
    assert catalog.left_out["view AP not selected"] == 2
    cr_only = load_catalog("dicom", site, TASK, options={"modalities": "CR"})
    assert {r.meta["modality"] for r in cr_only.records} == {"CR"}
    assert cr_only.left_out["modality DX not selected"] == 5  # 4 images + the multi-frame one
    with_ct = load_catalog("dicom", site, TASK, options={"modalities": "CR,DX,CT"})
    assert len(with_ct) == 9
    assert "modality CT not selected" not in with_ct.left_out
    not_chest = load_catalog("dicom", site, TASK, options={"body-parts": "HAND"})
    assert not_chest.left_out["body part not selected"] == 8  # n1 has no body part and is kept
    assert [r.key for r in not_chest.records] == ["normal/deep/er/n1.dcm"]


def test_unreadable_unlisted_and_undecodable_are_counted(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (site / "broken.dcm").write_bytes(b"not a DICOM file at all")
    write_dicom(site / "extra" / "unlisted.dcm", seed=20)
    catalog = load_catalog("dicom", site, TASK)
    assert catalog.left_out["unreadable (not DICOM, or damaged)"] == 1
    assert catalog.left_out["no row in labels.csv"] == 1
    with pytest.raises(DataError, match=r"broken\.dcm.*strict"):
        load_catalog("dicom", site, TASK, strict=True)
    monkeypatch.setattr(dicom, "_decoder_available", lambda _ts: False)
    without_rle = load_catalog("dicom", site, TASK)
    assert without_rle.left_out["compressed (RLE Lossless) without a decoder"] == 1
    assert len(without_rle) == 7


def test_every_fixture_renders_bone_bright(site: Path, tmp_path: Path) -> None:
    catalog = load_catalog("dicom", site, TASK)
    for i, record in enumerate(catalog.records):
        grey = catalog.read(i)
        assert grey.dtype == np.uint8
        assert grey.shape == (20, 24)
        assert centre_is_bright(grey), record.key
    cached = build_cache(catalog, 16, tmp_path / "cache")
    assert len(cached) == 8
    assert not cached.skipped


def test_window_maps_the_window_to_the_full_grey_range(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "w.dcm", bits=12, window=(1000, 401))
    raw = pydicom.dcmread(path).pixel_array.astype(float)
    grey = decode_dicom_file(path).astype(float)
    expected = np.clip((raw - 999.5) / 400 + 0.5, 0, 1) * 255
    assert np.abs(grey - expected).max() <= 1.0


def test_presentation_lut_inverse_and_monochrome1_each_invert_once(tmp_path: Path) -> None:
    plain = decode_dicom_file(write_dicom(tmp_path / "a.dcm", seed=3, bits=16))
    ds = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", seed=3, bits=16))
    ds.PresentationLUTShape = "INVERSE"  # same stored values, now to be inverted
    ds.save_as(tmp_path / "b.dcm")
    inverted = decode_dicom_file(tmp_path / "b.dcm")
    assert np.array_equal(inverted, 255 - plain)
    ds.PhotometricInterpretation = "MONOCHROME1"  # DX convention: MONOCHROME1 with INVERSE
    ds.save_as(tmp_path / "c.dcm")
    assert np.array_equal(decode_dicom_file(tmp_path / "c.dcm"), 255 - plain)


@pytest.fixture(scope="module")
def real_reference() -> np.ndarray:
    return decode_dicom_file(_real("RG1_UNCI.dcm"))


def test_real_chest_radiograph_decodes_with_bone_bright(real_reference: np.ndarray) -> None:
    path = _real("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.BitsStored == 15
    raw = ds.pixel_array.astype(np.float64)
    grey = real_reference
    assert grey.shape == raw.shape
    # MONOCHROME1: a high stored value is dark. The rendered image must be the inverted window.
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    window = np.clip((raw - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    assert np.abs(grey.astype(float) - (1.0 - window) * 255).max() <= 1.0
    assert np.corrcoef(raw.ravel(), grey.ravel())[0, 1] < -0.99
    h, w = grey.shape
    rows = slice(h // 3, 2 * h // 3)
    spine = grey[rows, int(w * 0.45) : int(w * 0.55)].mean()
    lungs = (grey[rows, int(w * 0.2) : int(w * 0.3)].mean(), grey[rows, int(w * 0.7) : int(w * 0.8)].mean())
    assert spine > max(lungs) + 30


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "RG1_J2KR.dcm"])
def test_real_jpeg2000_copies_decode_close_to_the_uncompressed_image(
    name: str, real_reference: np.ndarray
) -> None:
    ds = pydicom.dcmread(_real(name), stop_before_pixels=True)
    assert "JPEG 2000" in ds.file_meta.TransferSyntaxUID.name
    reference = real_reference.astype(int)
    copy = decode_dicom_file(_real(name)).astype(int)
    assert copy.shape == reference.shape
    assert np.abs(copy - reference).mean() < 1.0
    assert np.abs(copy - reference).max() <= 8


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "JPEG-LL.dcm", "MR_small_RLE.dcm"])
def test_lossless_transfer_syntaxes_decode(name: str) -> None:
    grey = decode_dicom_file(_real(name))
    assert grey.dtype == np.uint8
    assert grey.ndim == 2
    assert grey.max() > grey.min()
    if name.startswith("MR_small"):
        assert np.array_equal(grey, decode_dicom_file(_real("MR_small.dcm")))


def test_patients_are_pseudonymised_and_grouped(site: Path) -> None:
    catalog = load_catalog("dicom", site, TASK)
    by_key = {r.key: r.patient_id for r in catalog.records}
    assert by_key["normal/n0.dcm"] == by_key["normal/deep/er/n1.dcm"]
    assert len(set(by_key.values())) == 7
    assert all(p is not None and p.startswith("pt-") for p in by_key.values())
    assert not any(p in str(by_key) for p in ("ZBR", "QKA", "P3", "P4"))
    again = load_catalog("dicom", site, TASK)
    assert [r.patient_id for r in again.records] == [r.patient_id for r in catalog.records]
    # A 'patient' column overrides the header's PatientID.
    rows = [
        ("normal/n0.dcm", "NORMAL", "A"),
        ("normal/n2", "NORMAL", "A"),
        ("pneumonia/p0.dcm", "PNEUMONIA", ""),
    ]
    write_csv(site / "labels.csv", ["path", "label", "patient"], rows)
    column = load_catalog("dicom", site, TASK)
    ids = {r.key: r.patient_id for r in column.records}
    assert ids["normal/n0.dcm"] == ids["normal/n2"] != ids["pneumonia/p0.dcm"]
    assert column.left_out["no row in labels.csv"] == 5


def test_no_header_value_reaches_logs_output_or_files(
    site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    # Invalid values make pydicom warn and log with the value quoted, on first access.
    odd = pydicom.dcmread(write_dicom(site / "normal" / "odd.dcm", seed=30))
    odd.PatientBirthDate = "Quokka-Zanzibar"
    odd.ViewPosition = "Zanzibar-Quokka-Wombat-Longer-Than-16"  # read by the selection
    odd.save_as(site / "normal" / "odd.dcm")
    caplog.clear()
    recwarn.clear()  # what writing the file said is not under test
    for name in ("common", "client", "simulation", "pydicom"):
        caplog.set_level(logging.DEBUG, logger=name)
    cache = tmp_path / "cache"
    (site / "broken.dcm").write_bytes(b"not a DICOM file at all")
    args = ["check", "--format", "dicom", "--data", str(site), "--task", "normal-pneumonia"]
    result = runner.invoke(client_app, [*args, "--image-size", "16", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    catalog = load_catalog("dicom", site, TASK)
    build_cache(catalog, 16, cache)
    split = tmp_path / "split"
    part = ["partition", "--source", "dicom", "--data", str(site), "--task", "normal-pneumonia"]
    part += ["--partition", "iid", "--sites", "2", "--min-site-size", "1", "--out", str(split)]
    parted = runner.invoke(simulation_app, part)
    assert parted.exit_code == 0, parted.output
    texts = [result.output, parted.output, caplog.text, repr([r.args for r in caplog.records])]
    texts += [str(w.message) for w in recwarn]
    files = [p for folder in (cache, split) for p in folder.rglob("*") if p.is_file()]
    assert len(files) >= 4
    raw_ids = ("ZBR-MRN-48151623", "QKA-MRN-99887766")
    for secret in (*SECRET_VALUES, *raw_ids, "Quixotic", "Zanzibar", "Quokka"):
        for text in texts:
            assert secret not in text
        for path in files:
            assert secret not in str(path)
            assert secret.encode() not in path.read_bytes(), path


def test_manifest_of_a_dicom_partition_reads_back(site: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    part = ["partition", "--source", "dicom", "--data", str(site), "--task", "normal-pneumonia"]
    part += ["--partition", "iid", "--sites", "2", "--min-site-size", "1", "--out", str(split)]
    part += ["--source-option", "views=PA"]
    result = runner.invoke(simulation_app, part)
    assert result.exit_code == 0, result.output
    site_rows = list(csv.DictReader((split / "site_00.csv").open()))
    assert site_rows
    assert all(row["view"] == "PA" for row in site_rows)
    manifest = load_catalog("manifest", split / "site_00.csv", TASK)
    for i in range(len(manifest)):
        assert centre_is_bright(manifest.read(i))
    assert centre_is_bright(decode_image_file(site / "normal" / "n2"))  # no extension: by preamble


def test_bad_layouts_give_clear_errors(site: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_csv(empty / "labels.csv", ["path", "label"], [("a.dcm", "NORMAL")])
    with pytest.raises(DataError, match="no DICOM files"):
        load_catalog("dicom", empty, TASK)
    (site / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"labels\.csv"):
        load_catalog("dicom", site, TASK)
    write_csv(site / "labels.csv", ["path", "label"], [("../x.dcm", "NORMAL")])
    with pytest.raises(DataError, match="stay inside"):
        load_catalog("dicom", site, TASK)
    write_csv(site / "labels.csv", ["path", "label"], [("normal/n0.dcm", "Tuberculosis")])
    with pytest.raises(DataError, match="Tuberculosis"):
        load_catalog("dicom", site, TASK)
    write_csv(site / "labels.csv", ["path", "label"], [("other/ct.dcm", "NORMAL")])
    with pytest.raises(DataError, match="modality CT not selected: 1"):
        load_catalog("dicom", site, TASK)
    args = ["check", "--format", "dicom", "--data", str(site), "-o", "modality=CR"]
    bad = runner.invoke(client_app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert bad.exit_code == 2
    assert "modalities" in bad.output
    assert "Traceback" not in bad.output


def test_multilabel_finding_columns(site: Path) -> None:
    task = get_task("nih14")
    rows = [("normal/n0.dcm", "0", "1"), ("pneumonia/p0.dcm", "1", ""), ("pneumonia/p1.dcm", "-1", "0")]
    write_csv(site / "labels.csv", ["path", "Pneumonia", "Effusion"], rows)
    catalog = load_catalog("dicom", site, task)
    col_p, col_e = task.classes.index("Pneumonia"), task.classes.index("Effusion")
    targets = {r.key: catalog.targets[i] for i, r in enumerate(catalog.records)}
    assert targets["normal/n0.dcm"][col_p] == 0
    assert targets["normal/n0.dcm"][col_e] == 1
    assert targets["pneumonia/p0.dcm"][col_p] == 1
    assert np.isnan(targets["pneumonia/p0.dcm"][col_e])
    assert np.isnan(targets["pneumonia/p1.dcm"][col_p])
    assert np.isnan(targets["normal/n0.dcm"][task.classes.index("Mass")])


def test_site_training_data_reads_a_dicom_folder(site: Path, tmp_path: Path) -> None:
    """What ``cxr-fl-client start --format dicom`` trains on: the same recipe as every format."""
    from common.local import DataRequest, load_site_data

    request = DataRequest("dicom", site, TASK, 16, tmp_path / "cache", 0.25, 0.25, 0)
    data = load_site_data(request)
    assert sum(data.split.sizes().values()) == 8
    assert data.catalog.left_out == {"modality CT not selected": 1, "multi-frame object": 1}
    image, _ = data.dataset("train")[0]
    assert tuple(image.shape[-2:]) == (16, 16)


def test_left_out_counts_survive_subsets_and_add_up_when_joined(site: Path) -> None:
    from common.data.catalog import Catalog

    catalog = load_catalog("dicom", site, TASK)
    assert catalog.subset([0, 1]).left_out == catalog.left_out
    joined = Catalog.concat([catalog, load_catalog("dicom", site, TASK, name="b")])
    assert joined.left_out == {"modality CT not selected": 2, "multi-frame object": 2}
