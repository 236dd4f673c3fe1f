#!/usr/bin/env bash
# Alternating A/B of two or more phpmq-server builds on `phpmq bench` (by default confirmed
# sends, 16 in flight: the v1.2 row of BENCHMARKS.md), with the same client for all: each round
# starts every build once on a fresh database, in turn, so the machine's drift hits all of them
# alike. Prints each run (msg/s, receipt p50, the server's CPU time) and, per build, the sorted
# results and their median. On this noisy 2-core machine single runs differ by ±15% and more:
# use this (or scripts/bench-ab.sh for the v1 cases) before saying a change made phpmq faster.
#
#   scripts/bench-ab-confirm.sh old=/tmp/old/phpmq-server new=target/release/phpmq-server
#   ARGS="-P 2 -C 2 -K 16 -N 60000 -S 256 --confirm -W 16 --durable" scripts/bench-ab-confirm.sh ...
#
# Environment: ROUNDS (default 6), ARGS (phpmq bench arguments, default confirmed W16 above),
# CLIENT (the phpmq binary, default target/release/phpmq), DBDIR (where the databases go,
# default a temporary directory under the working directory's file system: durable runs
# measure that disk).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-6}
ARGS=${ARGS:--P 2 -C 2 -K 16 -N 200000 -S 256 --confirm -W 16}
CLIENT=${CLIENT:-$PWD/target/release/phpmq}
[ $# -ge 2 ] || { echo "usage: $0 NAME=PATH NAME=PATH [...]" >&2; exit 2; }
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
make_work "${DBDIR:-$PWD}/.bench-ab-confirm.XXXXXX"
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{printf "%d", ($14 + $15) * 1000 / hz}' "/proc/$1/stat"; }

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) rounds=$ROUNDS args: $ARGS"
for round in $(seq "$ROUNDS"); do
    for build in "$@"; do
        name=${build%%=*} server=${build#*=}
        port=$(free_port)
        rm -rf "$work/db"; mkdir -p "$work/db"
        "$server" --listen "127.0.0.1:$port" --admin none --db "$work/db/phpmq.sqlite" 2>"$work/log" &
        pid=$!
        wait_port "$port"
        before=$(cpu_ms "$pid")
        # shellcheck disable=SC2086
        out=$("$CLIENT" --server "127.0.0.1:$port" bench $ARGS 2>/dev/null || true)
        after=$(cpu_ms "$pid")
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
        rate=$(echo "$out" | grep -o 'msgs_per_s=[0-9]*' | cut -d= -f2)
        receipt=$(echo "$out" | grep -o 'receipt_p50_us=[0-9]*' | cut -d= -f2)
        printf '%-12s round %2d msgs_per_s=%s receipt_p50_us=%s server_cpu_ms=%s\n' \
            "$name" "$round" "${rate:-0}" "${receipt:--}" "$((after - before))" | tee -a "$work/results"
    done
done
medians "$work/results" msgs_per_s receipt_p50_us
