"""``cxr-fl-client check``: counts per class, unreadable files, exit codes."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from client.cli import app
from tests.common.data.helpers import write_image

runner = CliRunner()


def _site(root: Path) -> Path:
    for i in range(3):
        write_image(root / "NORMAL" / f"IM-000{i}-0001.png", seed=i)
    for i in range(2):
        write_image(root / "PNEUMONIA" / f"person{i}_virus_{i}.png", seed=10 + i)
    (root / "PNEUMONIA" / "person9_bacteria_9.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_check_prints_counts_and_unreadable(tmp_path: Path) -> None:
    data = _site(tmp_path / "site")
    args = ["check", "--data", str(data), "--format", "image-folder", "--task", "normal-pneumonia"]
    result = runner.invoke(app, [*args, "--image-size", "16", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "5 readable images" in out
    assert "normal" in out
    assert "│ normal    │      3 │" in out
    assert "│ pneumonia │      2 │" in out
    assert "unreadable files │ 1" in out


def test_check_user_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    data = _site(tmp_path / "site")
    base = ["check", "--format", "image-folder", "--cache-dir", str(tmp_path / "c")]
    strict = runner.invoke(app, [*base, "--data", str(data), "--task", "normal-pneumonia", "--strict"])
    assert strict.exit_code == 2
    assert "person9_bacteria_9.jpeg" in strict.output
    assert "Traceback" not in strict.output
    missing = runner.invoke(app, [*base, "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "does not exist" in missing.output
    bad_format = runner.invoke(app, ["check", "--data", str(data), "--format", "nifti"])
    assert bad_format.exit_code == 2
    assert "image-folder" in bad_format.output


def test_check_synthetic_needs_no_data(tmp_path: Path) -> None:
    args = ["check", "--format", "synthetic", "-o", "n-images=12", "--image-size", "16"]
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "12 readable images" in result.stdout
