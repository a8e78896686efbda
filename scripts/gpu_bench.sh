#!/usr/bin/env bash
# The commands behind BENCHMARKS.md, run on a lent GPU machine (see the device tool's README): the
# image there has torch but not diffusers and the service's packages, so wheels travel in .gpu/whl
# (and the real helper models' files in .gpu/site, .gpu2/site), installed into /tmp/site.
#   scripts/gpu_bench.sh setup      # once per machine: wheels and model files into /tmp/site
#   scripts/gpu_bench.sh eager|portrait|http|profile|compiled   # one part of the run, results in $OUT
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-out}
mkdir -p "$OUT"
run() { echo "+ $*"; "$@" 2>&1 | grep -v "^\[transformers\]" | tee -a "$OUT/log.txt"; }
case "${1:-}" in
setup)
    for dir in .gpu .gpu2; do
        [ -d "$dir/whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site "$dir"/whl/*.whl
        [ -d "$dir/site" ] && cp -r "$dir"/site/. /tmp/site/
    done
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
    ;;
eager)
    run python3 -m imagegenx.cli bench cold-start flux-dev-1024-28 esrgan-x4-1024 vae-decode-1024 \
        --peer-compile off --out "$OUT/bench-eager.json"
    ;;
portrait)
    run python3 -m imagegenx.cli bench portrait-100 --out "$OUT/bench-portrait.json"
    ;;
http)
    # turbo-512-1 through the HTTP API: `imagegenx serve` with batches of 32, open-loop Poisson load
    run python3 scripts/loadgen.py --start-server random:sd21 --server-env IMAGEGENX_ENGINE__MAX_BATCH=32 \
        --server-env IMAGEGENX_MODELS__DEVICE=cuda --width 512 --height 512 --steps 1 --cfg 0 --sampler euler \
        --rate "${RATE:-40}" --duration 40 --warmup 10 --json "$OUT/http-turbo-512-1.json"
    ;;
profile)
    run python3 scripts/profile_engine_gpu.py "$OUT"
    ;;
compiled)
    IMAGEGENX_MODELS__COMPILE=default run python3 -m imagegenx.cli bench sdxl-1024-30 \
        --peer diffusers-fast --peer-compile default --out "$OUT/bench-compiled.json"
    ;;
*)
    echo "usage: $0 setup|eager|portrait|http|profile|compiled" >&2
    exit 2
    ;;
esac
