#!/usr/bin/env bash
# Alternating A/B of two or more phpmq-server builds on mqbench's produce, drain and e2e cases
# (256 B, P2 C2 K16): each round starts every build once on a fresh database, in turn, so the
# machine's drift hits all of them alike. Prints each build's results per case, sorted, and
# their median. On this noisy 2-core machine, single runs differ by ±15%; use this before
# claiming a change made the server faster or slower.
#
#   scripts/bench-ab.sh old=/tmp/old/phpmq-server new=target/release/phpmq-server
#
# Environment: ROUNDS (default 4), MQBENCH_SRC (default ../shared/bench), SIZE (message bytes,
# default 256), N (messages per case, default 200000), SCENARIOS (default "produce,drain e2e"),
# UNIX=1 (over the server's Unix socket instead of TCP).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
SIZE=${SIZE:-256}
N=${N:-200000}
SCENARIOS=${SCENARIOS:-produce,drain e2e}
UNIX=${UNIX:-0}
MQBENCH_SRC=${MQBENCH_SRC:-../shared/bench}
[ $# -ge 2 ] || { echo "usage: $0 NAME=PATH NAME=PATH [...]" >&2; exit 2; }
CARGO_TARGET_DIR=/tmp/mqbench-target cargo build --release --quiet --manifest-path "$MQBENCH_SRC/Cargo.toml"
mqbench=/tmp/mqbench-target/release/mqbench
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
make_work "${TMPDIR:-/tmp}/bench-ab.XXXXXX"
results=$work/results

for round in $(seq "$ROUNDS"); do
  for build in "$@"; do
    name=${build%%=*} bin=${build#*=}
    dir=$work/$name-$round port=$(free_port)
    mkdir -p "$dir"
    addr=127.0.0.1:$port unix_args=()
    if [ "$UNIX" = 1 ]; then addr=unix:$dir/phpmq.sock unix_args=(--listen "unix:$dir/phpmq.sock"); fi
    "$bin" --listen "127.0.0.1:$port" "${unix_args[@]}" --admin none --db "$dir/phpmq.sqlite" 2>"$dir/log" &
    pid=$!
    wait_ready "$dir/log"
    for scenario in $SCENARIOS; do
      "$mqbench" --driver phpmq --addr "$addr" -S "$SIZE" -N "$N" -P 2 -C 2 -K 16 \
          --scenario "$scenario" -W 16 -R 1 --label "$name" | grep -v '^#' |
        awk -v name="$name" '{for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
                              print f["scenario"], name, f["msgs_per_s"]}' >>"$results"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  done
done
sort -k1,1 -k2,2 -k3,3n "$results" |
  awk '{k = $1 " " $2; v[k] = v[k] " " $3; n[k]++; a[k, n[k]] = $3}
       END {for (k in v) { m = n[k] % 2 ? a[k, (n[k] + 1) / 2] : (a[k, n[k] / 2] + a[k, n[k] / 2 + 1]) / 2
                           printf "%-24s median %8d msg/s  (%s )\n", k, m, v[k] }}' | sort
