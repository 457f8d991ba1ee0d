#!/usr/bin/env bash
# How long a mailbox partition is out of service after its owner is SIGKILLed
# (ADR 0005 §1), with a warm standby and without: two storage processes (release
# builds) on tansu and s3s-fs from scripts/backends.sh, as a cluster runs them.
#
#   loadtest/storage-takeover.sh [MESSAGES=1000000] [USERS=10000]
#
# For each of STANDBYS=1 and STANDBYS=0: storage-scale fills a new mailbox log with
# MESSAGES index entries over USERS users and checkpoints it (the size a takeover
# without a standby restores); replica A opens every partition, 16 probe users get
# a message each, replica B joins (the group splits the partitions; with a standby
# each keeps the other's warm). Then A is SIGKILLed and, through B, every probe
# user's mailbox is read until all answer. Prints when B owned every partition
# (the group noticed: `owner_session_timeout` plus a rebalance) and when every
# user was served again. PARTITIONS (4) and SESSION_TIMEOUT (6s) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-1000000}
USERS=${2:-10000}
PARTITIONS=${PARTITIONS:-4}
SESSION_TIMEOUT=${SESSION_TIMEOUT:-6s}
WORK=/tmp/mailmesh-loadtest-takeover
BASE=${BASE_PORT:-3100}
PIDS=()
BUCKET=
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -z "$BUCKET" ] || scripts/backends.sh drop-bucket "$BUCKET"
}
trap cleanup EXIT

scripts/backends.sh start >/dev/null
eval "$(scripts/backends.sh env)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p mailmesh-storage -p mailctl -p mailmesh-loadtest --bin storage-scale
BIN=$CARGO_TARGET_DIR/release
MAILCTL=$BIN/mailctl

# metric ADMIN_PORT NAME LABELS: a replica's metric, summed over matching series.
metric() {
  curl -sf "http://127.0.0.1:$1/metrics" |
    awk -v n="$2" -v l="$3" 'index($0, n) == 1 && index($0, l) {s += $NF} END {printf "%d", s}'
}
now() { date +%s.%N; }
since() { python3 -c "print('%.1f' % ($(now) - $1))"; }

# replica NAME GRPC ADMIN STANDBYS: a storage process with its own index volume.
replica() {
  env -i PATH="$PATH" MAILMESH_TELEMETRY__LOG_LEVEL=info MAILMESH_ADMIN__LISTEN="127.0.0.1:$3" \
    MAILMESH_GRPC_LISTEN="127.0.0.1:$2" MAILMESH_SHUTDOWN__READINESS_GRACE=0s \
    MAILMESH_INTERNAL_TLS__CERT_FILE="$PKI/storage.crt" MAILMESH_INTERNAL_TLS__KEY_FILE="$PKI/storage.key" \
    MAILMESH_INTERNAL_TLS__CA_FILE="$PKI/ca.crt" MAILMESH_STORAGE__SESSION_SECRET="$SECRET" \
    MAILMESH_QUEUE__KAFKA__BROKERS="$MMTEST_KAFKA" MAILMESH_QUEUE__KAFKA__REPLICATION_FACTOR=1 \
    MAILMESH_OBJECT_STORE__S3__BUCKET="$BUCKET" MAILMESH_OBJECT_STORE__S3__ENDPOINT="$MMTEST_S3" \
    MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID="$MMTEST_S3_ACCESS_KEY" \
    MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY="$MMTEST_S3_SECRET_KEY" \
    MAILMESH_STORAGE__DIRECTORY_TOPIC="$RUN.directory" MAILMESH_STORAGE__MAILBOX_TOPIC="$RUN.mailboxes" \
    MAILMESH_STORAGE__MAILBOX_PARTITIONS="$PARTITIONS" MAILMESH_STORAGE__INDEX_DIR="$WORK/$1/index" \
    MAILMESH_STORAGE__STANDBYS="$4" MAILMESH_STORAGE__OWNER_SESSION_TIMEOUT="$SESSION_TIMEOUT" \
    "$BIN/storage" >"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  LAST=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$3/readyz" >/dev/null && return 0
    kill -0 "$LAST" 2>/dev/null || break
    sleep 0.5
  done
  echo "storage $1 did not become ready:" >&2
  tail -20 "$WORK/$1.log" >&2
  exit 1
}

for standbys in 1 0; do
  rm -rf "$WORK" && mkdir -p "$WORK"
  RUN=takeover$(date +%s)
  BUCKET=$RUN
  scripts/backends.sh bucket "$BUCKET"
  PKI=$WORK/pki
  "$MAILCTL" pki init "$PKI" >/dev/null
  SECRET=$(openssl rand -base64 32)
  echo "== standbys=$standbys: $MESSAGES messages over $USERS users in $PARTITIONS partitions"
  MMTEST_S3_BUCKET=$BUCKET "$BIN/storage-scale" --backend real --topic "$RUN.mailboxes" \
    --partitions "$PARTITIONS" --messages "$MESSAGES" --users "$USERS" --fill-only \
    --dir "$WORK/fill" | tail -1
  rm -rf "$WORK/fill"
  A_GRPC=$BASE A_ADMIN=$((BASE + 1)) B_GRPC=$((BASE + 2)) B_ADMIN=$((BASE + 3))
  t=$(now)
  replica a "$A_GRPC" "$A_ADMIN" "$standbys"
  A=$LAST
  echo "replica A ready in $(since "$t") s"
  export MAILCTL_ENDPOINT=https://127.0.0.1:$A_GRPC MAILCTL_PKI_DIR=$PKI
  "$MAILCTL" tenant add acme >/dev/null
  "$MAILCTL" domain add acme acme.test >/dev/null
  for i in $(seq 0 15); do
    echo "probe-password-$i" | "$MAILCTL" user add "probe$i@acme.test" --password-stdin >/dev/null
  done
  replica b "$B_GRPC" "$B_ADMIN" "$standbys"
  # Split, and (with standbys) each replica has every partition open.
  want_open=$PARTITIONS
  [ "$standbys" = 1 ] || want_open=0
  for _ in $(seq 1 600); do
    a=$(metric "$A_ADMIN" mailmesh_storage_mailbox_partitions 'state="owned"')
    b=$(metric "$B_ADMIN" mailmesh_storage_mailbox_partitions 'state="owned"')
    bo=$(metric "$B_ADMIN" mailmesh_storage_mailbox_partitions 'state="open"')
    if [ "$a" -ge 1 ] && [ "$b" -ge 1 ] && [ $((a + b)) = "$PARTITIONS" ] &&
      { [ "$want_open" = 0 ] || [ "$bo" = "$want_open" ]; }; then
      break
    fi
    sleep 0.5
  done
  echo "split: A owns $a, B owns $b (B has $bo open)"
  export MAILCTL_ENDPOINT=https://127.0.0.1:$B_GRPC
  { kill -9 "$A" && wait "$A"; } 2>/dev/null || true
  t=$(now)
  # When B owns every partition (the group moved A's), polled apart from the
  # probes, which wait in B's routing until their partition is served.
  (
    until [ "$(metric "$B_ADMIN" mailmesh_storage_mailbox_partitions 'state="owned"')" = "$PARTITIONS" ]; do
      sleep 0.1
    done
    since "$t" >"$WORK/owned_at"
  ) &
  declare -A served=()
  while [ "${#served[@]}" -lt 16 ]; do
    for i in $(seq 0 15); do
      [ -n "${served[$i]:-}" ] && continue
      if "$MAILCTL" mailbox list "probe$i@acme.test" >/dev/null 2>&1; then served[$i]=1; fi
    done
    python3 -c "import sys; sys.exit(0 if $(now) - $t < 300 else 1)" || {
      echo "not served after 300 s" >&2
      exit 1
    }
  done
  served_at=$(since "$t")
  sleep 0.5
  echo "after the SIGKILL of A: B owned every partition at $(cat "$WORK/owned_at" 2>/dev/null || echo '?') s, every user served at $served_at s"
  echo "B's takeovers: from standby $(metric "$B_ADMIN" mailmesh_storage_partition_takeovers_total 'from="standby"'), restored $(metric "$B_ADMIN" mailmesh_storage_partition_takeovers_total 'from="restore"')"
  grep -h "checkpoint restored" "$WORK/b.log" | tail -3 || true
  for p in "${PIDS[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done
  PIDS=()
  unset served
  scripts/backends.sh drop-bucket "$BUCKET"
  BUCKET=
  sleep 2
done
