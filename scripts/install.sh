#!/usr/bin/env bash
# Builds phpmq and installs the binaries, the man pages and a service definition.
#
#   scripts/install.sh [--sysv] [--no-build] [--no-user]
#
#   --sysv      install the SysV init script and logrotate rules instead of the systemd unit
#   --no-build  install binaries already built in target/release (or in $BIN_DIR)
#   --no-user   do not create the phpmq system user
#
# PREFIX (default /usr/local) says where binaries and man pages go; DESTDIR stages the whole
# tree under another root (for packaging, or to look before installing). Run as root to
# install for real.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
BIN_DIR=${BIN_DIR:-target/release}
service=systemd
build=yes
user=yes
for arg in "$@"; do
    case "$arg" in
        --sysv) service=sysv ;;
        --no-build) build=no ;;
        --no-user) user=no ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$build" = yes ]; then
    cargo build --release --locked
fi
for bin in phpmq-server phpmq; do
    [ -x "$BIN_DIR/$bin" ] || { echo "install.sh: $BIN_DIR/$bin is missing; build first" >&2; exit 1; }
done

root="$DESTDIR"
install -d "$root$PREFIX/bin" "$root$PREFIX/share/man/man1" "$root$PREFIX/share/man/man7"
install -m 0755 "$BIN_DIR/phpmq-server" "$BIN_DIR/phpmq" "$root$PREFIX/bin/"
install -m 0644 man/phpmq-server.1 man/phpmq.1 "$root$PREFIX/share/man/man1/"
install -m 0644 man/phpmq-protocol.7 "$root$PREFIX/share/man/man7/"

# The service files name /usr/local/bin; point them at PREFIX.
rewrite() { sed "s#/usr/local/bin/#$PREFIX/bin/#g" "$1"; }
if [ "$service" = systemd ]; then
    install -d "$root/etc/systemd/system"
    rewrite scripts/phpmq.service > "$root/etc/systemd/system/phpmq.service"
    chmod 0644 "$root/etc/systemd/system/phpmq.service"
else
    install -d "$root/etc/init.d" "$root/etc/logrotate.d"
    rewrite scripts/phpmq.init > "$root/etc/init.d/phpmq"
    chmod 0755 "$root/etc/init.d/phpmq"
    install -m 0644 scripts/phpmq.logrotate "$root/etc/logrotate.d/phpmq"
fi

if [ "$user" = yes ] && [ -z "$DESTDIR" ] && ! id phpmq >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/phpmq --no-create-home \
        --shell /usr/sbin/nologin phpmq
    echo "created system user phpmq"
fi

echo "installed phpmq-server and phpmq in $root$PREFIX/bin"
if [ -z "$DESTDIR" ]; then
    if [ "$service" = systemd ]; then
        echo "next: systemctl daemon-reload && systemctl enable --now phpmq"
    else
        echo "next: update-rc.d phpmq defaults && /etc/init.d/phpmq start"
    fi
fi
