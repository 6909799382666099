"""ONNX / TorchScript export, ONNX Runtime parity, preprocessing JSON and the ONNX predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ModelConfig
from common.data.cache import build_cache, resize_square
from common.data.dataset import CxrDataset, normalise
from common.data.readers import decode_image_file
from common.data.sources import load_catalog
from common.data.synthetic import render_synthetic_cxr
from common.errors import ModelError
from common.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxPredictor,
    Preprocessing,
    check_onnx_parity,
    export_onnx,
    export_torchscript,
    make_session,
    measure_latency,
    preprocessing_path,
    read_preprocessing,
    run_session,
    write_preprocessing,
)
from common.models import build_model
from common.tasks import get_task

SIZE = 32
TASK = get_task("normal-pneumonia-covid")


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mobilenetv2", width_mult=0.35), TASK.num_classes).eval()


@pytest.fixture(scope="module")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Normalised synthetic CXR-like images from the cache, as the dataset serves them."""
    catalog = load_catalog("synthetic", None, TASK, options={"n-images": 6, "image-size": 48})
    cached = build_cache(catalog, SIZE, tmp_path_factory.mktemp("cache"))
    dataset = CxrDataset(cached, np.arange(len(cached)))
    return torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()


def test_onnx_matches_pytorch_on_real_images_with_dynamic_batch(
    tmp_path: Path, real_images: np.ndarray
) -> None:
    model = _student()
    path = export_onnx(model, tmp_path / "student.onnx", SIZE)
    diff = check_onnx_parity(model, path, real_images)
    assert 0.0 <= diff < 1e-4
    session = make_session(path)
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    with torch.no_grad():
        expected = model(torch.from_numpy(real_images)).numpy()
    for batch in (1, 4):  # dynamic batch axis
        got = run_session(session, real_images[:batch])
        assert got.shape == (batch, TASK.num_classes)
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4)
    assert model.training is False


def test_parity_check_refuses_a_mismatched_model(tmp_path: Path, real_images: np.ndarray) -> None:
    path = export_onnx(_student(0), tmp_path / "a.onnx", SIZE)
    other = _student(1)
    with torch.no_grad():  # make sure the two really differ
        other.classifier[-1].bias.add_(1.0)
    with pytest.raises(ModelError, match=r"a\.onnx. disagrees with PyTorch"):
        check_onnx_parity(other, path, real_images)


def test_torchscript_gives_the_same_logits(tmp_path: Path, real_images: np.ndarray) -> None:
    model = _student()
    path = export_torchscript(model, tmp_path / "student.torchscript.pt", SIZE)
    loaded = torch.jit.load(str(path))
    x = torch.from_numpy(real_images)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_preprocessing_json_round_trip(tmp_path: Path) -> None:
    prep = Preprocessing.for_task(TASK, SIZE)
    model_path = tmp_path / "student.onnx"
    written = write_preprocessing(prep, model_path)
    assert written == tmp_path / "student.preprocessing.json" == preprocessing_path(model_path)
    data = json.loads(written.read_text())
    assert data["image_size"] == SIZE
    assert data["classes"] == ["normal", "pneumonia", "covid-19"]
    assert (data["mean"], data["std"]) == (0.5, 0.25)
    assert data["activation"] == "softmax"
    assert data["task_kind"] == "multiclass"
    assert data["input_name"] == "image"
    assert data["output_name"] == "logits"
    assert data["greyscale"] is True
    assert data["scale"] == pytest.approx(1 / 255)
    assert "shorter side" in data["resize"]
    assert data["resize_version"].startswith("gray-shorter-side")
    assert read_preprocessing(model_path) == prep


def test_missing_preprocessing_names_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"expected '.*model\.preprocessing\.json' beside it"):
        read_preprocessing(tmp_path / "model.onnx")


def test_multilabel_probabilities_are_sigmoids() -> None:
    prep = Preprocessing.for_task(get_task("nih14"), SIZE)
    logits = np.array([[0.0, 2.0, -3.0] + [0.0] * 11])
    np.testing.assert_allclose(prep.probabilities(logits), 1.0 / (1.0 + np.exp(-logits)))
    multi = Preprocessing.for_task(TASK, SIZE).probabilities(np.array([[1.0, 2.0, 3.0]]))
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(multi[0], e / e.sum())


def test_predictor_preprocesses_files_like_the_cache_and_matches_pytorch(tmp_path: Path) -> None:
    model = _student()
    path = export_onnx(model, tmp_path / "student.onnx", SIZE)
    write_preprocessing(Preprocessing.for_task(TASK, SIZE), path)
    image_file = tmp_path / "x.png"
    Image.fromarray(render_synthetic_cxr("pneumonia", 3, 61)[:, 5:56]).save(image_file)  # not square
    # The training path, done by hand: decode, cache geometry, dataset normalisation.
    grey = resize_square(decode_image_file(image_file), SIZE)
    x = normalise(np.array(grey))[None, None]
    with torch.no_grad():
        expected = torch.softmax(model(x).double(), dim=1)[0].numpy()
    predictor = OnnxPredictor(path)
    (prediction,) = predictor.predict_files([image_file])
    got = np.array([prediction.probabilities[c] for c in TASK.classes])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert prediction.top_class == TASK.classes[int(expected.argmax())]


def test_predictor_reports_unreadable_files(tmp_path: Path) -> None:
    path = export_onnx(_student(), tmp_path / "student.onnx", SIZE)
    write_preprocessing(Preprocessing.for_task(TASK, SIZE), path)
    good = tmp_path / "good.png"
    Image.fromarray(render_synthetic_cxr("normal", 1, SIZE)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    results = OnnxPredictor(path).predict_files([bad, good])
    assert [r.path for r in results] == [bad, good]
    assert results[0].probabilities is None
    assert "cannot decode" in (results[0].error or "")
    assert results[1].error is None
    assert sum(results[1].probabilities.values()) == pytest.approx(1.0)


def test_predictor_refuses_preprocessing_of_another_model(tmp_path: Path) -> None:
    path = export_onnx(_student(), tmp_path / "student.onnx", SIZE)
    write_preprocessing(Preprocessing.for_task(get_task("normal-pneumonia"), SIZE), path)
    with pytest.raises(ModelError, match="3 outputs but its preprocessing file lists 2 classes"):
        OnnxPredictor(path)


def test_measure_latency_counts_runs() -> None:
    calls: list[int] = []
    latency = measure_latency(lambda: calls.append(1), repeats=7, warmup=2)
    assert len(calls) == 9
    assert latency.repeats == 7
    assert len(latency.runs_ms) == 7
    assert latency.median_ms == pytest.approx(float(np.median(latency.runs_ms)))
    with pytest.raises(ModelError):
        measure_latency(lambda: None, repeats=0)
