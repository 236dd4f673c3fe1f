#!/usr/bin/env bash
# The side-by-side benchmark of BENCHMARKS.md: phpmq over TCP and over its Unix socket, next to
# beanstalkd (in memory, with binlog) and Redis lists (in memory, with AOF everysec), each case
# on a freshly started server, measured with mqbench from ../shared/bench.
#
#   scripts/bench-matrix.sh > /tmp/matrix.log; python3 ../shared/bench/summarize.py /tmp/matrix.log
#
# Environment: REPEAT (default 3), ONLY (a regex over config names, default all),
# MQBENCH_SRC (default ../shared/bench), PHPMQ_ARGS (extra phpmq-server flags), PHPMQ_SERVER
# (another phpmq-server binary, e.g. an older build for a before/after in the same run).
# The config phpmq-tcp-idle1000 runs the e2e case with 1,000 extra idle clients connected.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
ONLY=${ONLY:-.}
MQBENCH_SRC=${MQBENCH_SRC:-../shared/bench}
PHPMQ_ARGS=${PHPMQ_ARGS:-}

# shellcheck source=scripts/bench-setup.sh
. scripts/bench-setup.sh
server=${PHPMQ_SERVER:-$PWD/target/release/phpmq-server}

work=$(mktemp -d /tmp/phpmq-matrix.XXXXXX)
pid=""
idle_pid=""
stop() {
    if [ -n "$idle_pid" ]; then kill "$idle_pid" 2>/dev/null || true; wait "$idle_pid" 2>/dev/null || true; fi
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    pid=""
    idle_pid=""
}
trap 'stop; rm -rf "$work"' EXIT

# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
wait_for() { # a test command, tried for 15 s
    for _ in $(seq 150); do eval "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "# server did not come up" >&2; return 1
}

start() { # config -> sets pid, driver, addr
    local cfg=$1 dir=$work/$1 port
    port=$(free_port)
    rm -rf "$dir"; mkdir -p "$dir"
    case $cfg in
        phpmq-tcp|phpmq-unix|phpmq-tcp-idle1000)
            driver=phpmq
            # shellcheck disable=SC2086
            "$server" --listen "127.0.0.1:$port" --listen "unix:$dir/phpmq.sock" --admin none \
                --db "$dir/phpmq.sqlite" --mirror-interval 1000 $PHPMQ_ARGS 2>"$dir/log" &
            pid=$!
            if [ "$cfg" = phpmq-unix ]; then addr=unix:$dir/phpmq.sock; else addr=127.0.0.1:$port; fi
            wait_for "grep -q 'ready;' '$dir/log'"
            if [ "$cfg" = phpmq-tcp-idle1000 ]; then
                # 1,000 clients that connect and say nothing, held open for the whole case.
                python3 -c "
import socket, sys, time
held = [socket.create_connection(('127.0.0.1', $port)) for _ in range(1000)]
print('# idle clients connected: %d' % len(held), flush=True)
time.sleep(3600)" &
                idle_pid=$!
                wait_for "[ \$(ls /proc/$pid/task | wc -l) -gt 1000 ]"
            fi ;;
        beanstalkd-mem|beanstalkd-binlog)
            driver=beanstalkd; addr=127.0.0.1:$port
            if [ "$cfg" = beanstalkd-mem ]; then
                beanstalkd -l 127.0.0.1 -p "$port" -z 1048576 >"$dir/log" 2>&1 &
            else
                beanstalkd -l 127.0.0.1 -p "$port" -z 1048576 -b "$dir" >"$dir/log" 2>&1 &
            fi
            pid=$!
            wait_for "(exec 3<>/dev/tcp/127.0.0.1/$port)" ;;
        redis-mem|redis-aof)
            driver=redis; addr=127.0.0.1:$port
            if [ "$cfg" = redis-mem ]; then aof=(--appendonly no); else aof=(--appendonly yes --appendfsync everysec); fi
            redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' "${aof[@]}" --logfile "$dir/log" &
            pid=$!
            wait_for "(exec 3<>/dev/tcp/127.0.0.1/$port)" ;;
    esac
}

# drain: a 200,000 x 256 B backlog, 2 consumers, prefetch 16
# e2e: 256 B, 2 producers, 2 consumers, prefetch 16, pipelined sends (-W 16; PHPMQ sends are always pipelined)
# latency: a fixed 1,000 msg/s, 1 producer, 1 consumer, prefetch 1
# large: 64 KiB payloads, 2 producers, 2 consumers, prefetch 16
cases=(
    "-S 256 -N 200000 -P 2 -C 2 -K 16 --scenario produce,drain -W 16"
    "-S 256 -N 200000 -P 2 -C 2 -K 16 --scenario e2e -W 16"
    "-S 256 -N 5000 -P 1 -C 1 -K 1 --rate 1000 --scenario e2e"
    "-S 65536 -N 10000 -P 2 -C 2 -K 16 --scenario e2e -W 16"
)
echo "# $(date -u +%FT%TZ) nproc=$(nproc) repeat=$REPEAT $(uname -r)"
echo "# $("$server" --version); beanstalkd $(beanstalkd -v 2>&1 | cut -d' ' -f2); redis $(redis-server --version | cut -d' ' -f3)"
for cfg in phpmq-tcp phpmq-unix phpmq-tcp-idle1000 beanstalkd-mem beanstalkd-binlog redis-mem redis-aof; do
    [[ $cfg =~ $ONLY ]] || continue
    for args in "${cases[@]}"; do
        # With idle clients, only the end-to-end 256 B case.
        if [ "$cfg" = phpmq-tcp-idle1000 ] && [ "$args" != "${cases[1]}" ]; then continue; fi
        start "$cfg"
        echo "# $cfg: mqbench --driver $driver --addr $addr $args -R $REPEAT --label $cfg"
        # shellcheck disable=SC2086
        "$mqbench" --driver "$driver" --addr "$addr" $args -R "$REPEAT" --label "$cfg" || echo "# $cfg: mqbench failed"
        echo "# $cfg: rss_kb=$(ps -o rss= -p "$pid" | tr -d ' ') after: $args"
        stop
    done
done
