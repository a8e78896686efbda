"""Speed-ups change speed, not images: channels_last, fused QKV, and the padded batches compile uses."""

import json
import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import make_settings
from imagegenx.config import ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.models.speed import batch_bucket, decode_chunks
from imagegenx.types import JobSpec, UserError

JOBS = [JobSpec(f"a red fox {i}", "random:tiny-sdxl", width=64, height=64, steps=3, seed=i) for i in range(3)]


def _images(settings, *, compiled: bool = False) -> list[np.ndarray]:
    with Engine(settings) as engine:
        if compiled:
            # Exercise the padding a compiled UNet gets, without paying for a compile on the CPU.
            model = engine.models.get("random:tiny-sdxl")
            engine._runner(model).compiled = True
        results = engine.run(JOBS)
    return [np.frombuffer(r.rgb, np.uint8).astype(int) for r in results]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _images(make_settings(tmp_path_factory.mktemp("ref")))


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 6, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    # A regionally compiled UNet: powers of two up to 8 rows, then multiples of 8 (20 rows: 24, not 32).
    rows = (1, 3, 5, 8, 9, 16, 17, 20, 25, 33)
    assert [batch_bucket(n, 8) for n in rows] == [1, 4, 8, 8, 16, 16, 24, 24, 32, 40]


def test_decode_chunks_are_warmed_shapes_that_waste_little():
    assert decode_chunks(10) == [8, 2]  # not 16: 6 wasted decodes
    assert decode_chunks(7) == [7]  # padded to 8: one wasted of 7
    assert decode_chunks(20) == [16, 4]
    for rows in range(1, 70):
        chunks = decode_chunks(rows)
        assert sum(chunks) == rows
        padded = [batch_bucket(c) for c in chunks]
        assert all(p & (p - 1) == 0 for p in padded)  # every shape a power of two
        assert sum(padded) - rows <= rows / 4


def test_a_regional_compile_pads_the_unet_batch_to_finer_buckets(tmp_path):
    """9 guided jobs are 18 UNet rows: a whole-UNet compile runs them as 32 rows, a regional one as
    24 (its compiles are cheap, padding is not). The compile itself is not what is tested here."""
    jobs = [JobSpec(f"a fox {i}", "random:tiny-sdxl", width=64, height=64, steps=1, seed=i) for i in range(9)]
    seen = {}
    for step in (0, 8):
        with Engine(make_settings(tmp_path, batch_window_ms=1000)) as engine:
            runner = engine._runner(engine.models.get("random:tiny-sdxl"))
            runner.compiled, runner.bucket_step = True, step
            rows: list[int] = []
            runner.before_unet = rows.append
            results = engine.run(jobs)
        assert [r.batch_size for r in results] == [9] * 9
        seen[step] = rows
    assert seen == {0: [32], 8: [24]}


def test_padded_batches_give_the_same_images(tmp_path, reference):
    # 3 jobs with guidance = 6 UNet rows, padded to 8.
    for ours, ref in zip(_images(make_settings(tmp_path), compiled=True), reference, strict=True):
        assert np.abs(ours - ref).max() <= 1


def test_channels_last_and_fused_qkv_give_the_same_images(tmp_path, reference):
    settings = make_settings(tmp_path)
    models = settings.models.model_copy(update={"channels_last": True, "fuse_qkv": True})
    settings = settings.model_copy(update={"models": models})
    with Engine(settings) as engine:
        assert engine.models.get("random:tiny-sdxl").speedups == {"channels_last": True, "fuse_qkv": True}
    for ours, ref in zip(_images(settings), reference, strict=True):
        assert np.abs(ours - ref).max() <= 1


def test_regional_compile_builds_one_graph_for_every_block_and_the_same_images(tmp_path, reference):
    """compile_regional compiles SDXL's transformer blocks only (Inductor's CPU backend, for real):
    every block shares one graph, where the whole UNet is hundreds of captured calls (5.6 s against
    31 s measured here), and the images are the eager ones."""
    from torch._dynamo.utils import counters

    settings = make_settings(tmp_path)
    models = settings.models.model_copy(
        update={"compile": "default", "compile_regional": True, "compile_vae": False}
    )
    torch._dynamo.reset()
    counters.clear()
    with Engine(settings.model_copy(update={"models": models})) as engine:
        speedups = engine.models.get("random:tiny-sdxl").speedups
        results = engine.run(JOBS)
    assert speedups == {"compile": "default", "compile_regional": ["BasicTransformerBlock"]}
    assert counters["stats"]["unique_graphs"] == 1
    for result, ref in zip(results, reference, strict=True):
        assert np.abs(np.frombuffer(result.rgb, np.uint8).astype(int) - ref).max() <= 1


@pytest.mark.parametrize(("dynamic", "graphs"), [(False, 3), (True, 2)])
def test_dynamic_compile_serves_every_later_batch_size_with_one_graph(tmp_path, reference, dynamic, graphs):
    """Batches of 2, 4 and 8 UNet rows (1, 2 and 3 jobs with guidance, padded): static shapes compile
    a graph for each, compile_dynamic one for the first and one general graph for the rest; the
    images are the eager ones either way."""
    from torch._dynamo.utils import counters

    settings = make_settings(tmp_path)
    models = settings.models.model_copy(
        update={
            "compile": "default",
            "compile_regional": True,
            "compile_vae": False,
            "compile_dynamic": dynamic,
        }
    )
    torch._dynamo.reset()  # compiled code and sizes seen are per code object: earlier tests' too
    counters.clear()
    with Engine(settings.model_copy(update={"models": models})) as engine:
        results = [engine.run(JOBS[:n])[-1] for n in (1, 2, 3)]
        speedups = engine.models.get("random:tiny-sdxl").speedups
    assert speedups.get("compile_dynamic", False) is dynamic
    assert [r.batch_size for r in results] == [1, 2, 3]
    assert counters["stats"]["unique_graphs"] == graphs
    for result, ref in zip(results, reference, strict=True):
        assert np.abs(np.frombuffer(result.rgb, np.uint8).astype(int) - ref).max() <= 1


def test_compile_is_regional_by_default_for_transformers_and_whole_for_unets(tmp_path):
    """Flux's whole-model compile never finished in a GPU call; its blocks compile in a minute. A
    UNet compiles whole unless asked (compile_regional=True), a transformer by blocks unless asked
    (False). torch.compile only wraps here: nothing compiles until a model runs."""
    from imagegenx.models.cache import ModelCache

    def regional(model: str, setting: bool | None) -> list[str] | None:
        models = make_settings(tmp_path).models.model_copy(
            update={"compile": "default", "compile_regional": setting}
        )
        return ModelCache(models).get(model).speedups.get("compile_regional")

    flux_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert regional("random:tiny-flux", None) == flux_blocks
    assert regional("random:tiny-flux", False) is None
    assert regional("random:tiny-sdxl", None) is None
    assert regional("random:tiny-sdxl", True) == ["BasicTransformerBlock"]


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValidationError, match="max-autotune"):
        ModelSettings(compile="fastest")


def test_uint8_pixels_made_on_the_device_equal_the_float_path(tmp_path):
    """The engine asks the runner for uint8 pixels (a quarter of the host copy): same bytes as rounding
    the [0, 1] floats on the host."""
    from imagegenx.pipelines.sample import to_uint8

    with Engine(make_settings(tmp_path)) as engine:
        runner = engine._runner(engine.models.get("random:tiny-sdxl"))
        assert runner.uint8_output
        samples = runner.prepare(JOBS[:2])
        while not all(s.done for s in samples):
            runner.step(samples)
        as_uint8 = runner.decode(samples)
        runner.uint8_output = False
        as_float = runner.decode(samples)
    for small, full in zip(as_uint8, as_float, strict=True):
        assert small.dtype == np.uint8 and full.dtype == np.float32 and small.shape == (64, 64, 3)
        assert np.array_equal(small, to_uint8(full))


def test_padded_vae_decode_gives_the_same_pixels(tmp_path):
    """The compiled VAE decode pads its batch to a bucket (7 latents → 8 rows) or splits it (10
    latents → 8 + 2); the caller sees exactly the plain decode's pixels, in either return form."""
    import torch

    from imagegenx.models.speed import padded_decode

    with Engine(make_settings(tmp_path)) as engine:
        vae = engine.models.get("random:tiny-sdxl").pipe.vae
        latents = torch.randn(7, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        seen_rows = []

        def plain(z, return_dict=True):
            seen_rows.append(z.shape[0])
            return vae.decode(z, return_dict=return_dict)

        with torch.inference_mode():
            expected = vae.decode(latents).sample
            padded = padded_decode(plain)
            as_tuple = padded(latents, return_dict=False)[0]
            as_output = padded(latents).sample
            padded_rows = list(seen_rows)
            seen_rows.clear()
            many = torch.randn(10, *latents.shape[1:], generator=torch.Generator().manual_seed(1))
            split = padded(many, return_dict=False)[0]
            expected_many = vae.decode(many).sample
    assert padded_rows == [8, 8]  # 7 latents padded to 8, in each return form
    assert seen_rows == [8, 2]  # 10 latents in two chunks, not padded to 16
    assert as_tuple.shape == expected.shape == as_output.shape
    assert torch.equal(as_tuple, as_output)
    assert torch.allclose(as_tuple, expected, atol=1e-5)
    assert split.shape == expected_many.shape
    assert torch.allclose(split, expected_many, atol=1e-5)


def test_the_padded_decode_compiles_once_for_either_latent_layout():
    """Latents reach the decoder channels_last (from the UNet) or contiguous (other paths); a
    compiled decode that saw both compiled twice (Dynamo guards on strides: the portrait smoke)."""
    import torch
    from torch._dynamo.utils import counters

    from imagegenx.models.speed import padded_decode

    def decode(z, return_dict=True):
        return (z * 2,)

    padded = padded_decode(torch.compile(decode, backend="eager"))
    latents = torch.randn(2, 4, 8, 8)
    torch._dynamo.reset()
    counters.clear()
    padded(latents, return_dict=False)
    (pixels,) = padded(latents.to(memory_format=torch.channels_last), return_dict=False)
    assert counters["frames"]["ok"] == 1
    assert torch.equal(pixels, latents * 2)


def test_a_lora_job_on_a_fused_qkv_model_fails_with_the_reason(tmp_path):
    """The fused attention reads to_qkv only, so a LoRA on to_q/to_k/to_v would be silently dropped:
    the job is refused instead (fp8 models likewise, tests/test_fp8.py)."""
    from imagegenx.types import LoraRef

    settings = make_settings(tmp_path)
    settings = settings.model_copy(update={"models": settings.models.model_copy(update={"fuse_qkv": True})})
    job = JobSpec("a fox", "random:tiny-sdxl", width=64, height=64, steps=2, loras=(LoraRef("style"),))
    with Engine(settings) as engine:
        (result,) = engine.run([job])
    assert isinstance(result, Exception) and "fused QKV" in str(result)


def test_compile_keeps_its_kernels_under_the_data_folder_unless_told_otherwise(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from imagegenx.models.speed import apply_speedups

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # records the real value: restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    settings = ModelSettings(compile="default", compile_cache_dir=tmp_path / "kernels")
    pipe = SimpleNamespace(unet=torch.nn.Linear(4, 4), vae=None)
    assert apply_speedups(pipe, torch.device("cpu"), settings)["compile"] == "default"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kernels")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # the operator's choice stays
    apply_speedups(SimpleNamespace(unet=torch.nn.Linear(4, 4), vae=None), torch.device("cpu"), settings)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_cudnn_benchmark_is_asked_for_and_only_on_cuda(monkeypatch):
    from imagegenx.models.speed import use_cudnn_benchmark

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    cuda = torch.device("cuda")  # only compared: nothing runs on it
    assert not use_cudnn_benchmark(ModelSettings(), cuda) and not torch.backends.cudnn.benchmark  # default
    assert not use_cudnn_benchmark(ModelSettings(cudnn_benchmark=True), torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark
    assert use_cudnn_benchmark(ModelSettings(cudnn_benchmark=True), cuda) and torch.backends.cudnn.benchmark


def test_attention_kernel_is_the_one_named_and_only_on_cuda():
    """attention="flash" leaves scaled_dot_product_attention FlashAttention-2 (and the math fallback)
    on CUDA; "auto" and a CPU change nothing. The switches are process-wide: restored here."""
    from imagegenx.models.speed import use_attention_kernel

    switches = ("flash_sdp_enabled", "cudnn_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled")
    saved = [getattr(torch.backends.cuda, name)() for name in switches]
    cuda = torch.device("cuda")  # only compared: nothing runs on it
    try:
        assert use_attention_kernel(ModelSettings(), cuda) is None
        assert use_attention_kernel(ModelSettings(attention="flash"), torch.device("cpu")) is None
        assert [getattr(torch.backends.cuda, name)() for name in switches] == saved
        assert use_attention_kernel(ModelSettings(attention="flash"), cuda) == "flash"
        assert [getattr(torch.backends.cuda, name)() for name in switches] == [True, False, False, True]
        assert use_attention_kernel(ModelSettings(attention="cudnn"), cuda) == "cudnn"
        assert [getattr(torch.backends.cuda, name)() for name in switches] == [False, True, False, True]
    finally:
        for name, on in zip(switches, saved, strict=True):
            getattr(torch.backends.cuda, "enable_" + name.removesuffix("_enabled"))(on)
    with pytest.raises(ValidationError, match="flash"):
        ModelSettings(attention="xformers")


def test_every_engine_thread_gets_the_cuda_graph_trees_state_when_graphs_are_on():
    # torch 2.11 set it up only on the thread that imported cudagraph_trees: a second engine thread
    # of one process failed its first CUDA-graphed call with a bare AssertionError (the H200 bench).
    import threading

    from torch._inductor import cudagraph_trees

    from imagegenx.models.speed import ready_thread_for_cuda_graphs

    def state_on_a_new_thread(compile_mode: str) -> tuple[bool, bool]:
        seen = []

        def run():
            ready_thread_for_cuda_graphs(compile_mode)
            local = cudagraph_trees.local
            seen.append((hasattr(local, "tree_manager_containers"), hasattr(local, "tree_manager_locks")))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return seen[0]

    assert state_on_a_new_thread("reduce-overhead") == (True, True)
    assert state_on_a_new_thread("default") == (False, False)  # nothing imported or set without graphs


@pytest.fixture
def inductor_config():
    """Inductor's flags restored after the test: setting them is process-wide."""
    import torch._inductor.config as inductor

    saved = inductor.get_config_copy()
    yield inductor
    inductor.load_config(saved)


def test_inductor_flags_come_from_the_environment_and_are_set_when_compiling(
    tmp_path, monkeypatch, inductor_config
):
    flags = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
    monkeypatch.setenv("IMAGEGENX_MODELS__INDUCTOR_FLAGS", json.dumps(flags))
    assert Settings().models.inductor_flags == flags
    assert inductor_config.conv_1x1_as_mm is False  # Inductor's default, untouched until a compile
    settings = make_settings(tmp_path)
    models = settings.models.model_copy(update={"compile": "default", "inductor_flags": flags})
    with Engine(settings.model_copy(update={"models": models})) as engine:
        loaded = engine.models.get("random:tiny-sd15")
    assert loaded.speedups["inductor_flags"] == flags
    assert inductor_config.conv_1x1_as_mm is True and inductor_config.epilogue_fusion is False


def test_an_unknown_inductor_flag_is_refused_and_nothing_is_set(inductor_config):
    from imagegenx.models.speed import set_inductor_flags

    with pytest.raises(UserError, match="conv_1x1_as_nn"):
        set_inductor_flags({"epilogue_fusion": False, "conv_1x1_as_nn": True})
    assert inductor_config.epilogue_fusion is True


def test_the_vae_in_channels_last_decodes_the_same_images(tmp_path, reference):
    """A layout, not a different computation: the same pixels within rounding, the VAE's weights NHWC."""
    settings = make_settings(tmp_path)
    models = settings.models.model_copy(update={"vae_channels_last": True})
    settings = settings.model_copy(update={"models": models})
    with Engine(settings) as engine:
        model = engine.models.get("random:tiny-sdxl")
        assert model.speedups == {"vae_channels_last": True}
        assert model.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for ours, ref in zip(_images(settings), reference, strict=True):
        assert np.abs(ours - ref).max() <= 1
