"""Settings, one frozen slice per area, read from ``IMAGEGENX_*`` environment variables.

Nothing here is instantiated at import time: the CLI and app factories call ``Settings()`` once and
hand each room only its slice.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _data_home() -> Path:
    return Path.home() / ".local" / "share" / "imagegenx"


class ModelSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_dir: Path = Field(default_factory=lambda: _data_home() / "models")
    lora_dir: Path = Field(default_factory=lambda: _data_home() / "loras")
    default_model: str = "random:tiny-sdxl"
    # Hub ids are fetched only when this is true and HF_HUB_OFFLINE is not set.
    allow_downloads: bool = True
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float16 on cuda, float32 on cpu; or float16 / bfloat16 / float32
    max_resident_models: int = 2  # least recently used models beyond this are unloaded


class EngineSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_window_ms: float = 50.0
    aging_s: float = 2.0
    max_batch: int = 16
    max_pixels_per_batch: int = 8 * 1024 * 1024
    min_size: int = 256
    max_size: int = 2048
    max_steps: int = 150


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGENX_", env_nested_delimiter="__", frozen=True)

    models: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
