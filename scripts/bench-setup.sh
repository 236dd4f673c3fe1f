# Sourced by the side-by-side benchmark scripts (run from the project root, with MQBENCH_SRC
# set): installs the peers (beanstalkd, redis-server) if missing, builds phpmq and mqbench, and
# sets `mqbench` to the load generator's path.
need=()
command -v beanstalkd >/dev/null || need+=(beanstalkd)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
CARGO_TARGET_DIR=/tmp/mqbench-target cargo build --release --quiet --manifest-path "$MQBENCH_SRC/Cargo.toml"
mqbench=/tmp/mqbench-target/release/mqbench
