#!/usr/bin/env bash
# Measures what persistence costs with N stored messages of 256 bytes (default: 100000 and
# 1000000): mirror duration, the longest round-trip stall a client sees while mirrors run
# (every ping changes the store, so a mirror runs on every tick), recovery time at start, and
# the server's memory. Usage: scripts/bench-persistence.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release
port=${PORT:-19400}
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(100000 1000000)

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

wait_ready() {
  for _ in $(seq 1 600); do grep -q "ready;" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "server did not start: $(cat "$1")" >&2; exit 1
}

rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %d MB  ", $1, $2/1024}' "/proc/$1/status"; echo; }

for n in "${counts[@]}"; do
  db="$work/phpmq-$n.sqlite"
  echo "== $n messages of 256 bytes"
  "$bin/phpmq-server" --listen 127.0.0.1:$port --db "$db" --log-level debug 2>"$work/fill.log" &
  pid=$!
  wait_ready "$work/fill.log"
  start=$(date +%s.%N)
  python3 -c "import sys; sys.stdout.write(('x' * 256 + '\n') * $n)" |
    "$bin/phpmq" --server 127.0.0.1:$port send bench
  echo "filled in $(echo "$(date +%s.%N) - $start" | bc) s"
  echo -n "after fill: "; rss $pid
  echo "round trips while a mirror runs every second (--mirror-interval 1000):"
  "$bin/phpmq" --server 127.0.0.1:$port ping --count 5000 --interval-ms 1
  grep -o "mirrored $n messages.*" "$work/fill.log" | tail -n 5
  echo -n "after mirrors: "; rss $pid
  kill -TERM $pid; wait $pid
  ls -l "$db" | awk '{printf "file: %d MB\n", $5/1048576}'

  "$bin/phpmq-server" --listen 127.0.0.1:$port --db "$db" 2>"$work/recover.log" &
  pid=$!
  wait_ready "$work/recover.log"
  grep -o "recovered .*" "$work/recover.log" | head -n 1
  echo -n "after recovery: "; rss $pid
  kill -TERM $pid; wait $pid
done

echo "== baseline: round trips with --db none"
"$bin/phpmq-server" --listen 127.0.0.1:$port --db none 2>"$work/none.log" &
pid=$!
wait_ready "$work/none.log"
"$bin/phpmq" --server 127.0.0.1:$port ping --count 5000 --interval-ms 1
kill -TERM $pid; wait $pid
