"""Deployment artefacts (deploy/): they must name only settings, routes, metrics and queue consumers
that really exist. Helm is not installed here, so templates are checked as a skeleton (template lines
dropped, inline expressions replaced) and the metric names against the real registries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from imagegenx.api.app import create_app
from imagegenx.config import ServiceSettings, Settings, StorageSettings
from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.engine.metrics import failure_reason
from imagegenx.types import JobSpec, LoraRef
from support.nats_server import nats_url  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "imagegenx"
DASHBOARD = DEPLOY / "grafana" / "imagegenx.json"
MODEL = "random:tiny-sd15"
# Labels Prometheus adds when it scrapes (deploy/prometheus/prometheus.yml), and histogram buckets'
SCRAPE_LABELS = {"namespace", "pod", "component", "release", "port_name", "job", "instance", "le"}


def helpers() -> dict[str, str]:
    """The bodies of the chart's named templates (``define`` blocks of _helpers.tpl)."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    blocks = re.split(r'\{\{-? define "([^"]+)" -?\}\}\n?', text)[1:]
    return {
        name: body[: body.rindex("{{- end -}}")] for name, body in zip(blocks[::2], blocks[1::2], strict=True)
    }


def skeleton(text: str) -> list[dict]:
    """A template's YAML without Helm: ``include ... | nindent N`` lines become the named template's
    lines, other lines that are only template actions go (an ``else`` starts a new document, so both
    branches parse), inline ``{{ ... }}`` becomes ``TPL``."""
    named = helpers()

    def lines_of(text: str, indent: int = 0) -> list[str]:
        out = []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("{{") and stripped.endswith("}}"):
                include = re.match(r'\{\{-? include "([^"]+)" .*\| nindent (\d+) -?\}\}$', stripped)
                if include:
                    out += lines_of(named[include.group(1)], indent + int(include.group(2)))
                elif re.match(r"\{\{-?\s*else", stripped):
                    out.append("---")
                continue
            out.append(" " * indent + re.sub(r"\{\{.*?\}\}", "TPL", line))
        return out

    return [doc for doc in yaml.safe_load_all("\n".join(lines_of(text))) if doc]


def chart_objects() -> list[dict]:
    return [
        doc for path in sorted((CHART / "templates").glob("*.yaml")) for doc in skeleton(path.read_text())
    ]


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in chart_objects() if doc["kind"] == kind]


def containers(component: str) -> list[dict]:
    [deployment] = [d for d in by_kind("Deployment") if d["metadata"]["name"].endswith(f"-{component}")]
    return deployment["spec"]["template"]["spec"]["containers"]


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def settings_env_names() -> set[str]:
    names = set()
    for section, field in Settings.model_fields.items():
        assert isinstance(field.default_factory(), BaseModel)
        for name in field.default_factory().__class__.model_fields:
            names.add(f"IMAGEGENX_{section}__{name}".upper())
    return names


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> dict[str, set[str]]:
    """Every metric family an API node and a worker's engine expose, with the labels it carries,
    from real scrapes: an API node answering requests, an engine that ran a LoRA job and a failing one."""
    from diffusers import StableDiffusionPipeline

    from conftest import make_settings
    from imagegenx.models.lora_files import write_peft_lora

    tmp = tmp_path_factory.mktemp("deploy")
    storage = StorageSettings(database_url=f"sqlite:///{tmp / 'tasks.db'}", blob_url=str(tmp / "blobs"))
    service = ServiceSettings(metrics_token="scrape-token")  # as the chart gives Prometheus
    with TestClient(create_app(Settings(storage=storage, service=service), run_worker=False)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/image/task/nope").status_code == 401
        api_text = client.get("/metrics", headers={"Authorization": "Bearer scrape-token"}).text
    settings = make_settings(tmp)
    with Engine(settings) as engine:
        components = engine.models.get(MODEL).pipe.components
        write_peft_lora(
            settings.models.lora_dir / "style.safetensors", StableDiffusionPipeline, components, seed=3
        )
        job = JobSpec("a barn", MODEL, width=64, height=64, steps=2, seed=1, loras=(LoraRef("style", 0.8),))
        engine.submit(job).result(timeout=300)
        with pytest.raises(JobFailed):
            engine.submit(
                JobSpec("a barn", MODEL, width=64, height=64, steps=2, loras=(LoraRef("nope"),))
            ).result(timeout=300)
        engine_text = generate_latest(engine.metrics.registry).decode()
    families: dict[str, set[str]] = {}
    for text in (api_text, engine_text):
        for family in text_string_to_metric_families(text):
            labels = families.setdefault(family.name, set())
            for sample in family.samples:
                labels.update(sample.labels)
    families["engine_text"] = {engine_text}  # for the unit test below
    families["api_text"] = {api_text}
    return families


def test_every_yaml_and_json_file_parses():
    files = [
        p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and "templates" not in p.parts
    ]
    assert {p.name for p in files} >= {"Chart.yaml", "values.yaml", "prometheus.yml", "imagegenx.json"}
    for path in files:
        assert (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text()), path
    kinds = {doc["kind"] for doc in chart_objects()}
    assert kinds >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ScaledObject",
        "HorizontalPodAutoscaler",
        "PodMonitor",
    }


def test_chart_sets_only_settings_that_exist():
    known = settings_env_names()
    used = set()
    for path in [CHART / "values.yaml", *(CHART / "templates").iterdir()]:
        used |= set(re.findall(r"IMAGEGENX_[A-Z0-9_]+", path.read_text()))
    assert len(used) >= 15
    assert used <= known, sorted(used - known)
    # The secrets travel in a Secret, not the ConfigMap
    [config] = by_kind("ConfigMap")
    assert not {k for k in config["data"] if "DATABASE_URL" in k or "SECRET" in k or "ACCESS_KEY" in k}


def test_probes_hit_real_routes_and_ports():
    app = create_app(run_worker=False)
    routes = set(app.openapi()["paths"])
    [api] = containers("api")
    ports = {port["name"] for port in api["ports"]}
    assert api["args"] == ["api"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert api[probe]["httpGet"]["path"] in routes
        assert api[probe]["httpGet"]["port"] in ports
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_worker_asks_for_gpus_and_time_to_drain():
    [worker] = containers("worker")
    assert worker["args"][:3] == ["worker", "--gpus", "all"]
    assert "nvidia.com/gpu" in worker["resources"]["limits"]
    assert "nvidia.com/gpu" in worker["resources"]["requests"]
    [models] = [m for m in worker["volumeMounts"] if m["name"] == "models"]
    assert models["readOnly"] is True
    v = values()["worker"]
    assert v["terminationGracePeriodSeconds"] > v["graceSeconds"] >= 60
    assert v["tolerations"] and v["nodeSelector"]
    assert {
        pdb["spec"].get("maxUnavailable", pdb["spec"].get("minAvailable"))
        for pdb in by_kind("PodDisruptionBudget")
    }


def queue_consumers(url: str) -> set[str]:
    """The durable consumers a real JetStream queue makes in its stream."""
    import asyncio
    import uuid

    import nats

    from imagegenx.queue.jetstream import JetStreamQueue

    queue = JetStreamQueue(url, stream=f"deploy-{uuid.uuid4().hex[:8]}")

    async def names() -> set[str]:
        client = await nats.connect(url)
        try:
            return {info.name for info in await client.jetstream().consumers_info(queue.stream)}
        finally:
            await client.close()

    try:
        return asyncio.run(names())
    finally:
        queue.drop()
        queue.close()


def test_keda_triggers_follow_the_queue_consumers_and_request_metric(scraped, request):
    worker, api = by_kind("ScaledObject")
    assert "{{- range .Values.keda.worker.lanes }}" in (CHART / "templates" / "scaling.yaml").read_text()
    [trigger] = worker["spec"]["triggers"]  # the range's body: one trigger per lane
    assert trigger["type"] == "nats-jetstream"
    assert {"natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"} <= set(trigger["metadata"])
    assert values()["settings"]["IMAGEGENX_QUEUE__STREAM"] == Settings().queue.stream
    # The chart's consumer names (a printf in _helpers.tpl) are those the queue really creates
    lanes = [lane["lane"] for lane in values()["keda"]["worker"]["lanes"]]
    fmt = re.search(
        r'define "imagegenx.laneConsumer".*?printf "([^"]+)"',
        (CHART / "templates" / "_helpers.tpl").read_text(),
        re.S,
    ).group(1)
    assert {fmt % lane for lane in lanes} == queue_consumers(request.getfixturevalue("nats_url"))
    [trigger] = api["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    scaling = (CHART / "templates" / "scaling.yaml").read_text()
    metric = re.search(r"sum\(rate\((\w+)\{", scaling).group(1)
    assert metric.removesuffix("_total") in scraped
    assert {"namespace", "route"} <= scraped[metric.removesuffix("_total")] | SCRAPE_LABELS


def test_dashboard_uses_real_metrics_and_labels(scraped):
    exprs = dashboard_exprs()
    text = DASHBOARD.read_text()
    for panel in (
        "resolution",
        "LoRA",
        "Queue depth per lane",
        "p50",
        "p99",
        "GPU seconds",
        "Failures by reason",
    ):
        assert panel in text
    used = set()
    for expr in exprs:
        for name in re.findall(r"\b(imagegenx_\w+)", expr):
            family = re.sub(r"(_total|_bucket|_sum|_count)$", "", name)
            assert family in scraped, f"{name} in {expr!r} is not exposed"
            used.add(family)
            labels = scraped[family] | SCRAPE_LABELS
            for group in re.findall(r"by \(([^)]*)\)", expr):
                assert {g.strip() for g in group.split(",")} <= labels, expr
            for matcher in re.findall(name + r"\{([^}]*)\}", expr):
                assert set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matcher)) <= labels, expr
    assert len(used) >= 12


def test_lora_usage_and_failure_reasons_are_counted(scraped):
    text = next(iter(scraped["engine_text"]))
    assert 'imagegenx_lora_images_total{lora="style"} 1.0' in text
    assert 'imagegenx_failures_total{reason="invalid"} 1.0' in text
    assert f'imagegenx_generation_seconds_count{{model="{MODEL}",resolution="64x64"}} 1.0' in text
    # The engine's other failure messages (engine/engine.py) get their own bounded reasons
    assert failure_reason("out of device memory even for one 1024x1024 image") == "out_of_memory"
    assert failure_reason("the image came out as NaN/infinite values (numerical overflow); not returned") == (
        "non_finite"
    )
    assert failure_reason("internal error: RuntimeError('boom')") == "internal"


def test_api_requests_are_counted_by_route_template(scraped):
    text = next(iter(scraped["api_text"]))
    assert (
        'imagegenx_http_requests_total{method="GET",route="/api/v1/image/task/{task_id}",status="401"} 1.0'
        in text
    )
    assert 'imagegenx_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert "/nope" not in text  # raw paths never become labels


def test_chart_runs_real_commands_in_an_image_that_has_them():
    import tomllib

    import typer.main

    from imagegenx.cli import app

    commands = typer.main.get_command(app).commands
    [api], [worker] = containers("api"), containers("worker")
    for args in (api["args"], worker["args"]):
        command = commands[args[0]]
        options = {opt for param in command.params for opt in param.opts}
        assert {a for a in args[1:] if a.startswith("--")} <= options, args
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["imagegenx"]' in dockerfile
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert re.search(r"ARG EXTRAS=(\w+)", dockerfile).group(1) in extras
    assert f"EXPOSE {values()['api']['port']}" in dockerfile


def test_readme_links_the_deployment_guide():
    guide = (DEPLOY / "README.md").read_text()
    assert "helm install" in guide and "KEDA" in guide
    assert "deploy/README.md" in (ROOT / "README.md").read_text()
