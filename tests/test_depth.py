"""A user-supplied ONNX depth model turns a photo into ControlNet-Depth's control image.

No real depth model can be installed here (WEIGHTS.md), so the test builds a small ONNX graph with
the same interface as Depth Anything's export (pixel_values NCHW → predicted_depth NHW): the
channel mean of the normalised image, a stand-in whose answer can be computed independently.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from skimage import data

from imagegenx.types import UserError
from imagegenx.vision.controls import make_control_image
from imagegenx.vision.depth import MEAN, STD, DepthOnnx


def _model(path, side: int | str) -> str:
    shape = [1, 3, side, side]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values", "axes"], ["predicted_depth"], keepdims=0)],
        "mean-depth",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, [1, side, side])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("side", [64, "height"], ids=["fixed-64", "any-size"])
def test_depth_model_output_becomes_the_control_image(tmp_path, side):
    photo = Image.fromarray(data.astronaut())
    path = _model(tmp_path / "depth.onnx", side if isinstance(side, int) else "h")
    depth = DepthOnnx(path).estimate(photo)
    assert depth.shape == (512, 512)
    # The same stand-in computed by hand at the model's input size (64, or 518 for any-size models).
    n = side if isinstance(side, int) else 518
    small = np.asarray(photo.resize((n, n), Image.Resampling.BICUBIC), np.float32)
    expected = ((small / 255.0 - MEAN) / STD).mean(axis=2)
    expected = np.asarray(Image.fromarray(expected).resize((512, 512), Image.Resampling.BILINEAR))
    assert np.abs(depth - expected).max() < 1e-4
    control = np.asarray(make_control_image("depth", photo, depth_model=path))
    assert control.shape == (512, 512, 3) and control.min() == 0 and control.max() == 255
    bright = np.unravel_index(np.argmax(depth), depth.shape)
    assert control[bright][0] == 255  # nearest (largest) → white


def test_bad_depth_models_are_refused(tmp_path):
    with pytest.raises(UserError, match="no ONNX depth model"):
        DepthOnnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        DepthOnnx(junk).estimate(Image.new("RGB", (32, 32)))


def test_cli_depth_control_from_a_photo(tmp_path):
    import json

    from typer.testing import CliRunner

    from imagegenx.cli import app

    photo = tmp_path / "photo.png"
    Image.fromarray(data.astronaut()).resize((64, 64)).save(photo)
    model = _model(tmp_path / "depth.onnx", 64)
    args = [
        "generate",
        "a room",
        "-m",
        "random:tiny-sd15",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "o"),
        "--json",
    ]
    args += ["--control", f"depth,random:controlnet,{photo},0.7", "--depth-model", model]
    result = CliRunner().invoke(app, args, env={"IMAGEGENX_MODELS__MODEL_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert record["controls"] == [{"model": "random:controlnet", "strength": 0.7}]
