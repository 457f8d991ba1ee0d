#!/usr/bin/env bash
# The mailbox index tier at scale (docs/adr/0005-storage-v2.md): fills MESSAGES
# messages over USERS users through storage's own replicas, log and object store,
# and prints fill rate, write latency, RSS / index-on-disk / checkpoint bytes per
# message, checkpoint time and the write latency while it runs, the restore time of
# a replica with an empty disk, and INBOX status reads from cache and from disk.
#
#   loadtest/storage-scale.sh [MESSAGES=1000000] [USERS=10000] [BACKEND=both]
#
# BACKEND: `embedded` (the log and object store `mailctl dev` uses), `real` (tansu
# and s3s-fs from scripts/backends.sh, as the distributed deployment), or `both`.
# Index only: bodies are not written and users are not put in the directory (see
# loadtest/src/storage_scale.rs). PARTITIONS (16), CONCURRENCY (64),
# CACHE_BYTES (256 MiB) and PACED_RATE (2000 writes/s while the checkpoint stall is
# measured) can be set in the environment; OBJECTS_DIR puts the embedded backend's
# bucket on another device (e.g. /dev/shm), as a remote S3 bucket is.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-1000000}
USERS=${2:-10000}
BACKEND=${3:-both}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p mailmesh-loadtest --bin storage-scale
BIN=$CARGO_TARGET_DIR/release/storage-scale
run() {
  "$BIN" --backend "$1" --messages "$MESSAGES" --users "$USERS" \
    --partitions "${PARTITIONS:-16}" --concurrency "${CONCURRENCY:-64}" \
    --cache-bytes "${CACHE_BYTES:-268435456}" --paced-rate "${PACED_RATE:-2000}" \
    ${OBJECTS_DIR:+--objects-dir "$OBJECTS_DIR/$1"} --dir "/tmp/mailmesh-storage-scale-$1"
  rm -rf "/tmp/mailmesh-storage-scale-$1" ${OBJECTS_DIR:+"$OBJECTS_DIR/$1"}
}
case "$BACKEND" in
  embedded | both) run embedded ;;
esac
case "$BACKEND" in
  real | both)
    scripts/backends.sh start >/dev/null
    eval "$(scripts/backends.sh env)"
    # A bucket of its own: s3s-fs lists by walking the whole bucket.
    MMTEST_S3_BUCKET=scale$(date +%s)
    scripts/backends.sh bucket "$MMTEST_S3_BUCKET"
    trap 'scripts/backends.sh drop-bucket "$MMTEST_S3_BUCKET"' EXIT
    run real
    ;;
esac
