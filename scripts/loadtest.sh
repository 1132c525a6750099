#!/usr/bin/env bash
# Load test over loopback with wrk: the layer off vs on, for unique-key POSTs, replayed POSTs
# and GETs, against examples/loadtest_server.rs. Prints requests/s, p99 latency and on/off ratios.
#
#   bash scripts/loadtest.sh                  # 5 s per run, 2 threads, 64 connections
#   DURATION=10s THREADS=2 CONNECTIONS=64 bash scripts/loadtest.sh
#
# Each scenario warms both paths for 1 s, then runs off, on, on, off (so drifts of a shared machine hit both alike) and the
# ratios compare the means. wrk and the server share the machine: ratios are the result,
# absolute numbers are not.
set -euo pipefail

DURATION=${DURATION:-5s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk not found: installing it (apt-get install -y wrk)" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: installing wrk needs root (or install the Debian package wrk yourself)" >&2
        exit 1
    fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

(cd "$ROOT" && cargo build --release --quiet --example loadtest_server)

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"$TARGET/release/examples/loadtest_server" 0 >"$WORK/server.out" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
    grep -q '^listening on ' "$WORK/server.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.out" >&2; exit 1; }
    sleep 0.1
done
ADDR=$(sed -n 's/^listening on //p' "$WORK/server.out")
[ -n "$ADDR" ] || { echo "error: the server did not start" >&2; exit 1; }
BASE="http://$ADDR"

# Every script reports through done(): requests/s, p99 in microseconds, non-2xx/3xx answers.
cat >"$WORK/report.lua" <<'LUA'
function done(summary, latency, requests)
    io.write(string.format("RESULT %.1f %d %d %d\n",
        summary.requests / (summary.duration / 1e6), latency:percentile(99),
        summary.errors.status, summary.errors.connect + summary.errors.read
            + summary.errors.write + summary.errors.timeout))
end
LUA

# POST, 1 KiB body, a key no other request uses.
cat "$WORK/report.lua" >"$WORK/unique.lua"
cat >>"$WORK/unique.lua" <<'LUA'
local threads = 0
function setup(thread)
    thread:set("tid", threads)
    threads = threads + 1
end
function init(args)
    prefix = string.format("%d-%d-%d", os.time(), tid, math.random(1, 1000000000))
    n = 0
    body = string.rep("x", 1024)
end
function request()
    n = n + 1
    return wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = prefix .. "-" .. n,
    }, body)
end
LUA

# POST, 1 KiB body, one fixed key: the first request runs, every later one is a replay.
cat "$WORK/report.lua" >"$WORK/replay.lua"
cat >>"$WORK/replay.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "loadtest-replayed"
LUA

run() { # script path -> "rps p99_us status_errors socket_errors"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$WORK/$1.lua" "$BASE$2" |
        sed -n 's/^RESULT //p'
}

printf '%s\n' "wrk -t$THREADS -c$CONNECTIONS -d$DURATION over $ADDR, order off on on off per scenario"
printf '%-18s %12s %12s %9s %10s %10s %9s\n' scenario "off req/s" "on req/s" "on/off" "off p99" "on p99" "p99 on/off"
for scenario in "unique-key POST:unique:/pay" "replayed POST:replay:/pay" "GET:report:/item"; do
    IFS=: read -r name script path <<<"$scenario"
    # Warm-up, not counted: first connections, allocator, caches of both paths.
    wrk -t"$THREADS" -c"$CONNECTIONS" -d1s -s "$WORK/$script.lua" "$BASE/off$path" >/dev/null
    wrk -t"$THREADS" -c"$CONNECTIONS" -d1s -s "$WORK/$script.lua" "$BASE/on$path" >/dev/null
    off1=$(run "$script" "/off$path")
    on1=$(run "$script" "/on$path")
    on2=$(run "$script" "/on$path")
    off2=$(run "$script" "/off$path")
    awk -v name="$name" -v a="$off1" -v b="$on1" -v c="$on2" -v d="$off2" 'BEGIN {
        split(a, o1); split(b, n1); split(c, n2); split(d, o2)
        off = (o1[1] + o2[1]) / 2; on = (n1[1] + n2[1]) / 2
        offp = (o1[2] + o2[2]) / 2; onp = (n1[2] + n2[2]) / 2
        printf "%-18s %12.0f %12.0f %9.3f %8.2fms %8.2fms %9.2f\n", name, off, on, on / off,
            offp / 1000, onp / 1000, onp / offp
        bad = o1[3] + o2[3] + n1[3] + n2[3]; sock = o1[4] + o2[4] + n1[4] + n2[4]
        if (bad + sock > 0) printf "%-18s   (non-2xx answers %d, socket errors %d)\n", "", bad, sock
    }'
done
