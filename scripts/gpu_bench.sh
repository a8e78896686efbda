#!/usr/bin/env bash
# The commands behind BENCHMARKS.md, run on a lent GPU machine (see the device tool's README): the
# image there has torch but not diffusers and the service's packages, so wheels and the helper models'
# files travel in .gpu, .gpu2 and .gpu3 (built by scripts/gpu_carry.sh; one call carries at most
# 64 MiB, so each folder goes in its own call, and `setup` installs whichever came into /tmp/site).
#   scripts/gpu_bench.sh setup      # in each call that carries a folder
#   scripts/gpu_bench.sh PART       # one part of the run, results in $OUT (parts below)
# Each part stops itself after LIMIT seconds (default 540) with SIGINT: the bench writes its JSON after
# every measured row, so a part cut short keeps what it measured. Inductor's cache stays in /tmp
# while the machine is held, so a later part compiles the same graphs from the cache.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) # absolute: parts run from the snapshot folder
LIMIT=${LIMIT:-540}
# Compiled artifacts (models/compile_artifacts.py) come back in $OUT; carried in .gpu5 to a later
# call or session (setup copies them into $OUT), they spare its compiles on the same GPU and torch.
export IMAGEGENX_MODELS__COMPILE_ARTIFACTS=${IMAGEGENX_MODELS__COMPILE_ARTIFACTS:-$OUT/compile-artifacts.zip}
export PYTHONFAULTHANDLER=1 # a crash in native code (a CUDA graph, a compiled kernel) leaves its stack in the log
run() { # the exit status goes into the log too: a part that dies without a traceback still says how
    echo "+ $*"
    timeout --signal=INT --kill-after=20 "$LIMIT" "$@" 2>&1 | grep -v "^\[transformers\]" | tee -a "$OUT/log.txt"
    echo "exit status ${PIPESTATUS[0]}: $*" | tee -a "$OUT/log.txt"
}
# BENCH_ARGS=--smoke: a dry run on the CPU. Every thread's stack goes into the log 25 s before the
# part's limit: a part cut short (a compile, a load) still says where its time went.
bench() { run python3 -m imagegenx.cli bench ${BENCH_ARGS:-} --stacks-after $((LIMIT > 60 ? LIMIT - 25 : LIMIT)) "$@"; }
case "${1:-}" in
setup)
    for dir in .gpu .gpu2 .gpu3 .gpu4 .gpu6; do # .gpu4: a few extra wheels (torchao, py-spy) when a call has room; .gpu6: a lean mix
        # Into a folder of its own, then merged: pip's --target --upgrade replaces the top-level folders
        # a wheel brings (bin/), and a later call's wheel took py-spy's bin/ away (eleventh run).
        if [ -d "$dir/whl" ] && ls "$dir"/whl/*.whl >/dev/null 2>&1; then
            rm -rf /tmp/site-new && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --target /tmp/site-new "$dir"/whl/*.whl && mkdir -p /tmp/site && cp -r /tmp/site-new/. /tmp/site/
        fi
        [ -d "$dir/site" ] && cp -r "$dir"/site/. /tmp/site/
    done
    [ -f .gpu5/compile-artifacts.zip ] && cp .gpu5/compile-artifacts.zip "$OUT/"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
    ;;
eager) # the generation scenarios beside both peers, nothing compiled
    # shellcheck disable=SC2086 # SCENARIOS is a list
    bench ${SCENARIOS:-sdxl-1024-30 sdxl-1024-lcm4 turbo-512-1 vae-decode-1024} ${PEERS:-} --peer-compile off \
        --out "$OUT/bench-${TAG:-eager}.json"
    ;;
plain) # scenarios without peers (esrgan-x4-1024, portrait-100, cold-start), as the engine is configured
    # shellcheck disable=SC2086 # SCENARIOS is a list
    bench ${SCENARIOS:-esrgan-x4-1024 portrait-100} --no-peers --out "$OUT/bench-${TAG:-plain}.json"
    ;;
compiled) # ours compiled (UNet and VAE; COMPILE=reduce-overhead for CUDA graphs) beside the recipe compiled
    # in default mode
    # shellcheck disable=SC2086 # SCENARIOS and PEERS are lists
    IMAGEGENX_MODELS__COMPILE=${COMPILE:-default} bench ${SCENARIOS:-sdxl-1024-30 sdxl-1024-lcm4 turbo-512-1} \
        ${PEERS:---peer diffusers-fast --peer-compile default} --out "$OUT/bench-${TAG:-compiled}.json"
    ;;
fp8) # ours compiled with fp8 matmuls (torchao, Hopper; its per-row float8 needs bf16 weights), alone
    # shellcheck disable=SC2086 # SCENARIOS is a list
    IMAGEGENX_MODELS__COMPILE=${COMPILE:-default} IMAGEGENX_MODELS__FP8=true IMAGEGENX_MODELS__DTYPE=bfloat16 bench ${SCENARIOS:-sdxl-1024-lcm4} --no-peers \
        --out "$OUT/bench-${TAG:-fp8}.json"
    ;;
autotune) # ours compiled beside diffusers' recipe exactly as published: compile max-autotune
    IMAGEGENX_MODELS__COMPILE=default bench "${SCENARIO:-sdxl-1024-30}" --peer diffusers-fast \
        --peer-compile max-autotune --out "$OUT/bench-autotune.json"
    ;;
http)
    # turbo-512-1 through the HTTP API: `imagegenx serve` with batches of 32, open-loop Poisson load;
    # a part cut by LIMIT still writes the load generator's report (it stops on SIGINT). First the
    # disk's fsync time, which bounds SQLite's commits (HTTP_ARGS: more loadgen options; by default
    # the engine runs in its own process, `serve --worker-process`; DECODER=tiny: a random tiny decoder).
    python3 -c "import os, statistics, time; f = os.open('/tmp/fsync.probe', os.O_WRONLY | os.O_CREAT)
t = []
for _ in range(50):
    os.write(f, b'x' * 4096); s = time.perf_counter(); os.fsync(f); t.append(time.perf_counter() - s)
print(f'fsync of 4 KiB in /tmp: median {statistics.median(t) * 1000:.2f} ms, max {max(t) * 1000:.2f} ms')" |
        tee -a "$OUT/log.txt"
    # Each worker runs every batch shape at 512² (each size: the engine here is eager) before its first lease (WARMUP_SIZES): the
    # schedule's first seconds then do not pay for the engine's first batch of each size.
    # shellcheck disable=SC2086 # HTTP_ARGS is a list
    run python3 scripts/loadgen.py ${HTTP_ARGS---server-arg=--worker-process} --start-server random:sd21 --server-env IMAGEGENX_ENGINE__MAX_BATCH=32 \
        --server-env IMAGEGENX_MODELS__DEVICE=cuda --server-env 'IMAGEGENX_MODELS__TINY_DECODERS={"sd21":"random"}' \
        --server-env 'IMAGEGENX_ENGINE__WARMUP_SIZES=["512x512"]' \
        --decoder "${DECODER:-full}" --width 512 --height 512 --steps 1 --cfg 0 --sampler euler \
        --rate "${RATE:-40}" --duration "${DURATION:-40}" --warmup "${WARMUP:-10}" --json "$OUT/http-turbo-512-1-${RATE:-40}${DECODER:+-$DECODER}${TAG:+-$TAG}.json"
    ;;
httpspy) # the http part, py-spy sampling each worker process for SPY_SECONDS once the schedule runs:
    # which threads hold each worker's GIL, and where (--gil), and where all its threads are (raw
    # stacks: `python3 scripts/spy_summary.py FILE` summarises them). py-spy comes in .gpu4.
    "$0" http &
    part=$!
    sleep "${SPY_AFTER:-40}"
    for worker in $(pgrep -f "imagegenx.cli worker"); do
        for kind in gil all; do
            flag=$([ "$kind" = gil ] && echo --gil || echo --idle)
            /tmp/site/bin/py-spy record --pid "$worker" -d "${SPY_SECONDS:-15}" -r 100 --threads --nonblocking \
                $flag -f raw -o "$OUT/spy-$kind-$worker.raw" >>"$OUT/log.txt" 2>&1 &
        done
    done
    wait
    ;;
benchspy) # SCENARIOS (default cold-start) under py-spy at 50 Hz, every thread; summarised here, on the
    # device (the raw file is tens of MB: it comes back gzipped, the summary as text)
    # shellcheck disable=SC2086 # SCENARIOS is a list
    run /tmp/site/bin/py-spy record -r 50 --threads --idle -f raw -o "$OUT/spy-bench.raw" -- \
        python3 -m imagegenx.cli bench ${SCENARIOS:-cold-start} --no-peers --out "$OUT/bench-${TAG:-spy}.json"
    python3 scripts/spy_summary.py "$OUT/spy-bench.raw" --top 25 >"$OUT/spy-bench-summary.txt" 2>&1
    gzip -f "$OUT/spy-bench.raw"
    ;;
portraitprofile) # portrait-100 stage by stage: the GPU's busy share in each, the top kernels, both threads' Python
    run python3 scripts/profile_portrait_gpu.py "$OUT"
    ;;
profile)
    # shellcheck disable=SC2086 # PROFILE_SCENARIOS is a list (empty: all four)
    run python3 scripts/profile_engine_gpu.py "$OUT" ${PROFILE_SCENARIOS:-}
    ;;
coldload) # the 6.9-GB single file read buffered and with O_DIRECT (fast-direct), cold and warm, twice each
    [ -f /tmp/sdxl-random.safetensors ] || run python3 scripts/coldload.py --write /tmp/sdxl-random.safetensors --device cuda
    run python3 scripts/coldload.py /tmp/sdxl-random.safetensors --device cuda --modes fast,fast-direct --runs 2 \
        --json "$OUT/coldload-direct.json"
    ;;
fp8blocks) # Flux's two transformer blocks at 1024², bf16 against fp8, compiled (about a minute; .gpu4's torchao)
    run python3 scripts/fp8_blocks_gpu.py "$OUT/fp8-blocks.json"
    ;;
continuous) # continuous batching on against off: SDXL 1024² 4-step jobs arriving at RATE a second (about 2 minutes)
    run python3 scripts/continuous_batching.py --model random:sdxl --size 1024 --steps 4 --rate "${RATE:-5}" \
        --jobs "${JOBS:-300}" --json "$OUT/continuous.json"
    ;;
compilecache) # compile artifacts on the GPU: command to compiled images (SDXL 1024², LCM 4 steps) with
    # empty Inductor and Triton caches, without the artifacts file (it is written) and then with it (read)
    rm -f "$OUT/artifacts.zip"
    for pass in without with; do
        caches=$(mktemp -d)
        SECONDS=0
        TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton IMAGEGENX_MODELS__COMPILE=default \
            IMAGEGENX_MODELS__COMPILE_ARTIFACTS=$OUT/artifacts.zip run python3 -m imagegenx.cli generate "a fox" \
            --model "${CACHE_MODEL:-random:sdxl}" --width "${SIZE:-1024}" --height "${SIZE:-1024}" --steps 4 --cfg 1 \
            --scheduler lcm -n 2 --out "$caches/images"
        echo "compile cache, $pass the artifacts file: $SECONDS s from command to images" | tee -a "$OUT/log.txt"
        rm -rf "$caches"
    done
    ls -l "$OUT/artifacts.zip" | tee -a "$OUT/log.txt"
    rm -f "$OUT/artifacts.zip" # too large to come back
    ;;
cudatests) # the tests CI skips for want of a GPU (pinned copies and events, fp8 on Hopper)
    run python3 -m pytest -q -p no:cacheprovider tests/test_preview.py tests/test_fp8.py tests/test_cuda_paths.py -k "cuda or hopper or timesteps"
    ;;
*)
    echo "usage: $0 setup|eager|plain|compiled|fp8|fp8blocks|continuous|compilecache|autotune|http|httpspy|benchspy|profile|portraitprofile|coldload|cudatests" >&2
    exit 2
    ;;
esac
