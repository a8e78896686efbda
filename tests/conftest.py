"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models on a 2-core machine: one intra-op thread is several times faster than two that
# contend with everything else running.
torch.set_num_threads(1)

from imagegenx.config import EngineSettings, ModelSettings, Settings  # noqa: E402

# NATS, PostgreSQL, Redis and S3 for the scale-out tests, started when down (support/)
from support.nats_server import nats_url  # noqa: E402, F401
from support.services import postgres_url, redis_url, s3_server  # noqa: E402, F401


def make_settings(tmp_path, **engine) -> Settings:
    models = ModelSettings(model_dir=tmp_path / "models", lora_dir=tmp_path / "loras", device="cpu")
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "loras").mkdir(exist_ok=True)
    return Settings(models=models, engine=EngineSettings(**engine))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path)
