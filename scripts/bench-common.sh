# Sourced by the benchmark scripts (run from the project root): the helpers they share.

# A loopback port nobody listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits (up to 15 s) until something accepts connections on loopback port $1.
wait_port() {
    for _ in $(seq 150); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    return 1
}

# Waits (up to 30 s) until the server logging to $1 says it is ready.
wait_ready() {
    for _ in $(seq 600); do grep -q "ready;" "$1" 2>/dev/null && return 0; sleep 0.05; done
    echo "server did not start: $(cat "$1")" >&2
    return 1
}

# Makes `work`, a scratch directory named after the template $1; at exit it is removed, and the
# server whose process id is in `pid` (if any) is stopped.
make_work() {
    work=$(mktemp -d "$1")
    pid=""
    trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
}

# Per build, the median and the sorted values of each KEY=value field named, from a file of
# lines "NAME ... KEY=value ...".
medians() { # file key...
    python3 - "$@" <<'PY'
import statistics, sys
path, keys = sys.argv[1], sys.argv[2:]
runs = {}
for line in open(path):
    fields = line.split()
    runs.setdefault(fields[0], []).append(dict(f.split("=", 1) for f in fields if "=" in f))
show = lambda v: str(int(v)) if float(v).is_integer() else f"{v:.2f}"
def number(text):
    try:
        return float(text)
    except ValueError:
        return None
for name, rows in runs.items():
    for key in keys:
        values = sorted(v for v in (number(row.get(key, "")) for row in rows) if v is not None)
        if not values:
            continue
        print(f"{name:12} {key:16} median {show(statistics.median(values)):>9}  "
              f"( {' '.join(map(show, values))} )")
PY
}
