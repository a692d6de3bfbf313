"""`m2det export`: a model as ONNX or an OpenVINO IR (either optionally INT8) or TorchScript,
checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from m2det.cli.common import user_errors
from m2det.errors import M2DetError

FORMATS = ("onnx", "torchscript", "openvino")


def register(app: typer.Typer) -> None:
    app.command("export")(export)


@user_errors
def export(
    output: Path = typer.Argument(..., help="File to write (.onnx, .pt, or .xml: OpenVINO, with its .bin)."),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        help="Our .safetensors model, or an official .pth with --preset. None: random weights.",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Architecture of an official .pth (or of random weights)."
    ),
    fmt: Optional[str] = typer.Option(
        None, "--format", help="onnx, torchscript or openvino (default: openvino for a .xml file, else onnx)."
    ),
    size: Optional[int] = typer.Option(None, "--size", min=32, help="Input size (default: the model's)."),
    nms: bool = typer.Option(False, "--nms/--no-nms", help="Add per-class hard NMS to the graph."),
    nms_score: float = typer.Option(0.05, "--nms-score", min=0.0, max=1.0, help="NMS score threshold."),
    nms_iou: float = typer.Option(0.45, "--nms-iou", min=0.0, max=1.0, help="NMS IoU threshold."),
    nms_max: int = typer.Option(50, "--nms-max-per-class", min=1, help="Boxes kept per image and class."),
    int8: bool = typer.Option(
        False, "--int8", help="ONNX (ONNX Runtime) or OpenVINO (NNCF): static INT8 quantisation for the CPU."
    ),
    calib_data: Optional[str] = typer.Option(
        None, "--calib-data", help="--int8: calibration data (COCO .json, VOC folder or YOLO .yaml)."
    ),
    calib_split: str = typer.Option("train", "--calib-split", help="--int8: VOC image set / YOLO split."),
    calib_num: int = typer.Option(300, "--calib-num", min=1, help="--int8: calibration images."),
    calib_method: str = typer.Option(
        "minmax",
        "--calib-method",
        help="--int8, ONNX: activation ranges by minmax, percentile or entropy (OpenVINO: NNCF's, minmax).",
    ),
    float_heads: bool = typer.Option(
        False, "--float-heads/--int8-heads", help="--int8: keep the loc/conf head convs in float."
    ),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare the file's outputs with PyTorch."),
) -> None:
    """Export with a dynamic batch dimension and box decoding in the graph; the input convention,
    configuration and class names go into the file's metadata (see docs/deploy.md)."""
    from m2det.deploy.export import GraphNMS, export_onnx, export_torchscript
    from m2det.inference.network import load_model_for_inference

    fmt = fmt or ("openvino" if output.suffix == ".xml" else "onnx")
    if fmt not in FORMATS:
        raise M2DetError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "openvino" and output.suffix != ".xml":
        raise M2DetError(f"--format openvino writes an .xml file (and a .bin beside it), got {output}")
    if int8 and fmt == "torchscript":
        raise M2DetError("--int8 is for --format onnx (ONNX Runtime) or openvino (NNCF)")
    if int8 and calib_data is None:
        raise M2DetError(
            "--int8 needs --calib-data: images of your data set to calibrate the activation ranges"
        )
    if int8 and fmt == "onnx":
        from m2det.deploy.quantize import CALIBRATION_METHODS

        if calib_method not in CALIBRATION_METHODS:
            raise M2DetError(f"--calib-method must be one of {CALIBRATION_METHODS}, got {calib_method!r}")
    if fmt == "openvino" and int8 and calib_method != "minmax":
        raise M2DetError("--calib-method is for --format onnx; OpenVINO INT8 uses NNCF's min-max ranges")
    if fmt == "openvino" and nms:
        raise M2DetError(
            "--nms is for --format onnx or torchscript; an OpenVINO model runs m2det's own post-processing"
        )
    model = load_model_for_inference(weights, preset).eval()
    graph_nms = GraphNMS(nms_score, nms_iou, nms_max) if nms else None
    if fmt == "torchscript":
        report = export_torchscript(model, output, input_size=size, nms=graph_nms, check=check)
    elif fmt == "openvino":
        report = _export_openvino(
            model, output, size, check, int8, calib_data, calib_split, calib_num, float_heads
        )
    elif not int8:
        report = export_onnx(model, output, input_size=size, nms=graph_nms, check=check)
    else:
        report = _export_onnx_int8(
            model,
            output,
            size,
            graph_nms,
            check,
            calib_data,
            calib_split,
            calib_num,
            calib_method,
            float_heads,
        )
    if check and report.relative_error:
        errors = ", ".join(f"{name} {err:.1e}" for name, err in report.relative_error.items())
        typer.echo(
            f"checked against PyTorch at batch {report.check_batch}: largest relative differences {errors}"
        )
    typer.echo(f"wrote {output} ({fmt}{', int8' if int8 else ''}; outputs {', '.join(report.outputs)})")


def _export_onnx_int8(
    model: Any,
    output: Path,
    size: Optional[int],
    graph_nms: Any,
    check: bool,
    calib_data: Optional[str],
    calib_split: str,
    calib_num: int,
    calib_method: str,
    float_heads: bool,
) -> Any:
    """FP32 ONNX (checked), quantised by ONNX Runtime on the calibration images into `output`."""
    import tempfile

    from m2det.deploy.export import export_onnx
    from m2det.deploy.quantize import calibration_reader, quantize_onnx

    assert calib_data is not None  # --int8 without it was refused
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        report = export_onnx(model, fp32, input_size=size, nms=graph_nms, check=check)
        reader = calibration_reader(fp32, calib_data, calib_split, calib_num)
        typer.echo(f"calibrating on {len(reader)} images of {calib_data} ({calib_split}) ...")
        quantized = quantize_onnx(
            fp32,
            output,
            reader,
            source=f"{calib_data} ({calib_split})",
            calibration=calib_method,
            float_heads=float_heads,
        )
    typer.echo(quantized.summary())
    return report


def _export_openvino(
    model: Any,
    output: Path,
    size: Optional[int],
    check: bool,
    int8: bool,
    calib_data: Optional[str],
    calib_split: str,
    calib_num: int,
    float_heads: bool,
) -> Any:
    """The OpenVINO IR (checked in FP32), quantised by NNCF on the calibration images with `int8`."""
    from m2det.deploy.calibration import dataset_calibration_images
    from m2det.deploy.export import export_openvino

    images = None
    if int8:
        assert calib_data is not None  # --int8 without it was refused
        input_size = int(size or model.config.input_size)
        images = dataset_calibration_images(model.config, input_size, calib_data, calib_split, calib_num)
        typer.echo(f"calibrating on {len(images)} images of {calib_data} ({calib_split}) ...")
    report, quantized = export_openvino(
        model,
        output,
        input_size=size,
        check=check,
        int8=images,
        calibration_source=f"{calib_data} ({calib_split})" if int8 else "",
        float_heads=float_heads,
    )
    if quantized is not None:
        typer.echo(quantized.summary())
    return report
