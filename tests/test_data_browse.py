"""`m2det browse-data` writes the asked number of drawn samples, and bad sources are one-line errors."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from m2det.cli.main import app


def _browse(root, out):
    """Three validation samples at 96 pixels, seed 1."""
    args = ["browse-data", str(root), "--split", "val", "--num", "3", "--out", str(out)]
    return CliRunner().invoke(app, [*args, "--size", "96", "--seed", "1"])


def test_browse_data_writes_n_images(bccd_root, tmp_path):
    out = tmp_path / "look"
    result = _browse(bccd_root, out)
    assert result.exit_code == 0, result.output
    written = sorted(out.glob("*.png"))
    assert len(written) == 3 and str(out.resolve()) in result.output
    assert written[0].name.startswith("00_BloodImage_")
    for path in written:
        with Image.open(path) as image:
            assert image.size == (96, 96) and image.mode == "RGB"
    again = tmp_path / "again"
    _browse(bccd_root, again)
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in sorted(again.glob("*.png"))]


def test_browse_data_bad_source_is_an_error(tmp_path):
    result = CliRunner().invoke(app, ["browse-data", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "error:" in result.output and "missing.yaml" in result.output
