#!/usr/bin/env bash
# Confirmed sends, side by side: phpmq's v1.2 receipts (`phpmq bench --confirm`, plain and
# --durable) next to the peers' confirmed sends measured by mqbench (-W 1 and -W 16): Redis with
# AOF (everysec, and always), beanstalkd with its binlog (default, and -f 0: fsync every write).
# Each case on a freshly started server; also measures this machine's fsync time.
#
#   scripts/bench-confirm.sh > /tmp/confirm.log
#
# Environment: REPEAT (default 1; each line is one run), MQBENCH_SRC (default ../shared/bench),
# N16 (messages with 16 in flight, default 100000), N1 (with 1 in flight, default 20000),
# CONFIGS (default all: "phpmq redis-aof redis-always beanstalkd-binlog beanstalkd-f0"),
# CASES (default "e2e-W16 e2e-W1 rate1000-W1"; also "e2e-P16-W1": 16 producers with one send
# in flight each, as many PHP workers each sending a job). Repeating a few configurations and cases
# alternates them, e.g. REPEAT=8 CONFIGS="phpmq redis-aof redis-always" CASES=e2e-W16; with
# REPEAT above 1 it ends with each one's median and phpmq's ratios to its peers.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-1}
MQBENCH_SRC=${MQBENCH_SRC:-../shared/bench}
N16=${N16:-100000}
N1=${N1:-20000}
CONFIGS=${CONFIGS:-phpmq redis-aof redis-always beanstalkd-binlog beanstalkd-f0}
CASES=${CASES:-e2e-W16 e2e-W1 rate1000-W1}

# shellcheck source=scripts/bench-setup.sh
. scripts/bench-setup.sh
bin=$PWD/target/release

work=$(mktemp -d /tmp/phpmq-confirm.XXXXXX)
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; pid=""; }
trap 'stop; rm -rf "$work"' EXIT
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh

start() { # config -> pid, port
    local cfg=$1 dir=$work/$1
    port=$(free_port)
    rm -rf "$dir"; mkdir -p "$dir"
    case $cfg in
        phpmq) "$bin/phpmq-server" --listen "127.0.0.1:$port" --admin none --db "$dir/phpmq.sqlite" 2>"$dir/log" & ;;
        redis-aof) redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --appendonly yes \
                       --appendfsync everysec --logfile "$dir/log" & ;;
        redis-always) redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --appendonly yes \
                       --appendfsync always --logfile "$dir/log" & ;;
        beanstalkd-binlog) beanstalkd -l 127.0.0.1 -p "$port" -z 1048576 -b "$dir" >"$dir/log" 2>&1 & ;;
        beanstalkd-f0) beanstalkd -l 127.0.0.1 -p "$port" -z 1048576 -b "$dir" -f 0 >"$dir/log" 2>&1 & ;;
    esac
    pid=$!
    wait_port "$port"
}

# One result line: config, case, throughput, e2e latency and (phpmq) receipt latency.
line() { # config case output
    echo "$3" | grep -v '^#' | awk -v cfg="$1" -v case="$2" '
        {for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }}
        END {printf "%-18s %-22s msgs_per_s=%s p50_us=%s p99_us=%s receipt_p50_us=%s receipt_p99_us=%s\n",
             cfg, case, f["msgs_per_s"], f["p50_us"], f["p99_us"],
             f["receipt_p50_us"] == "" ? "-" : f["receipt_p50_us"],
             f["receipt_p99_us"] == "" ? "-" : f["receipt_p99_us"]}'
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) nproc=$(nproc) $(uname -r)"
python3 - "$work" <<'EOF'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync.probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
times = []
for _ in range(500):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fsync(fd); times.append(time.perf_counter() - t)
times.sort()
print("# fsync of a 4 KiB append, 500 times: p50 %.0f us, p99 %.0f us" % (times[250] * 1e6, times[495] * 1e6))
EOF

for _ in $(seq "$REPEAT"); do
    for cfg in $CONFIGS; do
        for c in "e2e-W16:-P 2 -C 2 -K 16 -N $N16:16" "e2e-W1:-P 2 -C 2 -K 16 -N $N1:1" \
                 "rate1000-W1:-P 1 -C 1 -K 1 -N 5000 --rate 1000:1" \
                 "e2e-P16-W1:-P 16 -C 2 -K 16 -N $N1:1"; do
            name=${c%%:*} rest=${c#*:} args=${rest%:*} window=${rest##*:}
            case " $CASES " in *" $name "*) ;; *) continue ;; esac
            if [ "$cfg" = phpmq ]; then
                for mode in "" --durable; do
                    start phpmq
                    # shellcheck disable=SC2086
                    out=$("$bin/phpmq" --server "127.0.0.1:$port" bench $args -S 256 --confirm -W "$window" $mode 2>/dev/null || true)
                    line "phpmq${mode:+-durable}" "$name" "$out" | tee -a "$work/results"
                    stop
                done
            else
                start "$cfg"
                driver=${cfg%%-*}
                # shellcheck disable=SC2086
                out=$("$mqbench" --driver "$driver" --addr "127.0.0.1:$port" $args -S 256 -W "$window" \
                      --scenario e2e -R 1 --label "$cfg" 2>/dev/null || true)
                line "$cfg" "$name" "$out" | tee -a "$work/results"
                stop
            fi
        done
    done
done

# With repeats: each configuration's median per case, and phpmq's ratios to its peers (the
# median of the per-round ratios, rounds paired in order), as comment lines.
if [ "$REPEAT" -gt 1 ]; then
    python3 - "$work/results" <<'EOF'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    fields = line.split()
    m = re.search(r"msgs_per_s=([0-9.]+)", line)
    if len(fields) >= 2 and m:
        runs.setdefault((fields[1], fields[0]), []).append(float(m.group(1)))
for (case, cfg), values in sorted(runs.items()):
    print("# median %-18s %-14s %9.0f msg/s over %d rounds" % (cfg, case, statistics.median(values), len(values)))
for ours, peer in [("phpmq", "redis-aof"), ("phpmq", "beanstalkd-binlog"),
                   ("phpmq-durable", "redis-always"), ("phpmq-durable", "beanstalkd-f0")]:
    for case in sorted({c for c, _ in runs}):
        a, b = runs.get((case, ours)), runs.get((case, peer))
        if a and b and not case.startswith("rate"):
            pairs = [x / y for x, y in zip(a, b) if y > 0]
            print("# ratio  %-13s / %-17s %-12s medians %.2fx, per-round median %.2fx (%.2f-%.2f)" % (
                ours, peer, case, statistics.median(a) / statistics.median(b),
                statistics.median(pairs), min(pairs), max(pairs)))
EOF
fi
