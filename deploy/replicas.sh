#!/usr/bin/env bash
# N serve.py replicas on 127.0.0.1:8001.. behind nginx on 127.0.0.1:8000 (deploy/nginx.conf).
#   bash deploy/replicas.sh N CKPT [extra serve.py options...]
# The replicas share one store (docs/serving.md, "Several replicas"): requests, feedback,
# rate-limit buckets and abuse blocks. By default that is the SQLite file runs/serve/serve.db
# (every replica gets the same --log-dir runs/serve). Replicas on several machines share a
# PostgreSQL database instead: pass it like any other option, every replica gets it:
#   PGPASSWORD=... bash deploy/replicas.sh 4 runs/ppo --db postgresql://serve@db.internal:5432/serve
# (a password in PGPASSWORD, not in the URL, stays out of `ps`; serve.py never prints one.)
# Extra options go to every replica, after ours, so they win (e.g. --log-dir elsewhere).
# Export the votes while they run: python serve.py [--db URL] --export-feedback prefs.jsonl
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: deploy/replicas.sh N CKPT [serve.py options]}
ckpt=${2:?usage: deploy/replicas.sh N CKPT [serve.py options]}
shift 2
command -v nginx >/dev/null || { echo "error: nginx is not installed (apt-get install -y nginx)" >&2; exit 2; }
run=runs/nginx  # git-ignored, like every run output
mkdir -p "$run/logs" "$run/tmp" runs/serve
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait; }
trap cleanup EXIT INT TERM
servers=""
for i in $(seq 1 "$n"); do
  port=$((8000 + i))
  # nginx on this machine is the only proxy whose X-Forwarded-For a replica believes
  python serve.py --ckpt "$ckpt" --port "$port" --log-dir runs/serve --forwarded-allow-ips 127.0.0.1 "$@" \
    > "$run/logs/replica-$i.log" 2>&1 &
  pids+=($!)
  servers+="        server 127.0.0.1:$port max_fails=1 fail_timeout=10s;\n"
done
# the upstream block of deploy/nginx.conf with one server line per replica
awk -v servers="$servers" '
  /^        server 127\.0\.0\.1:80[0-9][0-9] / { if (!done) { printf "%s", servers; done = 1 } next }
  { print }' deploy/nginx.conf > "$run/nginx.conf"
for i in $(seq 1 "$n"); do
  until curl -sf "http://127.0.0.1:$((8000 + i))/ready" >/dev/null; do  # live, and its store takes writes
    kill -0 "${pids[$((i - 1))]}" 2>/dev/null || {
      echo "error: replica $i exited:" >&2; tail -n 5 "$run/logs/replica-$i.log" >&2; exit 1; }
    sleep 0.5
  done
done
echo "replicas ready: http://127.0.0.1:8000 -> 127.0.0.1:8001..$((8000 + n)) (logs: $run/logs/replica-I.log)"
nginx -p "$PWD/$run" -e logs/error.log -c "$PWD/$run/nginx.conf" -g "daemon off;" &
pids+=($!)
wait
