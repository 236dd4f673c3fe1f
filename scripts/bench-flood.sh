#!/usr/bin/env bash
# The memory peak of a flood: `phpmq send` of N messages of 256 bytes into an empty store, then
# waits until the mirror has all of them. Prints, per run: the send's time, the time until the
# file holds every message, the server's peak RSS (VmHWM) and its RSS at the end, and the bytes
# it wrote. Builds alternate, round by round, so the machine's drift hits them alike.
#
#   scripts/bench-flood.sh old=/tmp/old-release new=target/release
#   N=2000000 ROUNDS=3 scripts/bench-flood.sh new=target/release
#
# Each NAME=DIR names a directory holding phpmq-server and phpmq. Environment: N (default
# 1000000), ROUNDS (default 4), DBDIR (where the databases go, default a temporary directory
# under the working directory).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
ROUNDS=${ROUNDS:-4}
[ $# -ge 1 ] || { echo "usage: $0 NAME=DIR [NAME=DIR ...]" >&2; exit 2; }
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
make_work "${DBDIR:-$PWD}/.bench-flood.XXXXXX"
status() { awk -v k="$2" '$1 == k":" {printf "%d", $2 / 1024}' "/proc/$1/status"; }
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) N=$N rounds=$ROUNDS"
for round in $(seq "$ROUNDS"); do
    for build in "$@"; do
        name=${build%%=*} dir=${build#*=}
        port=$(free_port)
        rm -rf "$work/db"; mkdir -p "$work/db"
        "$dir/phpmq-server" --listen "127.0.0.1:$port" --admin none \
            --db "$work/db/phpmq.sqlite" --log-level debug 2>"$work/log" &
        pid=$!
        wait_ready "$work/log"
        start=$(date +%s.%N)
        python3 -c "import sys; sys.stdout.write(('x' * 256 + '\n') * $N)" |
            "$dir/phpmq" --server "127.0.0.1:$port" send flood
        sent=$(date +%s.%N)
        # The mirror's debug line for the run that brought the file to N messages.
        for _ in $(seq 1200); do grep -q "] mirrored $N messages" "$work/log" && break; sleep 0.05; done
        in_file=$(grep -m 1 "] mirrored $N messages" "$work/log" | awk '{print $1}' | xargs -r -I{} date -d {} +%s.%N)
        printf '%-10s round %2d send_s=%.2f in_file_s=%.2f peak_mb=%s rss_mb=%s written_mb=%d\n' \
            "$name" "$round" "$(echo "$sent - $start" | bc)" "$(echo "${in_file:-0} - $start" | bc)" \
            "$(status "$pid" VmHWM)" "$(status "$pid" VmRSS)" \
            "$(awk '/^write_bytes/ {print int($2 / 1e6)}' "/proc/$pid/io")" | tee -a "$work/results"
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    done
done
medians "$work/results" peak_mb in_file_s send_s
