"""Options against shortcut learning: histogram equalisation and the strong augmentation preset.

Equalisation must reach the model identically at training, at evaluation and in the exported
model (its preprocessing JSON), so the tests compare the three paths image by image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from common.data.dataset import AUGMENT_PRESETS, AugmentConfig
from common.data.preprocess import equalize_images
from common.data.sources.manifest import record_path
from common.data.synthetic import render_synthetic_cxr
from common.errors import ConfigError, ModelError
from common.export import OnnxPredictor, Preprocessing, load_torch_model
from common.local import load_eval_dataset, load_site_data, site_data_request
from common.run_settings import run_settings_from_config

SIZE = 32
FOLDERS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA", "covid-19": "COVID"}


def _settings(**changes: object) -> object:
    return run_settings_from_config(
        {
            "task": "normal-pneumonia-covid",
            "image-size": SIZE,
            "teacher-name": "tiny-cnn",
            "kd-width-mult": 0.35,
            **changes,
        }
    )


def _folder(root: Path) -> Path:
    """Labelled image files with a narrow grey range (what equalisation stretches)."""
    for label, folder in FOLDERS.items():
        target = root / folder
        target.mkdir(parents=True)
        for i in range(5):
            image = render_synthetic_cxr(label, i, 44).astype(np.float32)
            narrow = (90 + image * 0.3).astype(np.uint8)  # grey levels 90..166
            Image.fromarray(narrow).save(target / f"{label}_{i}.png")
    return root


def test_equalize_images_is_pillows_equalisation_per_image() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(100, 140, size=(3, 32, 32), dtype=np.uint8)

    out = equalize_images(images)

    assert out.dtype == np.uint8
    assert out.shape == images.shape
    for k in range(3):
        expected = np.asarray(ImageOps.equalize(Image.fromarray(images[k], mode="L")))
        np.testing.assert_array_equal(out[k], expected)
    assert int(out.max()) - int(out.min()) > 200  # a 40-level range spread over nearly the whole scale
    np.testing.assert_array_equal(equalize_images(images[0]), out[0])


def test_training_evaluation_and_export_see_identical_inputs(tmp_path: Path) -> None:
    from client.export import EdgeExportOptions, export_site_student
    from client.site import SiteConfig
    from common.evaluation import load_scoring_model, score_images
    from common.local import DistillOutcome, build_loaded_model, student_config
    from common.models import build_model

    data_dir = _folder(tmp_path / "data")
    settings = _settings(**{"preprocess-equalize": True})
    request = site_data_request(settings.run, settings.task, "image-folder", data_dir, tmp_path / "cache")
    assert request.equalize
    data = load_site_data(request)
    site = SiteConfig("site_a", data_dir, "image-folder", tmp_path / "out", tmp_path / "cache", None)
    torch.manual_seed(0)
    teacher = build_loaded_model(settings.teacher, settings.task, None).eval()
    student = build_model(student_config(settings.distill, settings.teacher, settings.teacher.norm), 3).eval()
    metrics = {"teacher_auroc_macro": 0.9, "student_auroc_macro": 0.85}
    export_site_student(
        site,
        settings,
        data,
        DistillOutcome(student, teacher, dict(metrics)),
        metrics,
        teacher_epsilon=None,
        options=EdgeExportOptions(latency_repeats=2, parity_images=4),
    )
    folder = tmp_path / "out" / "student"
    prep = json.loads((folder / "student.preprocessing.json").read_text())
    assert prep["equalize"] is True
    assert "ImageOps.equalize" in prep["equalize_method"]
    assert json.loads((folder / "student.pt.json").read_text())["equalize"] is True
    assert load_torch_model(folder / "student.pt").preprocessing.equalize

    # training and the study's scoring: the dataset over the cache
    whole = load_eval_dataset(
        site_data_request(
            settings.run, settings.task, "image-folder", data_dir, tmp_path / "cache", whole=True
        )
    )
    trained_on = torch.stack([whole[i][0] for i in range(len(whole))])
    with torch.no_grad():
        expected = torch.softmax(student(trained_on).double(), dim=1).numpy()
    # inference: the exported ONNX model and its preprocessing, from the image files
    catalog = load_site_data(request).cached.catalog
    files = [record_path(catalog, record) for record in catalog.records]
    predicted = OnnxPredictor(folder / "student.onnx").predict_files(files)
    onnx = np.array([[p.probabilities[c] for c in settings.task.classes] for p in predicted])
    np.testing.assert_allclose(onnx, expected, atol=1e-5)
    # cxr-fl-client evaluate: the scoring model opened from the export, on the cached images
    for model_path in (folder / "student.onnx", folder / "student.pt"):
        scoring = load_scoring_model(model_path)
        assert scoring.equalize
        scored = score_images(scoring, np.asarray(load_site_data(request).cached.images))
        np.testing.assert_allclose(scored, expected, atol=1e-5)
    # and equalisation changed what the model sees
    plain = Preprocessing.for_task(settings.task, SIZE).load_image(files[0])
    assert not np.allclose(plain, trained_on[0].numpy())


def test_equalisation_is_off_by_default_and_old_preprocessing_files_still_load() -> None:
    settings = _settings()
    assert not settings.run.preprocess_equalize
    prep = Preprocessing.for_task(settings.task, SIZE)
    data = prep.to_dict()
    assert data["equalize"] is False
    del data["equalize"], data["equalize_method"]  # a file written before the option existed
    assert Preprocessing.from_dict(data).equalize is False


def test_the_augment_setting_picks_the_preset_for_training_only(tmp_path: Path) -> None:
    data_dir = _folder(tmp_path / "data")
    for choice in ("default", "strong"):
        settings = _settings(augment=choice)
        request = site_data_request(settings.run, settings.task, "image-folder", data_dir, tmp_path / "cache")
        data = load_site_data(request)
        assert data.dataset("train", augment=True).config == AUGMENT_PRESETS[choice]
    strong, default = AUGMENT_PRESETS["strong"], AugmentConfig()
    assert AUGMENT_PRESETS["default"] == default
    for name in ("max_rotation", "max_scale", "max_shift", "intensity"):
        assert getattr(strong, name) > getattr(default, name)
    assert strong.hflip_probability == 0.0  # a flip still shows a situs the model should not learn
    # evaluation never augments, whatever the preset
    item = data.dataset("val")
    assert not item.augment


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"augment": "wild"}, "augment"),
        ({"augment": ""}, "augment"),
        ({"preprocess-equalize": "yes"}, "preprocess-equalize"),
        ({"preprocess-equalize": 1}, "preprocess-equalize"),
    ],
)
def test_bad_values_are_refused_in_one_line(changes: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        _settings(**changes)
    assert "\n" not in str(caught.value)


def test_a_preprocessing_file_with_a_bad_equalize_value_is_refused() -> None:
    data = Preprocessing.for_task(_settings().task, SIZE).to_dict()
    data["equalize"] = "yes"
    with pytest.raises(ModelError, match="equalize"):
        Preprocessing.from_dict(data, "preprocessing file 'x.json'")
