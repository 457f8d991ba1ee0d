#!/usr/bin/env bash
# SMTP inbound in distributed mode: storage, auth-check, smtp-ingress and
# delivery-worker as separate processes (release builds) on the real backends that
# scripts/backends.sh runs (tansu for Kafka, s3s-fs for S3, Redis), as a cluster runs
# them, one of each.
#
#   loadtest/smtp-distributed.sh [MESSAGES=10000] [SESSIONS=20] [SIZE=10240]
#
# Postfix's `smtp-source` sends the messages to one mailbox; time runs until the last
# is delivered. Prints accepted/s and delivered/s, then where the time went: CPU
# seconds and peak RSS of each mailmesh process and of each backend over the run.
#
# IMAP=1 then also starts an imap-pop3-gateway on that storage and measures IMAP
# commands on the full mailbox (loadtest/imap_bigmailbox.py: SELECT, STATUS, LIST, FETCH
# 1:* FLAGS, UID FETCH of the last 100, UID SEARCH UNSEEN, NOOP; latency and CPU of
# storage + gateway per command), and how many log records storage produced
# meanwhile (read-only commands: none).
#
# DRAIN=1 starts the delivery worker only once every message is accepted, and
# times the delivery alone (from the worker's readiness to the last message in the
# mailbox), with the CPU each process spent on it: what one worker and one storage
# replica deliver into one mailbox when nothing else competes for the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
S=${2:-20}
L=${3:-10240}
WORK=/tmp/mailmesh-loadtest-dist
BASE=${BASE_PORT:-2900}
DNS_PORT=${DNS_PORT:-2953}
rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -z "${BUCKET:-}" ] || scripts/backends.sh drop-bucket "$BUCKET"
}
trap cleanup EXIT

# shellcheck source=loadtest/common.sh
. loadtest/common.sh
need_postfix
scripts/backends.sh start >/dev/null
eval "$(scripts/backends.sh env)"
cargo build --release -q -p mailmesh-storage -p mailmesh-auth -p mailmesh-ingress \
  -p mailmesh-delivery -p mailctl ${IMAP:+-p mailmesh-gateway}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
MAILCTL=$BIN/mailctl
start_dns

RUN=lt$(date +%s)
# A bucket of its own: s3s-fs lists by walking the whole bucket.
BUCKET=$RUN
scripts/backends.sh bucket "$BUCKET"
STORAGE=$BASE SMTP=$((BASE + 1)) AUTH=$((BASE + 2))
# Mutual TLS between the services (ADR 0006): a CA and a certificate per role.
PKI=$WORK/pki
"$MAILCTL" pki init "$PKI" >/dev/null
# common_env ADMIN_PORT NAME: every service's settings (its internal identity); those
# of the queue and the object store unless the service is auth-check (no state).
common_env() {
  echo MAILMESH_TELEMETRY__LOG_LEVEL=warn MAILMESH_ADMIN__LISTEN=127.0.0.1:$1
  echo MAILMESH_INTERNAL_TLS__CERT_FILE="$PKI/$2.crt" MAILMESH_INTERNAL_TLS__KEY_FILE="$PKI/$2.key" \
    MAILMESH_INTERNAL_TLS__CA_FILE="$PKI/ca.crt"
  [ "$2" = auth-check ] || [ "$2" = gateway ] && return 0
  echo MAILMESH_QUEUE__KAFKA__BROKERS="$MMTEST_KAFKA" MAILMESH_QUEUE__KAFKA__REPLICATION_FACTOR=1 \
    MAILMESH_OBJECT_STORE__S3__BUCKET="$BUCKET" MAILMESH_OBJECT_STORE__S3__ENDPOINT="$MMTEST_S3" \
    MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID="$MMTEST_S3_ACCESS_KEY" \
    MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY="$MMTEST_S3_SECRET_KEY"
}
# start NAME ADMIN_PORT VAR=VALUE...: a service with the backends' settings.
start() {
  local name=$1 admin=$2
  shift 2
  # shellcheck disable=SC2046
  env -i PATH="$PATH" $(common_env "$admin" "${name/imap-pop3-gateway/gateway}") "$@" "$BIN/$name" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_${name//-/_}=$!"
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && return 0
    kill -0 "$!" 2>/dev/null || break
    sleep 0.5
  done
  echo "$name did not become ready:" >&2
  tail -20 "$WORK/$name.log" >&2
  exit 1
}

# shellcheck disable=SC2086
start storage $((BASE + 10)) $RELAXED_PASSWORDS MAILMESH_GRPC_LISTEN=127.0.0.1:$STORAGE \
  MAILMESH_STORAGE__DIRECTORY_TOPIC=$RUN.directory MAILMESH_STORAGE__MAILBOX_TOPIC=$RUN.mailboxes
export MAILCTL_ENDPOINT=https://127.0.0.1:$STORAGE MAILCTL_PKI_DIR=$PKI
"$MAILCTL" tenant add acme >/dev/null
"$MAILCTL" domain add acme acme.test >/dev/null
echo pw | "$MAILCTL" user add alice@acme.test --password-stdin >/dev/null
start auth-check $((BASE + 11)) MAILMESH_GRPC_LISTEN=127.0.0.1:$AUTH \
  MAILMESH_AUTH__AUTHSERV_ID=mx.acme.test MAILMESH_AUTH__DNS__SERVERS="[\"127.0.0.1:$DNS_PORT\"]"
start smtp-ingress $((BASE + 12)) MAILMESH_LISTEN=127.0.0.1:$SMTP \
  MAILMESH_STORAGE_ENDPOINT=http://127.0.0.1:$STORAGE MAILMESH_AUTH_CHECK_ENDPOINT=http://127.0.0.1:$AUTH \
  MAILMESH_SMTP__TOPIC=$RUN.mail MAILMESH_SMTP__HOSTNAME=mx.acme.test \
  MAILMESH_SMTP__CONNECTIONS_PER_IP_PER_MINUTE=0 \
  MAILMESH_CACHE__REDIS__URL="$MMTEST_REDIS" MAILMESH_CACHE__REDIS__KEY_PREFIX=$RUN:
start_worker() {
  start delivery-worker $((BASE + 13)) MAILMESH_STORAGE_ENDPOINT=http://127.0.0.1:$STORAGE \
    MAILMESH_WORKER__TOPIC=$RUN.mail MAILMESH_WORKER__GROUP=$RUN.workers MAILMESH_WORKER__HOSTNAME=mx.acme.test \
    ${WORKER_CONCURRENCY:+MAILMESH_WORKER__CONCURRENCY=$WORKER_CONCURRENCY}
}
[ -n "${DRAIN:-}" ] || start_worker

# CPU seconds (user + system) of a process so far.
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
declare -A PROCS=(
  [storage]=$PID_storage [auth-check]=$PID_auth_check [smtp-ingress]=$PID_smtp_ingress
  [tansu]=$(pgrep -x tansu | head -1) [s3s-fs]=$(pgrep -x s3s-fs | head -1)
  [redis]=$(pgrep -x redis-server | head -1)
)
declare -A CPU0
snapshot_cpu() { for p in "${!PROCS[@]}"; do CPU0[$p]=$(cpu "${PROCS[$p]}"); done; }
[ -n "${DRAIN:-}" ] || PROCS[delivery-worker]=$PID_delivery_worker
snapshot_cpu

t0=$(date +%s.%N)
smtp-source -s "$S" -m "$N" -l "$L" -M client.example.org -f bench@example.org \
  -t alice@acme.test "127.0.0.1:$SMTP"
t1=$(date +%s.%N)
if [ -n "${DRAIN:-}" ]; then
  python3 -c "print('accepted/s %.0f  (%d in %.1f s, no worker running)' % ($N / ($t1 - $t0), $N, $t1 - $t0))"
  start_worker
  PROCS[delivery-worker]=$PID_delivery_worker
  snapshot_cpu
  t0=$(date +%s.%N)
  early=$(inbox_count alice@acme.test)
  N=$((N - early))
  echo "delivered before the worker was ready: $early (left out of the rate below)"
  t1=$t0
  target=$((N + early))
else
  target=$N
fi
for _ in $(seq 1 3000); do
  [ "$(inbox_count alice@acme.test)" -ge "$target" ] && break
  sleep 0.2
done
t2=$(date +%s.%N)
got=$(($(inbox_count alice@acme.test) - target + N))
if [ -n "${DRAIN:-}" ]; then
  python3 -c "print('delivered/s %.0f  (%d of %d delivered in %.1f s by the worker alone)' % ($N / ($t2 - $t0), $got, $N, $t2 - $t0))"
else
  python3 -c "print('accepted/s %.0f  delivered/s %.0f  (%d of %d delivered in %.1f s)' % ($N / ($t1 - $t0), $N / ($t2 - $t0), $got, $N, $t2 - $t0))"
fi
printf '%-16s %10s %14s %10s\n' process cpu_s cpu_ms/msg peak_rss_MB
for p in storage auth-check smtp-ingress delivery-worker tansu s3s-fs redis; do
  pid=${PROCS[$p]}
  used=$(python3 -c "print('%.2f' % ($(cpu "$pid") - ${CPU0[$p]}))")
  printf '%-16s %10s %14s %10s\n' "$p" "$used" "$(python3 -c "print('%.3f' % ($used * 1000 / $N))")" \
    "$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$pid/status")"
done
python3 -c "print('wall seconds %.1f on 2 cores: %.1f CPU-seconds available' % ($t2 - $t0, 2 * ($t2 - $t0)))"

[ -n "${IMAP:-}" ] || exit 0
IMAP_PORT=$((BASE + 3))
openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 2 \
  -keyout "$WORK/gateway.key" -out "$WORK/gateway.crt" 2>/dev/null
start imap-pop3-gateway $((BASE + 14)) MAILMESH_STORAGE_ENDPOINT=https://127.0.0.1:$STORAGE \
  MAILMESH_IMAP_LISTEN=127.0.0.1:$IMAP_PORT MAILMESH_IMAPS_LISTEN=127.0.0.1:$((BASE + 4)) \
  MAILMESH_POP3_LISTEN=127.0.0.1:$((BASE + 5)) MAILMESH_POP3S_LISTEN=127.0.0.1:$((BASE + 6)) \
  MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true MAILMESH_IMAP__CONNECTIONS_PER_IP_PER_MINUTE=0 \
  MAILMESH_TLS__CERT_FILE="$WORK/gateway.crt" MAILMESH_TLS__KEY_FILE="$WORK/gateway.key" \
  MAILMESH_CACHE__REDIS__URL="$MMTEST_REDIS" MAILMESH_CACHE__REDIS__KEY_PREFIX=$RUN:
# Records storage produced, by kind (its metrics).
records() {
  curl -sf "http://127.0.0.1:$((BASE + 10))/metrics" |
    awk '/^mailmesh_storage_records_published_total/ {s += $2} END {printf "%d", s}'
}
before=$(records)
IMAP_USER=alice@acme.test python3 loadtest/imap_bigmailbox.py distributed "$IMAP_PORT" \
  "$PID_storage" "$PID_imap_pop3_gateway" "${REPEAT:-20}"
echo "storage log records produced during the IMAP commands: $(($(records) - before))"
