"""Every model source end to end, offline: random archs, single-file checkpoints in the original layout,
diffusers folders, the local Hugging Face cache, refused pickles, bad references, listing, residency.

The tiny single files are written by ``support.ldm_export`` from a random tiny pipeline and read back
by the loader (diffusers' ``from_single_file`` with a shipped config, named by the ``#arch=`` suffix),
so equal weights prove the original key layout is read without any network.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_settings
from imagegenx.config import ModelSettings
from imagegenx.models.cache import ModelCache
from imagegenx.models.ldm_export import save_ldm_checkpoint
from imagegenx.models.loader import LoadedModel, load_model
from imagegenx.models.sources import ModelSource, list_archs, list_models, resolve
from imagegenx.types import JobSpec, UserError
from support.weights import assert_same_weights as same_weights

PICKLE_WARNING = "unpickling can execute arbitrary code"


def _models(tmp_path: Path, **update) -> ModelSettings:
    return make_settings(tmp_path).models.model_copy(update=update)


@pytest.fixture(scope="module")
def random_models(tmp_path_factory) -> dict[str, LoadedModel]:
    """The random tiny models every test compares against, built once."""
    settings = _models(tmp_path_factory.mktemp("random"))
    return {
        arch: load_model(resolve(f"random:{arch}", settings), settings) for arch in ("tiny-sd15", "tiny-sdxl")
    }


@pytest.fixture
def no_network(monkeypatch) -> list[object]:
    """Any attempt to open a connection fails the test (and is recorded)."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def assert_same_weights(want, got) -> None:
    assert type(got) is type(want)
    same_weights(want, got)


# 1. Single-file checkpoints in the original (A1111 / LDM) layout.


@pytest.mark.parametrize(("arch", "family"), [("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")])
def test_single_file_reads_back_every_weight(tmp_path, random_models, no_network, arch, family):
    settings = _models(tmp_path)
    original = random_models[arch]
    ckpt = save_ldm_checkpoint(original.pipe, settings.model_dir / f"{arch}.safetensors")

    plain = resolve(str(ckpt), settings)
    assert (plain.kind, plain.family, plain.location, plain.arch) == ("single-file", family, str(ckpt), None)

    for ref in (f"{ckpt}#arch={arch}", f"{arch}#arch={arch}", f"{arch}.safetensors#arch={arch}"):
        source = resolve(ref, settings)
        assert (source.name, source.kind, source.family, source.arch) == (ref, "single-file", family, arch)
        assert Path(source.location) == ckpt
    loaded = load_model(source, settings)
    assert loaded.family == family
    assert_same_weights(original.pipe, loaded.pipe)
    assert type(loaded.pipe.scheduler) is type(original.pipe.scheduler)
    assert not no_network


def test_single_file_that_does_not_fit_the_full_size_config_says_how_to_name_one(
    tmp_path, random_models, no_network
):
    settings = _models(tmp_path)
    ckpt = save_ldm_checkpoint(random_models["tiny-sdxl"].pipe, settings.model_dir / "tiny.safetensors")
    with pytest.raises(UserError, match=r"does not fit the shipped 'sdxl' architecture.*#arch=") as err:
        load_model(resolve("tiny", settings), settings)
    assert str(ckpt) in str(err.value)


def test_arch_suffix_is_checked(tmp_path, random_models):
    settings = _models(tmp_path)
    save_ldm_checkpoint(random_models["tiny-sd15"].pipe, settings.model_dir / "tiny15.safetensors")
    random_models["tiny-sd15"].pipe.save_pretrained(settings.model_dir / "folder")
    with pytest.raises(UserError, match="sd15 checkpoint cannot be read with the sdxl architecture"):
        resolve("tiny15#arch=tiny-sdxl", settings)
    with pytest.raises(UserError, match="unknown architecture 'tiny-sd99'"):
        resolve("tiny15#arch=tiny-sd99", settings)
    with pytest.raises(UserError, match=r"unknown architecture '\.\.'"):
        resolve("tiny15#arch=..", settings)
    with pytest.raises(UserError, match="only to single-file"):
        resolve("folder#arch=tiny-sd15", settings)
    with pytest.raises(UserError, match="'missing' not found"):
        resolve("missing#arch=tiny-sd15", settings)


# 2. Diffusers folders.


@pytest.mark.parametrize(("arch", "family"), [("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")])
def test_diffusers_folder_by_name_and_by_path(tmp_path, random_models, no_network, arch, family):
    settings = _models(tmp_path)
    original = random_models[arch]
    folder = settings.model_dir / "myfolder"
    original.pipe.save_pretrained(folder)

    by_name, by_path = resolve("myfolder", settings), resolve(str(folder.resolve()), settings)
    for source in (by_name, by_path):
        assert (source.kind, source.family, Path(source.location).resolve()) == (
            "diffusers-folder",
            family,
            folder.resolve(),
        )
    assert by_name.name == "myfolder"
    loaded = load_model(by_path, settings)
    assert loaded.family == family
    assert_same_weights(original.pipe, loaded.pipe)
    assert not no_network


def test_a_resident_model_is_not_looked_up_again(tmp_path, random_models):
    """Every job names its model: once it is resident, its source comes from memory, so a folder
    moved away under a running service keeps serving what was loaded, and a model that is not
    resident is still checked on disk."""
    settings = _models(tmp_path)
    folder = settings.model_dir / "resident"
    random_models["tiny-sd15"].pipe.save_pretrained(folder)
    cache = ModelCache(settings)
    loaded = cache.get("resident")
    folder.rename(settings.model_dir / "moved")
    assert cache.source("resident") is loaded.source
    with pytest.raises(UserError, match="not found"):
        cache.source("moved-elsewhere")


def test_diffusers_folder_with_pickle_weights_is_refused(tmp_path, random_models):
    settings = _models(tmp_path)
    folder = settings.model_dir / "binfolder"
    random_models["tiny-sd15"].pipe.save_pretrained(folder, safe_serialization=False)
    for weights in folder.rglob("*.safetensors"):  # leave only the pickled .bin weights
        weights.unlink()
    with pytest.raises(UserError, match="unpickling can execute arbitrary code"):
        load_model(resolve("binfolder", settings), settings)


def test_sd2_is_told_from_sd1_by_its_text_encoder(tmp_path):
    """tiny-sd21's UNet is narrow (cross_attention_dim 32, not 1024): its OpenCLIP encoder says SD 2."""
    settings = _models(tmp_path)
    source = resolve("random:tiny-sd21", settings)
    assert source.family == "sd21"
    model = load_model(source, settings)
    assert model.family == "sd21"
    model.pipe.save_pretrained(settings.model_dir / "sd2-folder")
    assert resolve("sd2-folder", settings).family == "sd21"
    assert resolve("random:tiny-sd15", settings).family == "sd15"


# 3. Hugging Face hub ids, from the local cache only.

REPO = "imagegenx-test/tiny-sd15"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache; huggingface_hub read its constants at import, so patch the module too."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path, hub_cache, no_network):
    settings = _models(tmp_path)
    with pytest.raises(UserError) as at_resolve:
        resolve(REPO, settings)  # said when the reference is given, not when the first image needs it
    with pytest.raises(UserError) as at_load:
        load_model(ModelSource(REPO, "hub", "unknown", REPO), settings)  # and by the loader itself
    for err in (at_resolve, at_load):
        message = str(err.value)
        assert repr(REPO) in message
        assert "not in the local Hugging Face cache" in message and str(hub_cache) in message
        assert "this machine is offline" in message and f"hf download {REPO}" in message
    assert not no_network


def test_hub_id_not_cached_with_downloads_disabled(tmp_path, hub_cache, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    settings = _models(tmp_path, allow_downloads=False)
    reason = f"'{REPO}' is not in the local .* downloads are disabled"
    with pytest.raises(UserError, match=reason):
        resolve(REPO, settings)
    with pytest.raises(UserError, match=reason):
        load_model(ModelSource(REPO, "hub", "unknown", REPO), settings)
    assert not no_network


def test_hub_id_loads_from_the_cache_and_generates(tmp_path, random_models, hub_cache, no_network):
    from imagegenx.engine.engine import Engine

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = hub_cache / f"models--{REPO.replace('/', '--')}"
    random_models["tiny-sd15"].pipe.save_pretrained(repo_folder / "snapshots" / revision)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(revision)

    settings = make_settings(tmp_path, min_size=64)
    source = resolve(REPO, settings.models)
    assert (source.kind, source.location) == ("hub", REPO)
    loaded = load_model(source, settings.models)
    assert loaded.family == "sd15"
    assert_same_weights(random_models["tiny-sd15"].pipe, loaded.pipe)

    with Engine(settings) as engine:
        job = JobSpec("a red fox in snow", model=REPO, width=64, height=64, steps=3, seed=1)
        image = engine.submit(job).result(timeout=120)
    rgb = np.frombuffer(image.rgb, np.uint8).reshape(64, 64, 3)
    assert rgb.std() > 0
    assert engine.models.loads[REPO] == 1
    assert not no_network


# 4. Pickles are refused before a byte is read.


class _Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Payload(marker)})


def test_the_pickle_payload_is_live(tmp_path):
    marker = tmp_path / "canary"
    pickle.loads(_evil_pickle(marker)).get("state_dict").close()
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_are_refused_unread(tmp_path, suffix):
    settings = _models(tmp_path)
    marker = tmp_path / "unpickled"
    path = settings.model_dir / f"evil{suffix}"
    path.write_bytes(_evil_pickle(marker))
    refs = [str(path), f"evil{suffix}", f"{path}#arch=tiny-sd15", str(tmp_path / f"absent{suffix}")]
    for ref in refs:
        with pytest.raises(UserError, match=PICKLE_WARNING):
            resolve(ref, settings)
    with pytest.raises(UserError, match=PICKLE_WARNING):
        ModelCache(settings).get(f"evil{suffix}")
    [entry] = [m for m in list_models(settings) if m.name == f"evil{suffix}"]
    assert entry.source == "refused" and PICKLE_WARNING in entry.note
    assert not marker.exists()


# 5. Bad references.


def _write_safetensors_like(path: Path, header: object) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def test_bad_references_are_clear_errors(tmp_path):
    settings = _models(tmp_path)
    root = settings.model_dir
    (root / "empty-folder").mkdir()
    (root / "notes.safetensors").write_text("these are my favourite prompts, not weights\n" * 10)
    (root / "pickled.safetensors").write_bytes(_evil_pickle(tmp_path / "unpickled"))
    (root / "short.safetensors").write_bytes(b"1234")
    _write_safetensors_like(root / "list-header.safetensors", [1, 2, 3])
    _write_safetensors_like(root / "lora.safetensors", {"lora_unet_x.alpha": {"dtype": "F32", "shape": [1]}})
    (root / "image.png").write_bytes(b"\x89PNG\r\n")

    cases = {
        "empty-folder": "no model_index.json",
        "notes.safetensors": "not a .safetensors file",
        "pickled.safetensors": "not a .safetensors file",
        "short.safetensors": "not a .safetensors file",
        "list-header": "not a .safetensors file",
        "lora": "not a Stable Diffusion 1.x/2.x/XL checkpoint",
        "image.png": "unsupported model file type '.png'",
        "random:tiny-sd99": "unknown architecture 'tiny-sd99'; shipped architectures: .*tiny-sd15",
        "random:": "unknown architecture ''",
        "random:../archs/tiny-sd15": "unknown architecture",
        "": "no model given",
        "   ": "no model given",
        "nowhere": "model 'nowhere' not found",
        "some/missing.safetensors": "model 'some/missing.safetensors' not found",
    }
    for ref, reason in cases.items():
        with pytest.raises(UserError, match=reason):
            resolve(ref, settings)
    assert not (tmp_path / "unpickled").exists()


# 6. Listing, in Python and through the CLI.


def _fill_model_dir(settings: ModelSettings, random_models) -> None:
    pipe = random_models["tiny-sd15"].pipe
    pipe.save_pretrained(settings.model_dir / "myfolder")
    save_ldm_checkpoint(random_models["tiny-sdxl"].pipe, settings.model_dir / "tinyxl.safetensors")
    (settings.model_dir / "old.ckpt").write_bytes(_evil_pickle(settings.model_dir.parent / "unpickled"))


def _expected(settings: ModelSettings) -> dict[str, tuple[str, str]]:
    expected = {
        f"random:{arch}": ("random", resolve(f"random:{arch}", settings).family) for arch in list_archs()
    }
    return expected | {
        "myfolder": ("diffusers-folder", "sd15"),
        "tinyxl.safetensors": ("single-file", "sdxl"),
        "old.ckpt": ("refused", "-"),
    }


def test_list_models(tmp_path, random_models):
    settings = _models(tmp_path)
    _fill_model_dir(settings, random_models)
    found = {m.name: m for m in list_models(settings)}
    assert {name: (m.source, m.family) for name, m in found.items()} == _expected(settings)
    assert {"random:tiny-sd15", "random:tiny-sdxl", "random:sdxl", "random:flux-dev"} <= found.keys()
    assert found["random:tiny-sd21"].family == "sd21"
    assert PICKLE_WARNING in found["old.ckpt"].note
    assert found["tinyxl.safetensors"].location == str(settings.model_dir / "tinyxl.safetensors")
    assert not (tmp_path / "unpickled").exists()


def test_cli_models_json(tmp_path, random_models):
    from imagegenx.cli import app

    settings = _models(tmp_path)
    _fill_model_dir(settings, random_models)
    env = {
        "IMAGEGENX_MODELS__MODEL_DIR": str(settings.model_dir),
        "IMAGEGENX_MODELS__TINY_DECODERS": '{"sdxl": "random"}',
    }
    result = CliRunner().invoke(app, ["models", "--json"], env=env)
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    listed = {e["name"]: (e["source"], e["family"]) for e in entries}
    assert listed == _expected(settings)
    # SDXL's tiny decoder also serves its refiner; SD 1.5 has none here.
    tiny = {e["family"] for e in entries if e["tiny_decoder"]}
    assert tiny == {"sdxl", "sdxl-refiner"}
    [refused] = [e for e in entries if e["name"] == "old.ckpt"]
    assert PICKLE_WARNING in refused["note"]
    assert not (tmp_path / "unpickled").exists()


# 7. Each model is loaded once, and reloaded only after eviction.


def test_model_cache_loads_once_and_counts_reloads(tmp_path, random_models):
    settings = _models(tmp_path)
    random_models["tiny-sd15"].pipe.save_pretrained(settings.model_dir / "myfolder")

    cache = ModelCache(settings)
    first = cache.get("random:tiny-sd15")
    assert cache.get("random:tiny-sd15") is first
    assert cache.loads == {"random:tiny-sd15": 1}

    single = ModelCache(settings.model_copy(update={"max_resident_models": 1}))
    for ref in ("random:tiny-sd15", "myfolder", "myfolder", "random:tiny-sd15"):
        assert single.get(ref).source.name == ref
        assert single.resident() == [ref]
    assert single.loads == {"random:tiny-sd15": 2, "myfolder": 1}


def test_random_models_are_wholly_in_the_asked_dtype():
    """A transformers config's own torch_dtype (the full SDXL's text_encoder_2 says float16) builds
    most layers in it but not the text projection: the random model must come out in one dtype, or
    every prompt encode on a CPU fails (Half != float)."""
    import torch
    import transformers

    from imagegenx.models.loader import _cast
    from imagegenx.models.sources import arch_dir

    config = transformers.AutoConfig.from_pretrained(arch_dir("tiny-sdxl") / "text_encoder_2")
    config.torch_dtype = torch.float16
    built = transformers.CLIPTextModelWithProjection(config)
    model = _cast(built, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.ones(2, 77, dtype=torch.long)
    assert model(ids).text_embeds.dtype == torch.float32
