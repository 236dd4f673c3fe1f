#!/usr/bin/env bash
# Measures what persistence costs with N stored messages of 256 bytes (default: 100000 and
# 1000000), a mirror every second:
#   - disk bytes written (write_bytes of /proc/PID/io) by one change after an idle period, and
#     per second and per mirror under a trickle of ~100 changes a second (sends that stay);
#   - clients' round trips (phpmq ping) during that trickle, and the mirrors' durations;
#   - memory after the fill, after the trickle, and after draining 90%, and the file's size;
#   - how long a graceful stop takes, recovery time at start, and memory after recovery.
# With E2E=1 it also runs mqbench's end-to-end and latency cases against the server while it
# holds the N messages, and reports the longest mirror during each.
# Usage: scripts/bench-persistence.sh [N ...]; BIN=DIR measures the phpmq-server and phpmq
# found there instead (e.g. an older build, for a before/after in one run).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; fi
bin=${BIN:-$PWD/target/release}
port=${PORT:-19400}
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(100000 1000000)
MQBENCH_SRC=${MQBENCH_SRC:-../shared/bench}
if [ "${E2E:-0}" = 1 ]; then
  CARGO_TARGET_DIR=/tmp/mqbench-target cargo build --release --quiet --manifest-path "$MQBENCH_SRC/Cargo.toml"
fi
mqbench=/tmp/mqbench-target/release/mqbench

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %d MB  ", $1, $2/1024}' "/proc/$1/status"; echo; }
written() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }
disk() { du -cb "$1"* 2>/dev/null | awk 'END {printf "%.1f MB", $1/1e6}'; }
mirrors_since() { # log, line number: count, longest ms, bytes written in all
  tail -n +"$2" "$1" | grep "] mirrored " |
    awk '{for (i=1;i<=NF;i++) {if ($i=="in") ms=$(i+1); if ($i=="written,") b=$(i-2)}
          n++; s+=b; if (ms>max) max=ms}
         END {printf "%d mirrors, longest %d ms, %.1f kB written in all, %.1f kB per mirror\n", n, max, s/1e3, n ? s/n/1e3 : 0}'
}
# Sends one message every 10 ms on one connection for $2 seconds (they stay: real changes).
trickle() {
  python3 - "$port" "$1" <<'EOF'
import socket, sys, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
q, i, end = b"trickle", 0, time.time() + secs
while time.time() < end:
    c = b"change %d" % i
    s.sendall(b"H0100102P01%029d%sP02%029d%s" % (len(q), q, len(c), c))
    i += 1
    time.sleep(0.01)
print("trickle: %d sends in %.0f s" % (i, secs))
EOF
}

for n in "${counts[@]}"; do
  db="$work/phpmq-$n.sqlite"
  log="$work/fill.log"
  echo "== $n messages of 256 bytes"
  "$bin/phpmq-server" --listen 127.0.0.1:$port --admin none --db "$db" --log-level debug 2>"$log" &
  pid=$!
  wait_ready "$log"
  start=$(date +%s.%N)
  python3 -c "import sys; sys.stdout.write(('x' * 256 + '\n') * $n)" |
    "$bin/phpmq" --server 127.0.0.1:$port send bench
  echo "filled in $(echo "$(date +%s.%N) - $start" | bc) s"
  until grep -q "] mirrored $n messages" "$log"; do sleep 0.1; done
  sleep 3
  echo -n "after fill: "; rss $pid
  echo "file: $(disk "$db")"

  before=$(written $pid); mark=$(($(wc -l <"$log") + 1))
  echo one | "$bin/phpmq" --server 127.0.0.1:$port send single
  sleep 2.5
  echo "one change after idle: $(( $(written $pid) - before )) bytes written to disk; $(mirrors_since "$log" $mark)"

  before=$(written $pid); mark=$(($(wc -l <"$log") + 1)); t0=$(date +%s.%N)
  trickle 10 &
  tpid=$!
  echo -n "round trips during the trickle: "
  "$bin/phpmq" --server 127.0.0.1:$port ping --count 900 --interval-ms 10
  wait $tpid
  secs=$(echo "$(date +%s.%N) - $t0" | bc)
  echo "trickle: $(echo "($(written $pid) - $before) / $secs / 1000" | bc) kB/s written to disk; $(mirrors_since "$log" $mark)"
  echo -n "after the trickle: "; rss $pid
  t0=$(date +%s.%N)
  kill -TERM $pid; wait $pid
  echo "graceful stop: $(echo "$(date +%s.%N) - $t0" | bc) s; $(grep -o 'final mirror: .*' "$log")"

  log="$work/recover.log"
  "$bin/phpmq-server" --listen 127.0.0.1:$port --admin none --db "$db" --log-level debug 2>"$log" &
  pid=$!
  wait_ready "$log"
  grep -o "recovered .*" "$log" | head -n 1
  echo -n "after recovery: "; rss $pid

  if [ "${E2E:-0}" = 1 ]; then
    for case in "-S 256 -N 200000 -P 2 -C 2 -K 16 --scenario e2e -W 16" \
                "-S 256 -N 5000 -P 1 -C 1 -K 1 --rate 1000 --scenario e2e"; do
      mark=$(($(wc -l <"$log") + 1))
      # shellcheck disable=SC2086
      "$mqbench" --driver phpmq --addr 127.0.0.1:$port $case -R 1 --label "phpmq-$n-stored" | grep -v '^#' || true
      echo "  mirrors during it: $(mirrors_since "$log" $mark)"
    done
  fi

  "$bin/phpmq" --server 127.0.0.1:$port consume bench --count $((n * 9 / 10)) >/dev/null
  sleep 5
  echo -n "after draining 90%: "; rss $pid
  echo "file: $(disk "$db")"
  kill -TERM $pid; wait $pid
done

echo "== baseline: round trips with --db none"
"$bin/phpmq-server" --listen 127.0.0.1:$port --admin none --db none 2>"$work/none.log" &
pid=$!
wait_ready "$work/none.log"
"$bin/phpmq" --server 127.0.0.1:$port ping --count 5000 --interval-ms 1
kill -TERM $pid; wait $pid
