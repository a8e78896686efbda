"""LoRAs through the engine: several per request, switched between batches, base model loaded once."""

import numpy as np
import pytest
from prometheus_client import generate_latest

from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.types import JobSpec, LoraRef

MODEL = "random:tiny-sd15"


def _write_loras(engine: Engine, folder) -> None:
    from diffusers import StableDiffusionPipeline

    from imagegenx.models.lora_files import write_kohya_lora, write_peft_lora

    components = engine.models.get(MODEL).pipe.components
    write_peft_lora(folder / "style.safetensors", StableDiffusionPipeline, components, seed=3, scale=0.3)
    write_kohya_lora(folder / "film.safetensors", components, seed=4, scale=0.3)


def _array(image) -> np.ndarray:
    return np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3).astype(int)


@pytest.mark.parametrize("mode", ["adapters", "fused"])
def test_lora_sets_switch_without_reloading(settings, mode):
    def job(*loras: LoraRef) -> JobSpec:
        return JobSpec("a barn", MODEL, width=64, height=64, steps=4, seed=5, loras=loras)

    models = settings.models.model_copy(update={"lora_mode": mode})
    with Engine(settings.model_copy(update={"models": models})) as engine:
        _write_loras(engine, settings.models.lora_dir)
        sequence = [
            (),
            (LoraRef("style", 1.0),),
            (LoraRef("film", 0.8),),
            (LoraRef("style", 1.0), LoraRef("film", 0.8)),
            (LoraRef("style", 0.5),),
            (),
            (LoraRef("style", 1.0),),
        ]
        images = [_array(engine.submit(job(*loras)).result(timeout=300)) for loras in sequence]
        with pytest.raises(JobFailed, match="nope") as failure:
            engine.submit(job(LoraRef("nope", 1.0))).result(timeout=300)
        metrics = generate_latest(engine.metrics.registry).decode()
    base, style, film, both, half, base_again, style_again = images
    assert engine.models.loads[MODEL] == 1  # seven LoRA sets, one base model load
    assert np.array_equal(base, base_again)  # no LoRA: exactly the base model again
    assert np.array_equal(style, style_again)  # back to a set: the same image
    for a, b in [(base, style), (base, film), (style, both), (film, both), (style, half)]:
        assert np.abs(a - b).mean() > 0.5
    assert f'imagegenx_lora_loads_total{{model="{MODEL}"}} 2.0' in metrics  # each file read once
    assert "style" in str(failure.value)  # the error names the LoRAs that exist


def test_a_fused_qkv_model_takes_merged_loras(settings):
    """IMAGEGENX_MODELS__FUSE_QKV with lora_mode fused: the LoRA reaches the fused projections, so the
    image is the unfused model's (with adapters such a job is refused: tests/test_speed.py)."""
    job = JobSpec("a barn", MODEL, width=64, height=64, steps=4, seed=5, loras=(LoraRef("style", 1.0),))
    images = []
    for fuse in (False, True):
        models = settings.models.model_copy(update={"lora_mode": "fused", "fuse_qkv": fuse})
        with Engine(settings.model_copy(update={"models": models})) as engine:
            _write_loras(engine, settings.models.lora_dir)
            plain = _array(
                engine.submit(JobSpec("a barn", MODEL, width=64, height=64, steps=4, seed=5)).result(300)
            )
            images.append((plain, _array(engine.submit(job).result(timeout=300))))
    (plain, styled), (plain_fused, styled_fused) = images
    assert np.abs(styled - styled_fused).mean() < 0.5  # the same image, up to float rounding
    assert np.abs(plain - plain_fused).mean() < 0.5
    assert np.abs(styled_fused - plain_fused).mean() > 0.5  # and the LoRA changed it
