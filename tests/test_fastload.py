"""The fast single-file loader (models/fastload.py) against diffusers' ``from_single_file``.

Tiny SD 1.5 and SDXL pipelines are written as original-layout checkpoints (``ldm_export``) and read
back both ways: every weight must be bit-identical, in the same dtype, and the pipelines configured
the same. The reader itself is checked on a file of mixed dtypes, and the fallback on a checkpoint
that does not fit its config.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from conftest import make_settings
from imagegenx.config import ModelSettings
from imagegenx.models import fastload, fastread
from imagegenx.models.ldm_export import save_ldm_checkpoint
from imagegenx.models.loader import _from_pretrained, _from_single_file, load_model
from imagegenx.models.sources import arch_dir, resolve
from imagegenx.models.speed import decode_dtype
from imagegenx.types import UserError
from support.weights import WEIGHTED, assert_same_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny original-layout checkpoint per family the fast path reads (float32 weights)."""
    folder = tmp_path_factory.mktemp("fastload")
    settings = make_settings(folder).models
    out = {}
    for arch in ("tiny-sd15", "tiny-sdxl"):
        pipe = load_model(resolve(f"random:{arch}", settings), settings).pipe
        out[arch] = save_ldm_checkpoint(pipe, folder / f"{arch}.safetensors")
    return out


def _settings(tmp_path: Path) -> ModelSettings:
    return make_settings(tmp_path).models.model_copy(update={"device": "cpu"})


def _assert_identical(want, got) -> None:
    assert_same_weights(want, got, at_least=400)
    assert dict(got.config) == dict(want.config)
    assert dict(got.scheduler.config) == dict(want.scheduler.config)


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
def test_fast_load_is_bit_identical_to_diffusers(arch, checkpoints, tmp_path) -> None:
    settings = _settings(tmp_path)
    source = resolve(f"{checkpoints[arch]}#arch={arch}", settings)
    fast = load_model(source, settings)
    assert fast.load_split["loader"] == "fast"
    assert fast.load_split["gigabytes"] == pytest.approx(checkpoints[arch].stat().st_size / 1e9, rel=0.01)
    _assert_identical(_from_single_file(source, torch.float32), fast.pipe)
    # Every parameter is the model's own storage: none shared (in-place LoRA fusing stays local).
    pointers = [
        p.data_ptr()
        for m in WEIGHTED
        if getattr(fast.pipe, m, None)
        for p in getattr(fast.pipe, m).parameters()
    ]
    assert len(pointers) == len(set(pointers))


def test_cast_to_half_matches_diffusers(checkpoints, tmp_path) -> None:
    """float32 file, float16 target: the cast happens on the read tensors, with the same rounding."""
    source = resolve(f"{checkpoints['tiny-sdxl']}#arch=tiny-sdxl", _settings(tmp_path))
    pipe, split = fastload.load_single_file(
        Path(source.location), "sdxl", arch_dir("tiny-sdxl"), CPU, torch.float16, warm=False
    )
    assert pipe.unet.conv_in.weight.dtype == torch.float16
    _assert_identical(_from_single_file(source, torch.float16), pipe)
    assert split["read_text_vae"] > 0 and split["read_unet"] > 0


def test_warm_up_runs_and_changes_nothing(checkpoints, tmp_path, monkeypatch) -> None:
    calls, read_threads = [], []
    real, real_read = fastload.example_unet_inputs, fastload.read_tensors

    def recorded(unet, rows, side, family):
        calls.append((rows, side, family, unet.conv_in.weight.dtype, threading.current_thread()))
        return real(unet, rows, side, family)

    def recorded_read(*args, **kwargs):
        read_threads.append(threading.current_thread())
        return real_read(*args, **kwargs)

    monkeypatch.setattr(fastload, "example_unet_inputs", recorded)
    monkeypatch.setattr(fastload, "read_tensors", recorded_read)
    source = resolve(f"{checkpoints['tiny-sd15']}#arch=tiny-sd15", _settings(tmp_path))
    pipe, split = fastload.load_single_file(
        Path(source.location), "sd15", arch_dir("tiny-sd15"), CPU, torch.float32, warm=True
    )
    assert split["warm"] > 0
    # A stand-in UNet ran at SD 1.5's native 512² (64² latents), without and with guidance, on the
    # caller's thread (cuDNN's plans are per thread: the engine's thread must be the one warmed) while
    # another thread read the UNet's bytes.
    here = threading.current_thread()
    assert calls == [(1, 64, "sd15", torch.float32, here), (2, 64, "sd15", torch.float32, here)]
    assert read_threads[0] is here and read_threads[1] is not here and len(read_threads) == 2
    _assert_identical(_from_single_file(source, torch.float32), pipe)


def test_warm_up_decodes_in_the_dtype_the_engine_decodes_in(checkpoints, tmp_path, monkeypatch) -> None:
    """SDXL's VAE overflows in fp16: the engine decodes in bf16 (GPU) or fp32. The warm-up casts it
    first, so the first image finds that dtype's kernels loaded, and the runner has nothing to cast."""
    decoded = []
    real_decode = AutoencoderKL.decode

    def recorded(self, z, **kwargs):
        decoded.append(z.dtype)
        return real_decode(self, z, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", recorded)
    source = resolve(f"{checkpoints['tiny-sdxl']}#arch=tiny-sdxl", _settings(tmp_path))
    pipe, _ = fastload.load_single_file(
        Path(source.location), "sdxl", arch_dir("tiny-sdxl"), CPU, torch.float16, warm=True
    )
    assert decoded == [torch.float32] and pipe.vae.dtype == torch.float32  # fp32: no bf16 on this CPU path
    assert pipe.unet.dtype == torch.float16 and decode_dtype(pipe.vae, CPU) == pipe.vae.dtype


def test_decode_dtype_upcasts_only_the_vaes_that_overflow() -> None:
    def vae(dtype, upcast):
        return SimpleNamespace(dtype=dtype, config=SimpleNamespace(force_upcast=upcast))

    assert decode_dtype(vae(torch.float16, True), CPU) == torch.float32
    assert decode_dtype(vae(torch.float16, False), CPU) == torch.float16
    assert decode_dtype(vae(torch.float32, True), CPU) == torch.float32
    assert decode_dtype(vae(torch.bfloat16, True), CPU) == torch.bfloat16


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl", "sdxl-refiner"])
def test_example_unet_inputs_fit_every_unet_family(family) -> None:
    """The warm-up's (and the bench's FLOP count's) inputs run each family's UNet: SDXL's pooled
    text and six size ids, the refiner's five (its aesthetic score), an LCM guidance embedding."""
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(arch_dir(f"tiny-{family}") / "unet"))
    for lcm in (None, 16):
        unet = UNet2DConditionModel.from_config(config | {"time_cond_proj_dim": lcm})
        args, kwargs = fastload.example_unet_inputs(unet, 2, 8, family)
        with torch.no_grad():
            out = unet(*args, **kwargs).sample
        assert out.shape == (2, config.get("out_channels", 4), 8, 8)


def test_reader_keeps_every_dtype_and_shape(tmp_path) -> None:
    tensors = {
        "a.f32": torch.randn(3, 5),
        "b.f16": torch.randn(7).half(),
        "c.bf16": torch.randn(2, 2, 3).bfloat16(),
        "d.i64": torch.arange(11),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.u8": torch.arange(200, dtype=torch.uint8),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    for staging in (None, fastread.Staging(CPU, 2, chunk_bytes=4096)):  # mapped; as on CUDA
        got = fastread.read_tensors(path, fastread.tensor_table(path), CPU, torch.float32, 3, staging)
        assert got.keys() == tensors.keys()
        for name, want in tensors.items():
            expected = want.float() if want.is_floating_point() else want
            assert got[name].dtype == expected.dtype and got[name].shape == want.shape, name
            assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("direct", [False, True])
def test_staged_reader_matches_the_file(tmp_path, direct) -> None:
    """The CUDA path's reader (chunks through shared staging buffers, page-aligned reads, O_DIRECT
    where the file system allows it) run on the CPU: chunks far smaller than the tensors, and tensors
    far smaller than a chunk, on several threads sharing fewer buffers than threads."""
    tensors = {f"t{i:02d}": torch.randn(i * 97 + 1) for i in range(30)} | {"big": torch.randn(50_000)}
    tensors["half"] = torch.randn(333).half()
    path = tmp_path / "staged.safetensors"
    save_file(tensors, str(path))
    specs = [s for s in fastread.tensor_table(path) if s.name != "t05"]  # a gap: one tensor not read
    for chunk_bytes in (4096, 3 * 4096 + 100, 1 << 20):
        staging = fastread.Staging(CPU, 2, chunk_bytes=chunk_bytes, direct=direct)
        got = fastread.read_tensors(path, specs, CPU, torch.float32, threads=3, staging=staging)
        assert sorted(got) == sorted(s.name for s in specs)
        for name, tensor in got.items():
            assert torch.equal(tensor, tensors[name].float()), (chunk_bytes, name)


def test_chunks_cover_every_byte_once() -> None:
    """The CUDA reader's plan: adjacent tensors share chunks, gaps start new ones, no chunk too big."""
    specs = [
        fastread.TensorSpec("a", torch.float16, (50,), 100, 200),
        fastread.TensorSpec("b", torch.float16, (5,), 200, 210),
        fastread.TensorSpec("skipped-gap", torch.float16, (0,), 210, 210),
        fastread.TensorSpec("c", torch.float32, (30,), 300, 420),  # after a gap (an unread tensor)
    ]
    chunks = fastread._chunks(specs, chunk_bytes=64)
    assert all(c.nbytes <= 64 for c in chunks)
    covered: dict[str, set[int]] = {s.name: set() for s in specs}
    for chunk in chunks:
        for name, at, offset, n in chunk.pieces:
            assert at >= 0 and at + n <= chunk.nbytes
            covered[name] |= set(range(offset, offset + n))
            spec = next(s for s in specs if s.name == name)
            assert spec.start + offset == chunk.start + at  # the piece's file offset
    for spec in specs:
        assert covered[spec.name] == set(range(spec.nbytes)), spec.name
    assert not any(c.start < 300 < c.start + c.nbytes for c in chunks)  # the gap is never read


def test_unknown_dtype_is_refused_only_when_read(tmp_path) -> None:
    path = tmp_path / "f.safetensors"
    save_file({"keep": torch.ones(2), "other": torch.ones(2)}, str(path))
    specs = [
        s if s.name == "keep" else fastread.TensorSpec(s.name, None, s.shape, s.start, s.end)
        for s in fastread.tensor_table(path)
    ]
    assert (
        fastread.read_tensors(path, [s for s in specs if s.name == "keep"], CPU, torch.float32)["keep"].sum()
        == 2
    )
    with pytest.raises(fastload.FastLoadUnsupported, match="dtype"):
        fastread.read_tensors(path, specs, CPU, torch.float32)


def test_misfit_checkpoint_falls_back_to_diffusers(checkpoints, tmp_path, caplog) -> None:
    """A tiny SD 1.5 file read with the full-size config: the fast path declines, diffusers' path
    then gives the user its usual error."""
    settings = _settings(tmp_path)
    source = resolve(str(checkpoints["tiny-sd15"]), settings)
    with pytest.raises(fastload.FastLoadUnsupported, match=r"lacks|size mismatch"):
        fastload.load_single_file(
            Path(source.location), "sd15", arch_dir("sd15"), CPU, torch.float32, warm=False
        )
    with (
        caplog.at_level(logging.INFO, logger="imagegenx.models.loader"),
        pytest.raises(UserError, match="does not fit"),
    ):
        load_model(source, settings)
    assert "read by diffusers' from_single_file" in caplog.text


def test_families_without_a_fast_path_are_declined(tmp_path) -> None:
    with pytest.raises(fastload.FastLoadUnsupported, match="sd21"):
        fastload.load_single_file(tmp_path / "x.safetensors", "sd21", arch_dir("sd21"), CPU, torch.float32)


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_folder_models_are_bit_identical_to_from_pretrained(tmp_path, shard) -> None:
    """A diffusers folder: the UNet and VAE by the fast reader (also from sharded files), the text
    encoders by from_pretrained; the same weights as from_pretrained alone."""
    settings = _settings(tmp_path)
    folder = tmp_path / "tiny-sdxl-folder"
    random = load_model(resolve("random:tiny-sdxl", settings), settings).pipe
    random.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    fast = load_model(resolve(str(folder), settings), settings)
    assert fast.load_split["loader"] == "fast"
    assert fast.load_split["fast_components"] == ["unet", "vae"]
    _assert_identical(_from_pretrained(folder, torch.float32, local_only=True), fast.pipe)
