"""DICOM sites: a folder of PACS exports (``.dcm``) plus a ``labels.csv``, read with pydicom.

Layout
    ``FOLDER`` holds DICOM files at any depth: ``*.dcm`` / ``*.dicom`` / ``*.dic``, and files of
    any other name that carry the DICOM Part 10 preamble (``DICM`` at byte 128), as PACS exports
    often have no extension. ``FOLDER/labels.csv`` has a ``path`` column (relative to FOLDER) and,
    for a multi-class task, a ``label`` column (a task class or a label mapped by ``label-map``;
    the manifest's table applies, so ``NORMAL`` / ``PNEUMONIA`` work as they are). A multi-label
    task reads one column per finding (``1`` positive, ``0`` negative, blank or ``-1`` unknown)
    or, without such columns, ``label`` with ``|``-separated findings as a manifest does. An
    optional ``patient`` column overrides the header's PatientID.

Selection (:func:`inspect_dicom`): only what a chest radiograph classifier can use is kept, and
every file left out is counted under its reason (``Catalog.left_out``, printed by
``cxr-fl-client check``), never dropped silently:

- unreadable: not DICOM, damaged, or no pixel data (a report, a presentation state, ...);
- modality not in ``modalities`` (default ``CR,DX``; CT, MR, ... are left out);
- BodyPartExamined present and not in ``body-parts`` (default ``CHEST``; absent is accepted);
- multi-frame objects (NumberOfFrames > 1);
- colour images, and stored values outside 8-16 bits;
- encapsulated (compressed) pixel data whose transfer syntax no installed plugin decodes
  (pylibjpeg-openjpeg decodes JPEG 2000, python-gdcm JPEG baseline / extended / lossless and
  JPEG-LS, pylibjpeg-rle or pydicom itself RLE);
- with ``views=PA,AP``: a ViewPosition not listed, or none at all;
- files without a row in labels.csv.

Pixel pipeline (:func:`dicom_to_grey`), as a radiologist's viewer renders the image:

1. stored values, decoded by pydicom (any of the transfer syntaxes above; 8-16 bit, signed or
   not);
2. the modality LUT: Rescale Slope / Intercept or a Modality LUT Sequence
   (``pydicom.pixels.apply_modality_lut``);
3. the VOI LUT: the first VOI LUT Sequence item, else the first Window Center / Width pair with
   its VOI LUT Function (``pydicom.pixels.apply_voi_lut``); output scaled from that transform's
   own output range to [0, 1]. Without either, the image's full value range is scaled to [0, 1];
4. polarity: MONOCHROME1 (low values are white) and Presentation LUT Shape ``INVERSE`` are
   inverted once, so that bone is bright as in MONOCHROME2. In the DX and CR IODs a MONOCHROME1
   image carries ``INVERSE`` to say the same thing, so the two together invert once, not twice;
5. rounding to uint8; the image cache then resizes as for any other format (shorter side to
   the image size, centre crop).

Steps 2-5 map each stored value to one grey level, so they are computed once per stored value
in the image's range and applied as a lookup table, as viewers do (:func:`render_values`).

Privacy: patient names, identifiers and every other header value stay inside this module. The
catalog's ``patient_id`` is a pseudonym (HMAC-SHA-256 of the PatientID or ``patient`` cell, keyed
by a hash of all the folder's patient identifiers and its labels.csv), so caches, manifests and
replies carry nothing an outsider can link back to a patient; pseudonyms stay the same while
the folder's patients and labels.csv do. Only values of the standard's small vocabularies
(modality, view, photometric interpretation, transfer syntax) appear in reasons, logs and the
check's table, and only when they are among the known defined terms.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom", ".dic"})
DEFAULT_MODALITIES: tuple[str, ...] = ("CR", "DX")
DEFAULT_BODY_PARTS: tuple[str, ...] = ("CHEST",)

DICOM_OPTIONS: dict[str, str] = {
    "modalities": "Modality values to keep, comma-separated (default CR,DX)",
    "body_parts": "BodyPartExamined values to keep; images without one are kept (default CHEST)",
    "views": "ViewPosition values to keep, e.g. 'PA,AP' (default: all, including none)",
}
DICOM_DESCRIPTION = "DICOM files (.dcm or DICM preamble, any depth) + labels.csv (path,label[,patient])"

# Defined terms that may be shown (reasons, view counts); anything else is shown as "other".
KNOWN_MODALITIES: frozenset[str] = frozenset(
    {"CR", "DX", "DR", "MG", "CT", "MR", "PT", "NM", "US", "XA", "RF", "OT", "SC", "IO", "PX"}
    | {"RG", "ES", "SR", "PR", "KO", "SEG", "DOC"}
)
KNOWN_VIEWS: frozenset[str] = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LATERAL"})
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
KNOWN_PHOTOMETRIC: frozenset[str] = frozenset(
    {*MONOCHROME, "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}
)
_HEADER_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsStored",
    "PatientID",
)


def _shown(value: object, known: frozenset[str]) -> str:
    """A header value fit for a log or a table: a known defined term, else ``other``."""
    text = str(value or "").strip().upper()
    return text if text in known else "other"


# ----------------------------------------------------------------------------- files


def has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` carries the DICOM Part 10 marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by its extension, or any other file by its preamble."""
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path)


def find_dicom_files(root: Path) -> list[Path]:
    """DICOM files under ``root`` at any depth (sorted; hidden files and folders skipped)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name == LABELS_FILE:
                continue
            path = Path(folder) / name
            if is_dicom_file(path):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class _Silenced(logging.Filter):
    """Drops pydicom's own log records: its messages can quote header values."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


_PYDICOM_READY = False


def _pydicom() -> Any:
    """Import pydicom once, with its logger silenced (see :class:`_Silenced`)."""
    global _PYDICOM_READY
    import pydicom

    if not _PYDICOM_READY:
        logging.getLogger("pydicom").addFilter(_Silenced())
        _PYDICOM_READY = True
    return pydicom


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns with the offending value quoted (e.g. an invalid date): keep those quiet.

    Values are converted, and checked, when an element is first accessed, so header access
    happens inside this context too, not only ``dcmread``.
    """
    _pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read(path: Path, *, header_only: bool) -> Dataset:
    """``dcmread`` (call inside :func:`_quiet`)."""
    pydicom = _pydicom()
    if header_only:
        # Large values (the pixel data) are deferred: present, but not read.
        return pydicom.dcmread(path, defer_size="4 KB")
    return pydicom.dcmread(path)


# ----------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """Which DICOM objects a site keeps (upper-case defined terms); ``views`` None keeps all."""

    modalities: frozenset[str]
    body_parts: frozenset[str]
    views: frozenset[str] | None


@dataclass(frozen=True)
class DicomObject:
    """What the catalog keeps of a selected file's header (``patient`` is raw: internal only)."""

    view: str | None
    modality: str
    patient: str | None


def _decoder_available(transfer_syntax: Any) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def inspect_dicom(path: Path, selection: Selection) -> tuple[DicomObject | None, str]:
    """Read a file's header; the object to keep, or None and the reason it is left out.

    Reasons name only defined terms (see the module docstring), never a free-text value.
    """
    try:
        with _quiet():
            ds = _read(path, header_only=True)
            meta = getattr(ds, "file_meta", None)
            transfer_syntax = meta.get("TransferSyntaxUID") if meta is not None else None
            header = {tag: ds.get(tag) for tag in _HEADER_TAGS}
            has_pixels = "PixelData" in ds
    except Exception:  # pydicom raises many types (InvalidDicomError, OSError, struct errors ...)
        return None, "unreadable (not DICOM, or damaged)"
    if not has_pixels:
        return None, "no pixel data (not an image)"
    modality = str(header["Modality"] or "").strip().upper()
    if modality not in selection.modalities:
        return None, f"modality {_shown(modality, KNOWN_MODALITIES)} not selected"
    body_part = str(header["BodyPartExamined"] or "").strip().upper()
    if body_part and body_part not in selection.body_parts:
        return None, "body part not selected"
    try:
        frames = int(header["NumberOfFrames"] or 1)
        samples = int(header["SamplesPerPixel"] or 1)
        bits = int(header["BitsStored"] or 0)
    except (TypeError, ValueError):
        return None, "unreadable (not DICOM, or damaged)"
    if frames > 1:
        return None, "multi-frame object"
    photometric = str(header["PhotometricInterpretation"] or "").strip().upper()
    if samples != 1 or photometric not in MONOCHROME:
        return None, f"not greyscale ({_shown(photometric, KNOWN_PHOTOMETRIC)})"
    if not 8 <= bits <= 16:
        return None, "stored values outside 8-16 bits"
    if transfer_syntax is None:
        return None, "unreadable (no transfer syntax)"
    if transfer_syntax.is_compressed and not _decoder_available(transfer_syntax):
        name = transfer_syntax.name if transfer_syntax.is_transfer_syntax else "private transfer syntax"
        return None, f"compressed ({name}) without a decoder"
    view_raw = str(header["ViewPosition"] or "").strip().upper()
    view = _shown(view_raw, KNOWN_VIEWS) if view_raw else None
    if selection.views is not None:
        if not view_raw:
            return None, "no ViewPosition (views option given)"
        if view_raw not in selection.views:
            return None, f"view {view} not selected"
    patient = str(header["PatientID"] or "").strip() or None
    return DicomObject(view, _shown(modality, KNOWN_MODALITIES), patient), ""


# ----------------------------------------------------------------------------- pixels


def _voi_lut_range(ds: Dataset) -> tuple[float, float]:
    """Smallest and largest output of the first VOI LUT Sequence item."""
    from pydicom.pixels import apply_voi

    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries = int(descriptor[0]) or 2**16
    first = int(descriptor[1])
    out = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, 0)
    return float(out.min()), float(out.max())


def _window_range(ds: Dataset) -> tuple[float, float]:
    """Output range of the first window: what values far below and above it map to."""
    from pydicom.pixels import apply_windowing

    with np.errstate(over="ignore", invalid="ignore"):
        out = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
    return float(out[0]), float(out[1])


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def dicom_to_grey(ds: Dataset) -> np.ndarray:
    """A DICOM image as a viewer shows it, as 2-D uint8 with bone bright (steps: module docstring).

    Every step maps one stored value to one output value, so, as viewers do, the steps run once
    over the image's range of stored values (at most 65,536 of them) and the image is then
    looked up in that table: one pass over the pixels instead of several in floating point.

    Raises:
        ValueError: not one greyscale frame of integers. Decoder errors propagate from pydicom.
    """
    stored = ds.pixel_array
    if stored.ndim != 2 or stored.dtype.kind not in "iu":
        raise ValueError(f"expected one greyscale frame of integers, decoded {stored.dtype} {stored.shape}")
    low, high = int(stored.min()), int(stored.max())
    offsets = stored if low == 0 and stored.dtype.kind == "u" else np.subtract(stored, low, dtype=np.int64)
    present = None
    if not (_has_voi_lut(ds) or _has_window(ds)):  # the full-range fallback needs the values present
        present = np.bincount(offsets.ravel(), minlength=high - low + 1) > 0
    table = render_values(np.arange(low, high + 1, dtype=np.int64), ds, present)
    return np.ascontiguousarray(table[offsets])


def render_values(stored: np.ndarray, ds: Dataset, present: np.ndarray | None = None) -> np.ndarray:
    """Steps 2-5 of the module docstring for 1-D stored values: uint8 grey levels.

    ``present`` marks the values that occur in the image; without a usable VOI LUT or window,
    the range of their modality outputs is stretched to 0-255 (all of ``stored`` when None).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(stored, ds)
    out: np.ndarray | None = None
    if _has_voi_lut(ds):
        as_int = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        out = apply_voi(as_int, ds, 0).astype(np.float64)
        lo, hi = _voi_lut_range(ds)
    elif _has_window(ds):
        try:
            out = apply_windowing(values.astype(np.float64), ds, 0)
            lo, hi = _window_range(ds)
        except ValueError:  # a width below 1 or an unknown VOI LUT Function: no usable window
            out = None
    if out is None:
        out = values.astype(np.float64)
        shown = out if present is None else out[present]
        lo, hi = float(shown.min()), float(shown.max())
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    invert = photometric == "MONOCHROME1" or shape == "INVERSE"
    if hi <= lo:
        return np.full(out.shape, 255 if invert else 0, dtype=np.uint8)
    scaled = np.clip((out - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
    if invert:
        scaled = 255.0 - scaled
    return np.rint(scaled).astype(np.uint8)


def decode_dicom_file(path: Path) -> np.ndarray:
    """Read and render one DICOM file (see :func:`dicom_to_grey`); DataError naming the file.

    The error says what failed, never a header value.
    """
    try:
        with _quiet():
            return dicom_to_grey(_read(path, header_only=False))
    except FileNotFoundError:
        raise DataError(f"DICOM file {path} does not exist; check the data folder or the manifest") from None
    except Exception as exc:  # pydicom and its plugins raise many unrelated types
        raise DataError(
            f"cannot decode DICOM {path} ({type(exc).__name__}). Re-export the file, install a "
            "decoder for its transfer syntax (pylibjpeg plugins, python-gdcm), or run without --strict "
            "to skip it"
        ) from None
