"""Read an ncnn model (``.param`` text graph + ``.bin`` weights) without the ncnn runtime.

Only what the Real-ESRGAN models need: the layer list with its ``k=v`` parameters, and the
``Convolution`` weights and biases in graph order.

``.param`` (text, magic ``7767517``)::

    7767517
    <layer count> <blob count>
    <type> <name> <n inputs> <n outputs> <inputs...> <outputs...> <k=v ...>

A key below ``-23300`` marks an array: ``-23310=2,1.0,2.0`` is key ``10`` holding ``[1.0, 2.0]``.

``.bin`` is the layers' data back to back, in layer order. A ``Convolution`` stores
``weight_data_size`` weights (``[out, in, kh, kw]``) led by a 4-byte tag: ``0x01306B47`` for
float16 (padded to 4 bytes), ``0x00000000`` for float32, ``0x000D4B38`` for int8, any other
non-zero tag for a 256-entry float table and one uint8 index per weight. Its bias (``5=1``) follows
as plain float32 with no tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PARAM_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_SCALED = 0x0002C056


@dataclass(frozen=True)
class NcnnLayer:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, int | float | tuple[float, ...]] = field(default_factory=dict)

    def get(self, key: int, default: int | float | tuple[float, ...] | None = None):
        return self.params.get(key, default)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_param(text: str) -> list[NcnnLayer]:
    """Parse a ``.param`` text graph into its layers, in file (topological) order."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or int(lines[0][0]) != PARAM_MAGIC:
        raise ValueError("not an ncnn .param file (magic 7767517 missing)")
    layer_count = int(lines[1][0])
    layers: list[NcnnLayer] = []
    for tokens in lines[2:]:
        kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        inputs = tuple(tokens[4 : 4 + n_in])
        outputs = tuple(tokens[4 + n_in : 4 + n_in + n_out])
        params: dict[int, int | float | tuple[float, ...]] = {}
        for item in tokens[4 + n_in + n_out :]:
            key_text, value = item.split("=", 1)
            key = int(key_text)
            if key <= -23300:
                values = value.split(",")
                params[-key - 23300] = tuple(float(v) for v in values[1 : 1 + int(values[0])])
            else:
                params[key] = _number(value)
        layers.append(NcnnLayer(kind, name, inputs, outputs, params))
    if len(layers) != layer_count:
        raise ValueError(f".param declares {layer_count} layers, found {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(".bin ended early: truncated or wrong .param")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def tagged(self, count: int) -> np.ndarray:
        """ncnn ``ModelBin::load(w, type=0)``: a 4-byte tag, then data in the tagged storage."""
        head = bytes(self.take(4))
        tag = int.from_bytes(head, "little")
        if tag == TAG_FP16:
            raw = self.take(_align4(count * 2))
            return np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
        if tag == TAG_INT8:
            raise ValueError("int8-quantised ncnn weights are not supported")
        if tag == TAG_FP32_SCALED or tag == 0:
            return np.frombuffer(self.take(count * 4), dtype="<f4").astype(np.float32)
        if sum(head) != 0:  # 256-entry codebook then one uint8 index per weight
            table = np.frombuffer(self.take(256 * 4), dtype="<f4")
            index = np.frombuffer(self.take(_align4(count)), dtype=np.uint8, count=count)
            return table[index].astype(np.float32)
        return np.frombuffer(self.take(count * 4), dtype="<f4").astype(np.float32)

    def raw_f32(self, count: int) -> np.ndarray:
        """ncnn ``ModelBin::load(w, type=1)``: plain float32, no tag."""
        return np.frombuffer(self.take(count * 4), dtype="<f4").astype(np.float32)


def _align4(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class ConvWeights:
    layer: NcnnLayer
    weight: np.ndarray  # [out, in, k, k] float32
    bias: np.ndarray | None  # [out] float32


_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Noop"}


def read_convolutions(layers: list[NcnnLayer], data: bytes) -> list[ConvWeights]:
    """Read every ``Convolution``'s weights and bias from ``.bin`` bytes, in graph order."""
    reader = _Reader(data)
    convs: list[ConvWeights] = []
    for layer in layers:
        if layer.type in _WEIGHTLESS:
            continue
        if layer.type != "Convolution":
            raise ValueError(f"layer type {layer.type} ({layer.name}) carries data we cannot read")
        out_ch = int(layer.get(0, 0))
        kw = int(layer.get(1, 0))
        kh = int(layer.get(11, kw))
        size = int(layer.get(6, 0))
        if int(layer.get(8, 0)):
            raise ValueError(f"{layer.name}: int8 convolution is not supported")
        in_ch, rest = divmod(size, out_ch * kh * kw)
        if rest:
            raise ValueError(f"{layer.name}: weight_data_size {size} is not out*in*kh*kw")
        weight = reader.tagged(size).reshape(out_ch, in_ch, kh, kw)
        bias = reader.raw_f32(out_ch) if int(layer.get(5, 0)) else None
        convs.append(ConvWeights(layer, weight, bias))
    if reader.pos != len(reader.data):
        raise ValueError(f".bin has {len(reader.data) - reader.pos} bytes left over")
    return convs
