"""Portrait jobs (seed 000) end to end on the CPU: real selfie-like photos (scikit-image's astronaut,
crops and mirror images of it), ``random:tiny-sdxl`` drafts at 64x64, QC, shortlist, refine, fix,
upscale, report and contact sheet; bad selfies get one clear error naming each file.

Drafts of a random model contain no faces, so their identity score is 0.0 with ``faces`` 0, and their
SSIM against the selfie crop is far below τ 0.75: the shortlist is filled from the ungated ranking
(or empty with ``strict_ssim``). ``test_identity_is_the_cosine_to_the_selfie_mean`` scores real faces.
"""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from conftest import make_settings
from imagegenx.cli import app
from imagegenx.engine.engine import Engine
from imagegenx.engine.portrait import STAGES, PortraitSpec, run_portrait
from imagegenx.models.controlnet import RANDOM_CONTROLNET
from imagegenx.models.instantid import RANDOM_INSTANTID
from imagegenx.postprocess.contact_sheet import LABEL, OUTLINE_COLOR, PAD, sheet_grid
from imagegenx.postprocess.encode import read_parameters
from imagegenx.postprocess.shortlist import score_drafts
from imagegenx.types import GeneratedImage, JobSpec, UserError
from imagegenx.vision.identity import DlibIdentity, cosine, mean_embedding
from imagegenx.vision.selfie import RANDOM_ARCFACE, SelfieError, read_selfie

MODEL = "random:tiny-sdxl"


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def selfies() -> list[tuple[str, bytes]]:
    """The astronaut, a 256x256 crop around her face (JPEG) and her mirror image."""
    astronaut = data.astronaut()
    return [
        ("astronaut.png", _encode(astronaut)),
        ("face-crop.jpg", _encode(astronaut[0:256, 90:346], "JPEG")),
        ("mirrored.png", _encode(astronaut[:, ::-1])),
    ]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine(make_settings(tmp_path_factory.mktemp("portrait"))) as engine:
        yield engine


def _spec(**changes) -> PortraitSpec:
    values = {"prompt": "a portrait photo of a woman", "model": MODEL, "seed": 3, "refiner_steps": 2}
    return PortraitSpec(**(values | changes))


def _outlined(sheet: Image.Image, n: int) -> set[int]:
    """The cells that carry the shortlist outline (it runs through the cell's padding above the
    thumbnail; WebP is lossy, so near the colour is enough)."""
    cols = sheet_grid(n)[0]
    rgb = sheet.convert("RGB")
    found = set()
    for i in range(n):
        x = (i % cols) * (128 + 2 * PAD) + PAD + 64
        y = (i // cols) * (128 + LABEL + 2 * PAD) + PAD - 2
        if sum(abs(a - b) for a, b in zip(rgb.getpixel((x, y)), OUTLINE_COLOR, strict=True)) < 60:
            found.add(i)
    return found


def test_portrait_run_of_8_drafts(engine, selfies):
    calls: list[tuple[str, int, int]] = []
    spec = _spec(n=8, shortlist=5, refine_top=3, upscale=2)
    result = run_portrait(engine, selfies, spec, lambda *call: calls.append(call))
    report = result.report

    # Progress: every stage, in order; one drafts call per finished draft.
    stages = [stage for i, (stage, _, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != stage]
    assert stages == list(STAGES)
    assert [done for stage, done, _ in calls if stage == "drafts"] == list(range(9))
    assert [done for stage, done, _ in calls if stage == "upscale"] == list(range(6))  # one by one
    assert all(done <= total for _, done, total in calls)

    # Every draft: its seed, its QC scores; the drafts went to the engine together and shared batches.
    assert [d["seed"] for d in report["drafts"]] == list(range(3, 11))
    for draft in report["drafts"]:
        qc = draft["qc"]
        assert qc["sharpness"] > 0 and 0 <= qc["nsfw"] <= 1 and -1 <= qc["ssim"] < 1
        assert qc["faces"] == 0 and qc["identity"] == 0.0  # random weights draw no faces
    assert max(d["batch_size"] for d in report["drafts"]) > 1
    assert [s["status"] for s in report["selfies"]] == ["ok"] * 3
    assert all(s["face_px"] >= 64 for s in report["selfies"])

    # The SSIM gate: noise never looks like the selfie, so the shortlist is filled and says so.
    passed = sum(d["qc"]["ssim"] >= 0.75 for d in report["drafts"])
    assert report["ssim_gate"] == {"tau": 0.75, "passed": passed, "of": 8, "strict": False}
    assert result.warnings == [
        f"{passed} of 8 drafts passed the SSIM gate (τ 0.75); the shortlist is filled up with the best "
        "of the other drafts"
    ]
    shortlist = report["shortlist"]
    assert [s["position"] for s in shortlist] == list(range(1, 6))
    scores = [s["qc"]["score"] for s in shortlist]
    assert scores == sorted(scores, reverse=True)  # best first by the ungated score

    # The finals: the top 3 refined, all upscaled x2, encoded with their parameters.
    assert [("refine" in image.post) for image in result.finals] == [True] * 3 + [False] * 2
    for entry, image in zip(shortlist, result.finals, strict=True):
        assert entry["file"] == f"{entry['position']:02d}-seed{entry['seed']}.webp"
        encoded = result.files[entry["file"]]
        assert Image.open(io.BytesIO(encoded)).size == (128, 128)
        assert f"Seed: {entry['seed']}" in read_parameters(encoded)
        sidecar = json.loads(result.files[entry["file"].replace(".webp", ".json")])
        assert sidecar["qc"] == entry["qc"] and "upscale x2" in sidecar["postprocess_seconds"]
        assert image.post["qc"]["score"] == entry["qc"]["score"]

    # Report and contact sheet.
    assert json.loads(result.files["report.json"]) == report
    assert set(report["timings_s"]) == {*STAGES, "total"}
    sheet = Image.open(io.BytesIO(result.files["contact_sheet.webp"]))
    assert sheet.size == sheet_grid(8)[2:] == (3 * 136, 3 * 150)
    assert _outlined(sheet, 8) == {entry["draft"] for entry in shortlist}
    positions = [d["shortlist_position"] for d in report["drafts"]]
    assert sorted(p for p in positions if p) == [1, 2, 3, 4, 5] and positions.count(None) == 3


def test_finals_encode_while_the_next_ones_upscale(engine, selfies, monkeypatch):
    """Each final goes to an encoder thread once it is upscaled: every upscale after the first finds
    the encode of an earlier final begun (all encodes after the last upscale would time out here);
    and two finals upscale at once, so one's host work overlaps the other's device work."""
    import threading

    import imagegenx.engine.portrait as portrait
    import imagegenx.engine.portrait_steps as steps

    encoding, upscales, waited, threads = threading.Event(), [], [], set()
    real_chain, real_encode = steps.apply_chain, portrait.encode_image
    lock = threading.Lock()

    def chain(images, spec, denoiser=None):
        if spec.upscale > 1:
            with lock:  # two finals upscale at once, on two threads
                first = not upscales
                upscales.append(len(images))
                threads.add(threading.get_ident())
            if not first:
                waited.append(encoding.wait(timeout=20))
        return real_chain(images, spec, denoiser=denoiser)

    def encode(image, fmt):
        encoding.set()
        return real_encode(image, fmt)

    monkeypatch.setattr(steps, "apply_chain", chain)
    monkeypatch.setattr(portrait, "encode_image", encode)
    result = run_portrait(
        engine, selfies[:1], _spec(n=4, shortlist=3, refine_top=0, face_fix=False, upscale=2)
    )
    assert upscales == [1, 1, 1] and waited == [True, True]
    assert len(threads) == 2  # the second final's upscale began while the first's was under way
    assert len([name for name in result.files if name.endswith(".webp")]) == 3 + 1  # and the sheet


def test_strict_ssim_gate_leaves_no_shortlist(engine, selfies, tmp_path):
    result = run_portrait(engine, selfies[:1], _spec(n=3, strict_ssim=True, upscale=1))
    assert result.report["shortlist"] == [] and result.finals == []
    assert result.warnings == ["0 of 3 drafts passed the SSIM gate (τ 0.75)"]
    assert all(d["shortlist_position"] is None for d in result.report["drafts"])
    written = result.save(tmp_path / "out")
    assert sorted(p.name for p in written) == ["contact_sheet.webp", "report.json"]
    assert _outlined(Image.open(tmp_path / "out" / "contact_sheet.webp"), 3) == set()


def test_identity_is_the_cosine_to_the_selfie_mean(selfies):
    """QC on real faces: identity is dlib's cosine to the mean embedding of all selfies; a draft that
    is the reference crop passes the SSIM gate and ranks first; a photo without a face scores 0."""
    detector = DlibIdentity()
    faces = [read_selfie(name, data, detector) for name, data in selfies]
    mean = mean_embedding([s.embedding for s in faces])
    size = 256
    crop = np.asarray(faces[0].crop.resize((size, size), Image.Resampling.BOX))
    other = np.asarray(faces[2].crop.resize((size, size)).rotate(8))  # the mirrored selfie, tilted
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((size, size)))
    drafts = [
        GeneratedImage(JobSpec("p", MODEL, seed=i), size, size, pixels.tobytes(), MODEL, 1)
        for i, pixels in enumerate([other, coffee, crop])
    ]
    scored, shortlist, passed = score_drafts(drafts, faces[0].crop, mean)
    qc = [image.post["qc"] for image in scored]
    for pixels, record in zip([other, coffee, crop], qc, strict=True):
        found = detector.faces(pixels)
        expected = cosine(found[0].embedding, mean) if found else 0.0
        assert record["identity"] == pytest.approx(expected, abs=1e-4)
        assert record["faces"] == len(found)
    assert qc[0]["identity"] > 0.9 and qc[2]["identity"] > 0.9  # the same person
    assert qc[1]["faces"] == 0 and qc[1]["identity"] == 0.0  # coffee: no face
    assert qc[2]["ssim"] > 0.95 and qc[2]["rank"] == 1 and passed == 1
    assert shortlist == [2, 0, 1]  # the gated ones fill the list, best identity first


def test_bad_selfies_are_named_with_their_reasons(engine, tmp_path):
    astronaut = data.astronaut()
    bad = [
        ("coffee.png", _encode(data.coffee())),
        ("notes.jpg", b"these are not pixels\n"),
        ("two.png", _encode(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1))),
        ("small.png", _encode(np.asarray(Image.fromarray(astronaut).resize((320, 320))))),
    ]
    with pytest.raises(UserError, match="give 1 to 3 selfies, not 4"):
        run_portrait(engine, bad, _spec(n=2))
    with pytest.raises(SelfieError) as caught:
        run_portrait(engine, bad[:3], _spec(n=2))
    problems = dict(caught.value.problems)
    assert list(problems) == ["coffee.png", "notes.jpg", "two.png"]
    assert problems["coffee.png"].startswith("no face found")
    assert problems["notes.jpg"] == "not a readable image"
    assert problems["two.png"].startswith("several faces (2)")
    with pytest.raises(SelfieError, match=r"small\.png: face too small \(\d+ px; at least 64\)"):
        run_portrait(engine, bad[3:], _spec(n=2))

    # The CLI: one line naming every bad file, status 2, no traceback.
    paths = []
    for name, content in bad[:3]:
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    result = CliRunner().invoke(
        app, ["portrait", *paths, "--prompt", "me", "-m", MODEL, "--out", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    for name in ("coffee.png", "notes.jpg", "two.png"):
        assert name in result.output
    assert not (tmp_path / "report.json").exists()


def test_cli_portrait_jpeg_lcm2(tmp_path, selfies, monkeypatch):
    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("IMAGEGENX_MODELS__DEVICE", "cpu")
    paths = []
    for name, content in selfies[:2]:
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    out = tmp_path / "out"
    args = ["portrait", *paths, "--prompt", "a woman in a garden", "-n", "4", "-m", MODEL, "--seed", "7"]
    args += ["--lcm2", "--upscale", "1", "--format", "jpeg", "--refiner-steps", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["steps"], report["cfg"], report["size"]) == (2, 6.0, [64, 64])  # seed 000 §6
    assert [d["seed"] for d in report["drafts"]] == [7, 8, 9, 10]
    files = [entry["file"] for entry in report["shortlist"]]
    assert len(files) == 4 and all(name.endswith(".jpg") for name in files)
    for name in files:
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
    assert Image.open(out / "contact_sheet.webp").size == sheet_grid(4)[2:]
    assert "wrote 4 portrait(s)" in result.output

    refused = CliRunner().invoke(app, [*args, "--steps", "3"])
    assert refused.exit_code == 2 and "--lcm2 runs 2 steps" in refused.output


def test_spec_checks_and_seed_000_modes():
    assert (_spec().draft_steps, _spec().draft_cfg) == (4, 6.5)
    assert (_spec(lcm2=True).draft_steps, _spec(lcm2=True).draft_cfg) == (2, 6.0)
    with pytest.raises(UserError, match="both its adapter"):
        _spec(instantid="random:instantid")
    with pytest.raises(UserError, match="--arcface"):
        _spec(instantid="random:instantid", identitynet="random:controlnet")
    with pytest.raises(UserError, match="upscale"):
        _spec(upscale=3)
    with pytest.raises(UserError, match="unknown image format"):
        _spec(image_format="bmp")


def test_portrait_run_of_100_drafts(engine, selfies):
    """The issue's run: 100 drafts with random tiny InstantID parts (identity adapter, IdentityNet,
    the random:arcface stand-in embedding), shortlist 15, top 10 refined, face fix; upscale off (CPU)."""
    instantid = {"instantid": RANDOM_INSTANTID, "identitynet": RANDOM_CONTROLNET, "arcface": RANDOM_ARCFACE}
    started = time.perf_counter()
    result = run_portrait(engine, selfies, _spec(n=100, upscale=1, **instantid))
    elapsed = time.perf_counter() - started
    report = result.report
    assert len(report["drafts"]) == 100 and all("qc" in d for d in report["drafts"])
    assert [s["position"] for s in report["shortlist"]] == list(range(1, 16))
    assert sum("refine" in image.post for image in result.finals) == 10
    assert Image.open(io.BytesIO(result.files["contact_sheet.webp"])).size == sheet_grid(100)[2:]
    assert engine.models.loads[RANDOM_INSTANTID] == 1 and engine.models.loads[RANDOM_CONTROLNET] == 1
    assert report["instantid"]["adapter"] == RANDOM_INSTANTID
    print(f"100 drafts: {elapsed:.1f} s; stages: {report['timings_s']}")


def test_a_progress_callback_that_raises_cancels_the_queued_drafts(engine, selfies):
    """How a caller stops a run (the service, when its task is cancelled): the drafts not yet done
    are cancelled in the engine, which keeps serving."""
    statuses: dict[str, str] = {}
    unsubscribe = engine.subscribe(lambda event: statuses.__setitem__(event.job_id, event.status))

    def stop(stage: str, done: int, total: int) -> None:
        if stage == "drafts" and done == 1:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            run_portrait(engine, selfies[:1], _spec(n=48), stop)
        # The engine keeps serving; once this image is back, it has stepped past the cancellations.
        [image] = engine.run([JobSpec("after", MODEL, width=64, height=64, steps=1)])
        assert isinstance(image, GeneratedImage)
    finally:
        unsubscribe()
    drafts = {job: status for job, status in statuses.items() if job.startswith("portrait-")}
    assert len(drafts) == 48 and "canceled" in drafts.values()
    assert set(drafts.values()) <= {"succeeded", "canceled"}


def test_portrait_over_http_with_progress_events(tmp_path, selfies):
    """POST /api/v1/portrait: one task, staged progress over SSE, ranked images, report, sheet."""
    import base64

    from support.server import Server, wait_for

    server = Server(tmp_path, model=MODEL).start()
    try:
        with server.client(server.key(tier="paid")) as client, server.client(server.key(tier="free")) as free:
            body = {
                "prompt": "a portrait photo of a woman",
                "selfies": [base64.b64encode(data).decode() for _, data in selfies],
                "n": 100, "shortlist": 4, "refine_top": 2, "upscale": 1, "seed": 5,
                "instantid": RANDOM_INSTANTID, "identitynet": RANDOM_CONTROLNET,
            }  # fmt: skip
            # InstantID needs an ArcFace embedding: refused without one, random parts run with the stand-in.
            refused = client.post("/api/v1/portrait", json=body)
            assert refused.status_code == 400 and "ArcFace" in refused.json()["message"]
            missing = client.post("/api/v1/portrait", json=body | {"arcface": "w600k_r50"})
            assert missing.status_code == 400 and "w600k_r50.onnx" in missing.json()["message"]
            body |= {"arcface": RANDOM_ARCFACE}
            assert free.post("/api/v1/portrait", json=body | {"upscale": 4}).status_code == 403
            response = client.post("/api/v1/portrait", json=body)
            assert response.status_code == 200, response.text
            task_id = response.json()["data"]["task_ids"][0]
            stages = []
            with client.stream("GET", f"/api/v1/image/task/{task_id}/events", timeout=300) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        stages.append(event.get("stage"))
                        if event["status"] in ("succeeded", "failed"):
                            break
            seen = [stage for stage in dict.fromkeys(stages) if stage]
            assert seen == [s for s in STAGES if s in seen] and {"drafts", "qc", "write"} <= set(seen)
            view = wait_for(client, task_id, timeout=300)
            assert view["status"] == "succeeded", view["error"]
            assert {"original", "rank1", "rank4", "report", "contact_sheet"} <= set(view["urls"])
            report = client.get(view["urls"]["report"]).json()
            assert len(report["drafts"]) == 100 and len(report["shortlist"]) == 4
            assert report["instantid"]["adapter"] == RANDOM_INSTANTID
            best = Image.open(io.BytesIO(client.get(view["urls"]["original"]).content))
            assert best.size == (64, 64)
            sheet = Image.open(io.BytesIO(client.get(view["urls"]["contact_sheet"]).content))
            assert sheet.size == sheet_grid(100)[2:]
            bad = client.post(
                "/api/v1/portrait", json=body | {"selfies": [base64.b64encode(b"text").decode()]}
            )
            view = wait_for(client, bad.json()["data"]["task_ids"][0], timeout=120)
            assert view["status"] == "failed" and "selfie1: not a readable image" in view["error"]
    finally:
        server.stop()


def test_upscales_run_two_at_a_time_except_under_cuda_graphs(monkeypatch):
    """Two finals upscale at once on two threads, results in order; a CUDA-graphed upscaler stays on
    the caller's thread, where its graphs were recorded (graph trees are per thread)."""
    import threading
    import time
    from types import SimpleNamespace

    import imagegenx.engine.portrait_steps as steps

    seen: list[int] = []
    inside, most = [0], [0]
    lock = threading.Lock()

    def chained(images, spec, engine):
        with lock:
            seen.append(threading.get_ident())
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # long enough for the next final's call to begin beside this one
        with lock:
            inside[0] -= 1
        return [images[0] * 10]

    monkeypatch.setattr(steps, "chained", chained)
    for mode, overlapped in (("default", True), ("reduce-overhead", False)):
        seen.clear()
        most[0] = 0
        engine = SimpleNamespace(settings=SimpleNamespace(models=SimpleNamespace(upscaler_compile=mode)))
        assert list(steps.upscaled([1, 2, 3, 4], None, engine)) == [10, 20, 30, 40]
        caller = threading.get_ident()
        if overlapped:
            assert most[0] == 2 and caller not in seen and len(set(seen)) == 2
        else:
            assert most[0] == 1 and set(seen) == {caller}
