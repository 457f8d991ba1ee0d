#!/usr/bin/env bash
# README's test command on a fresh machine: a new Debian bookworm root file system
# (mmdebstrap: no cargo-nextest, redis, haproxy, dnsmasq, tansu, s3s-fs, helm; an empty
# cargo registry and build directory), with only what a new machine of this kind has
# (gcc, Python with pip, git, Node with npm, and the machine's Rust toolchain,
# bind-mounted from rustup), then `scripts/test.sh` on a clone of the commit and a
# first release build of mailctl, each timed. Not part of the gate (it takes the
# machine for about half an hour); run it before claiming a fresh machine works.
#
#   scripts/clean-machine.sh [REV]       # default HEAD; as root
#
# The root lives in ${CLEAN_ROOT:-/var/tmp/mailmesh-clean} and is made anew each run.
# The host's backends must be stopped first (the run starts its own on the same
# loopback ports): scripts/backends.sh stop.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD}
R=${CLEAN_ROOT:-/var/tmp/mailmesh-clean}
RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin

[ "$(id -u)" = 0 ] || { echo "clean-machine.sh: run as root (mmdebstrap, chroot, mounts)" >&2; exit 1; }
command -v mmdebstrap >/dev/null || apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null

cleanup() {
  # Whatever the run left going inside the root (its backends), then the mounts.
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$R" ] && kill "${p#/proc/}" 2>/dev/null
  done
  for m in dev/pts dev sys proc opt/cargo-bin opt/rustup; do umount -l "$R/$m" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== a new bookworm root in $R"
rm -rf "$R"
mmdebstrap --quiet --variant=minbase \
  --include=ca-certificates,curl,git,gcc,g++,make,libc6-dev,python3,python3-pip,python3-venv,perl,nodejs,npm,procps,iproute2,xz-utils,file \
  bookworm "$R"
# What the machine itself provides: name resolution, its egress CA, registry settings.
cp /etc/resolv.conf "$R/etc/resolv.conf"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
  chroot "$R" update-ca-certificates >/dev/null 2>&1
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$R/etc/pip.conf"
[ -f "$HOME/.npmrc" ] && cp "$HOME/.npmrc" "$R/root/.npmrc"
mkdir -p "$R/opt/rustup" "$R/opt/cargo-bin"
mount --bind "$RUSTUP_DIR" "$R/opt/rustup"
mount --bind "$CARGO_BIN" "$R/opt/cargo-bin"
mount -o remount,bind,ro "$R/opt/cargo-bin"
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
mount --bind /dev "$R/dev"
mount --bind /dev/pts "$R/dev/pts"
git clone -q . "$R/root/mailmesh"
git -C "$R/root/mailmesh" checkout -q "$(git rev-parse "$REV")"

# shellcheck disable=SC2016 # expanded inside the new root
chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/root/.cargo/bin:/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo \
  bash -c '
set -e
cd /root/mailmesh
echo "== fresh machine at $(git log --oneline -1 | cut -c1-72)"
for t in cargo-nextest redis-server haproxy dnsmasq tansu s3s-fs helm; do
  command -v "$t" >/dev/null && echo "   has $t" || echo "   no $t"
done
start=$(date +%s)
scripts/test.sh
echo "== scripts/test.sh on a fresh machine: $(( $(date +%s) - start )) s"
scripts/backends.sh stop
start=$(date +%s)
cargo build --release --locked -p mailctl
echo "== first release build of mailctl (crates already downloaded): $(( $(date +%s) - start )) s"
'
