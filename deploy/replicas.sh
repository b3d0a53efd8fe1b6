#!/usr/bin/env bash
# N serve.py replicas on 127.0.0.1:8001.. behind nginx on 127.0.0.1:8000 (deploy/nginx.conf).
#   bash deploy/replicas.sh N CKPT [extra serve.py options...]
# Every replica writes its logs under runs/serve/replica-I/; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: deploy/replicas.sh N CKPT [serve.py options]}
ckpt=${2:?usage: deploy/replicas.sh N CKPT [serve.py options]}
shift 2
command -v nginx >/dev/null || { echo "error: nginx is not installed (apt-get install -y nginx)" >&2; exit 2; }
run=runs/nginx  # git-ignored, like every run output
mkdir -p "$run/logs" "$run/tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait; }
trap cleanup EXIT INT TERM
servers=""
for i in $(seq 1 "$n"); do
  port=$((8000 + i))
  python serve.py --ckpt "$ckpt" --port "$port" --log-dir "runs/serve/replica-$i" "$@" &
  pids+=($!)
  servers+="        server 127.0.0.1:$port max_fails=1 fail_timeout=10s;\n"
done
# the upstream block of deploy/nginx.conf with one server line per replica
awk -v servers="$servers" '
  /^        server 127\.0\.0\.1:80[0-9][0-9] / { if (!done) { printf "%s", servers; done = 1 } next }
  { print }' deploy/nginx.conf > "$run/nginx.conf"
for i in $(seq 1 "$n"); do
  until curl -sf "http://127.0.0.1:$((8000 + i))/health" >/dev/null; do
    kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { echo "error: replica $i exited" >&2; exit 1; }
    sleep 0.5
  done
done
echo "replicas ready: http://127.0.0.1:8000 -> 127.0.0.1:8001..$((8000 + n))"
nginx -p "$PWD/$run" -e logs/error.log -c "$PWD/$run/nginx.conf" -g "daemon off;" &
pids+=($!)
wait
