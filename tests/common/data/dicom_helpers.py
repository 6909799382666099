"""Tiny DICOM files written with pydicom, and a DICOM site folder for the ``dicom`` source tests.

Every image is a dark field with a bright square in the middle ("bone"); stored values are
written so that a correct viewer pipeline shows the square bright whatever the photometric
interpretation, presentation LUT shape, rescale, window or VOI LUT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from tests.common.data.helpers import write_csv

# Header values that must never leave the dicom module (names, ids, institution, free text).
SECRET_VALUES = (
    "Quixotic^Zanzibar",
    "ZBR-MRN-48151623",
    "QKA-MRN-99887766",
    "St Quokka Infirmary of Xylophones",
    "Dr Wombat Phlange",
    "ACC-XYZZY-31337",
    "Snorkel ward",
)
SHAPE = (20, 24)

_SOP_CLASS = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CT": CTImageStorage,
}


def bone_image(seed: int, low: float = 0.1, high: float = 0.8) -> np.ndarray:
    """Fractions in [0, 1]: background ``low`` with noise, the centre square ``high``."""
    rng = np.random.default_rng(seed)
    img = np.full(SHAPE, low) + rng.uniform(0.0, 0.05, SHAPE)
    img[6:14, 8:16] = high + rng.uniform(0.0, 0.05, (8, 8))
    return img


def centre_is_bright(grey: np.ndarray) -> bool:
    """The bone square is brighter than the border, as a viewer shows it."""
    h, w = grey.shape
    centre = grey[int(h * 0.35) : int(h * 0.65), int(w * 0.38) : int(w * 0.62)].mean()
    border = np.concatenate([grey[:2].ravel(), grey[-2:].ravel()]).mean()
    return bool(centre > border + 40)


def write_dicom(
    path: Path,
    *,
    seed: int = 0,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    patient_id: str = "ZBR-MRN-48151623",
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    frames: int = 1,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    inverse_shape: bool = False,
    voi_lut: bool = False,
    rle: bool = False,
    signed: bool = False,
) -> Path:
    """Write one DICOM file; stored values span most of ``bits`` and render bone-bright."""
    fraction = bone_image(seed)
    if photometric == "MONOCHROME1" or inverse_shape:
        fraction = 1.0 - fraction  # high stored value = dark: the pipeline must invert
    top = 2**bits - 1
    stored = np.rint(fraction * top).astype(np.int64)
    if signed:
        stored -= 2 ** (bits - 1)
    dtype = (np.int16 if signed else np.uint16) if bits > 8 else np.uint8
    pixels = stored.astype(dtype)
    if frames > 1:
        pixels = np.stack([pixels] * frames)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = _SOP_CLASS.get(modality, ComputedRadiographyImageStorage)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = SECRET_VALUES[0]
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19010203"
    ds.InstitutionName = SECRET_VALUES[3]
    ds.ReferringPhysicianName = SECRET_VALUES[4]
    ds.AccessionNumber = SECRET_VALUES[5]
    ds.StudyDescription = SECRET_VALUES[6]
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = SHAPE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if inverse_shape:
        ds.PresentationLUTShape = "INVERSE"
    if voi_lut:
        item = Dataset()
        entries = top + 1
        # A gamma curve over the whole stored range, 16-bit output.
        curve = np.rint((np.arange(entries) / top) ** 0.7 * 65535).astype(np.uint16)
        item.add_new(0x00283002, "US", [entries if entries < 65536 else 0, 0, 16])  # LUT Descriptor
        item.add_new(0x00283006, "OW", curve.tobytes())  # LUT Data
        ds.VOILUTSequence = Sequence([item])
    ds.PixelData = pixels.tobytes()
    if rle:
        ds.compress(RLELossless, pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_site(root: Path) -> Path:
    """4 normal + 4 pneumonia CR/DX images, a CT slice and a multi-frame object, with labels.csv.

    Two normal images share a patient; one file has no extension (found by its preamble); one is
    RLE-compressed; MONOCHROME1 / MONOCHROME2, 8 / 12 / 16 bits, window, rescale, VOI LUT and
    Presentation LUT Shape INVERSE all occur.
    """
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("normal/n0.dcm", "NORMAL", {"seed": 0, "window": (2048, 4096)}),
        (
            "normal/deep/er/n1.dcm",
            "NORMAL",
            {
                "seed": 1,
                "modality": "DX",
                "photometric": "MONOCHROME1",
                "bits": 16,
                "view": "AP",
                "body_part": None,
            },
        ),
        ("normal/n2", "NORMAL", {"seed": 2, "modality": "DX", "patient_id": "QKA-MRN-99887766"}),
        (
            "normal/n3.dcm",
            "NORMAL",
            {
                "seed": 3,
                "bits": 16,
                "rescale": (2.0, -100.0),
                "window": (65435, 131070),
                "rle": True,
                "patient_id": "P3",
            },
        ),
        (
            "pneumonia/p0.dcm",
            "PNEUMONIA",
            {"seed": 4, "photometric": "MONOCHROME1", "window": (2048, 4096), "patient_id": "P4"},
        ),
        (
            "pneumonia/p1.dcm",
            "PNEUMONIA",
            {"seed": 5, "modality": "DX", "bits": 16, "inverse_shape": True, "patient_id": "P5"},
        ),
        ("pneumonia/p2.dcm", "PNEUMONIA", {"seed": 6, "bits": 8, "view": "AP", "patient_id": "P6"}),
        ("pneumonia/p3.dcm", "PNEUMONIA", {"seed": 7, "modality": "DX", "voi_lut": True, "patient_id": "P7"}),
        (
            "other/ct.dcm",
            "NORMAL",
            {
                "seed": 8,
                "modality": "CT",
                "bits": 16,
                "signed": True,
                "rescale": (1.0, -1024.0),
                "patient_id": "P8",
            },
        ),
        ("other/multi.dcm", "PNEUMONIA", {"seed": 9, "modality": "DX", "frames": 3, "patient_id": "P9"}),
    ]
    rows = []
    for rel, label, kwargs in specs:
        write_dicom(root / rel, **kwargs)
        rows.append((rel, label))
    write_csv(root / "labels.csv", ["path", "label"], rows)
    return root
