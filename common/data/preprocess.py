"""Preprocessing options known to reduce shortcut learning, applied the same everywhere.

- ``preprocess-equalize = true``: global histogram equalisation of each image after it is
  resized to the model's size (:func:`equalize_images`, Pillow's ``ImageOps.equalize``), so
  the grey-level distribution no longer tells which scanner or source an image came from.
  It is applied by :class:`common.data.dataset.CxrDataset` (training, validation, distillation,
  the study's scoring), by ``cxr-fl-client evaluate`` and by the exported model's preprocessing
  (``equalize`` in ``<model>.preprocessing.json``, applied by :class:`common.export.Preprocessing`
  after the resize), so training, evaluation and inference see identical inputs.
  CLAHE (local equalisation) would need scikit-image or OpenCV, which are not dependencies.
- ``augment = "strong"``: wider geometry (rotation, scale, shift) and intensity (contrast,
  brightness, gamma) jitter at training time only (:data:`common.data.dataset.AUGMENT_PRESETS`).

Lung-field cropping or masking is not offered: it needs a lung segmentation model, and no
installed, well-kept package ships one that works offline.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

EQUALIZE_METHOD = "global histogram equalisation (Pillow ImageOps.equalize) of the resized 8-bit image"


def equalize_images(images: np.ndarray) -> np.ndarray:
    """Histogram-equalise uint8 ``[S, S]`` or ``[N, S, S]`` images, each on its own histogram.

    Pillow leaves an image unchanged when it has too few pixels for its 256-level table (about
    256 pixels, i.e. 16 x 16); every image size a real run uses is far above that.
    """
    array = np.asarray(images, dtype=np.uint8)
    if array.ndim == 2:
        return np.asarray(ImageOps.equalize(Image.fromarray(array, mode="L")), dtype=np.uint8)
    out = np.empty_like(array)
    for k, image in enumerate(array):
        out[k] = np.asarray(ImageOps.equalize(Image.fromarray(np.ascontiguousarray(image), mode="L")))
    return out
