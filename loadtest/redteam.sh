#!/usr/bin/env bash
# Red team: replays the attacks of issue 16 (internal APIs, hostile MIME, NUL
# tricks, SPF laundering through forwarding, amplification, slow and flooding
# clients, smuggling, forged results, password guessing) against `mailctl dev` and
# against the distributed deployment (every service its own process, with its own
# certificate from `mailctl pki init`, on real Kafka (tansu), S3 (s3s-fs) and Redis),
# and prints one verdict line per attack: PASS when mailmesh held.
#
#   loadtest/redteam.sh [dev|distributed|both]     (default both)
#
# The platforms run as shipped except for shorter command and pre-login deadlines
# (DEADLINE seconds, default 10, instead of 60) so the trickling attacks end
# quickly. DNS is a dnsmasq on a loopback port: corp.test publishes SPF for the
# platform's address and DMARC p=reject; remote.test and example.org have their MX
# at this program's test MX, which the platform relays to. Attacks come from
# loopback addresses (127.N.x.y), a fresh one per attack. Exit status 1 when any
# attack worked.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-both}
DEADLINE=${DEADLINE:-10}
WORK=/tmp/mailmesh-redteam
BASE=${BASE_PORT:-3100}
DNS_PORT=$((BASE + 90))
rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --locked -q -p mailctl -p mailmesh-storage -p mailmesh-auth \
  -p mailmesh-ingress -p mailmesh-submission -p mailmesh-delivery -p mailmesh-gateway \
  -p mailmesh-loadtest --bin redteam --bin mailctl --bin storage --bin auth-check \
  --bin smtp-ingress --bin submission --bin delivery-worker --bin imap-pop3-gateway
BIN=$CARGO_TARGET_DIR/release
MAILCTL=$BIN/mailctl

# DNS for the checks and the relay.
[ -x /usr/sbin/dnsmasq ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null
openssl genpkey -algorithm ed25519 -out "$WORK/arc.pem" 2>/dev/null
ARC_PUB=$(openssl pkey -in "$WORK/arc.pem" -pubout -outform DER | tail -c 32 | base64)
cat >"$WORK/dns.conf" <<CF
port=$DNS_PORT
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
local=/#/
txt-record=corp.test,"v=spf1 ip4:127.0.0.1 -all"
txt-record=_dmarc.corp.test,"v=DMARC1; p=reject"
txt-record=evil.test,"v=spf1 ip4:127.0.0.1 -all"
txt-record=arc._domainkey.arc.acme.test,"v=DKIM1; k=ed25519; p=$ARC_PUB"
mx-host=remote.test,mx.remote.test,10
mx-host=example.org,mx.remote.test,10
host-record=mx.remote.test,127.0.0.1
CF
/usr/sbin/dnsmasq --keep-in-foreground --conf-file="$WORK/dns.conf" &
PIDS+=($!)
DNS="[\"127.0.0.1:$DNS_PORT\"]"

# Both deployments: checks against this DNS, ARC sealing with the key above, the
# relay to the test MX (on a loopback port, so private destinations allowed),
# shorter deadlines. Per section, as each service reads only its own.
# Storage settings for the short passwords used here (`pw`): the default policy
# wants 12 characters and no common ones.
RELAXED_PASSWORDS="MAILMESH_STORAGE__PASSWORD_POLICY__MIN_LENGTH=1 MAILMESH_STORAGE__PASSWORD_POLICY__REFUSE_COMMON=false"

auth_settings() {
  echo MAILMESH_AUTH__DNS__SERVERS="$DNS" MAILMESH_AUTH__ARC_SEAL__KEY_FILE="$WORK/arc.pem" \
    MAILMESH_AUTH__ARC_SEAL__DOMAIN=arc.acme.test MAILMESH_AUTH__ARC_SEAL__SELECTOR=arc
}
outbound_settings() {
  echo MAILMESH_OUTBOUND__PORT="$MX_PORT" MAILMESH_OUTBOUND__ALLOW_PRIVATE_DESTINATIONS=true \
    MAILMESH_OUTBOUND__OPPORTUNISTIC_TLS=false MAILMESH_OUTBOUND__DNS__SERVERS="$DNS"
}
smtp_settings() { echo MAILMESH_SMTP__COMMAND_TIMEOUT="${DEADLINE}s"; }
submission_settings() { echo MAILMESH_SUBMISSION__LOGIN_TIMEOUT="${DEADLINE}s"; }
gateway_settings() {
  echo MAILMESH_IMAP__LOGIN_TIMEOUT="${DEADLINE}s" MAILMESH_IMAP__COMMAND_TIMEOUT="${DEADLINE}s" \
    MAILMESH_POP3__LOGIN_TIMEOUT="${DEADLINE}s" MAILMESH_POP3__COMMAND_TIMEOUT="${DEADLINE}s"
}

# The accounts the attacks use (see loadtest/src/redteam.rs).
accounts() {
  "$MAILCTL" tenant add acme >/dev/null
  "$MAILCTL" domain add acme acme.test >/dev/null
  for u in alice bob carol dave erin frank; do
    echo "$u-pw" | "$MAILCTL" user add "$u@acme.test" --password-stdin >/dev/null
  done
  echo mallory-pw | "$MAILCTL" user add mallory@acme.test --password-stdin --quota 1000000 >/dev/null
  # A tenant that accepts DMARC failures (its choice) and forwards off-site.
  "$MAILCTL" tenant add evil >/dev/null
  "$MAILCTL" domain add evil evil.test >/dev/null
  "$MAILCTL" tenant policy evil --dmarc-reject tag >/dev/null
  "$MAILCTL" alias add fwd@evil.test friend@remote.test >/dev/null
}

wait_ready() { # NAME ADMIN_PORT PID LOG
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$2/readyz" >/dev/null && return 0
    kill -0 "$3" 2>/dev/null || break
    sleep 0.5
  done
  echo "$1 did not become ready:" >&2
  tail -20 "$4" >&2
  exit 1
}

STATUS=0

if [ "$MODE" = dev ] || [ "$MODE" = both ]; then
  P=$BASE MX_PORT=$((BASE + 20))
  # shellcheck disable=SC2046
  env $RELAXED_PASSWORDS MAILMESH_TELEMETRY__LOG_LEVEL=warn $(auth_settings) $(outbound_settings) $(smtp_settings) \
    $(submission_settings) $(gateway_settings) MAILMESH_PORTS__SMTP=$P MAILMESH_PORTS__STORAGE=$((P + 1)) MAILMESH_PORTS__IMAP=$((P + 2)) \
    MAILMESH_PORTS__IMAPS=$((P + 3)) MAILMESH_PORTS__POP3=$((P + 4)) MAILMESH_PORTS__POP3S=$((P + 5)) \
    MAILMESH_PORTS__SUBMISSION=$((P + 6)) MAILMESH_PORTS__SUBMISSIONS=$((P + 7)) \
    "$MAILCTL" dev --data-dir "$WORK/dev" --admin-listen "127.0.0.1:$((P + 8))" >"$WORK/dev.log" 2>&1 &
  DEV=$!
  PIDS+=("$DEV")
  wait_ready "mailctl dev" $((P + 8)) "$DEV" "$WORK/dev.log"
  export MAILCTL_ENDPOINT=https://127.0.0.1:$((P + 1)) MAILCTL_PKI_DIR=$WORK/dev/pki
  accounts
  "$BIN/redteam" --label dev --net 1 --smtp 127.0.0.1:$P --submissions 127.0.0.1:$((P + 7)) \
    --imaps 127.0.0.1:$((P + 3)) --pop3s 127.0.0.1:$((P + 5)) --storage "$MAILCTL_ENDPOINT" \
    --pki "$WORK/dev/pki" --mx 127.0.0.1:$MX_PORT --authserv-id localhost --deadline "$DEADLINE" \
    --pid "mailctl dev=$DEV" --imap-pid "$DEV" || STATUS=1
  kill "$DEV" 2>/dev/null || true
fi

if [ "$MODE" = distributed ] || [ "$MODE" = both ]; then
  scripts/backends.sh start >/dev/null
  eval "$(scripts/backends.sh env)"
  P=$((BASE + 40)) MX_PORT=$((BASE + 60))
  RUN=rt$(date +%s)
  PKI=$WORK/pki
  "$MAILCTL" pki init "$PKI" >/dev/null
  STORAGE=$P AUTH=$((P + 1)) SMTP=$((P + 2)) SUB=$((P + 3)) SUBS=$((P + 4))
  IMAP=$((P + 5)) IMAPS=$((P + 6)) POP3=$((P + 7)) POP3S=$((P + 8))
  SRS_SECRET=$(head -c 32 /dev/urandom | base64)
  openssl req -x509 -newkey ed25519 -nodes -keyout "$WORK/tls.key" -out "$WORK/tls.crt" \
    -subj /CN=localhost -days 2 2>/dev/null
  # The backends' settings, for the services that keep state.
  QUEUE="MAILMESH_QUEUE__KAFKA__BROKERS=$MMTEST_KAFKA MAILMESH_QUEUE__KAFKA__REPLICATION_FACTOR=1"
  OBJECTS="MAILMESH_OBJECT_STORE__S3__BUCKET=$MMTEST_S3_BUCKET MAILMESH_OBJECT_STORE__S3__ENDPOINT=$MMTEST_S3
    MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID=$MMTEST_S3_ACCESS_KEY MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY=$MMTEST_S3_SECRET_KEY"
  CACHE="MAILMESH_CACHE__REDIS__URL=$MMTEST_REDIS MAILMESH_CACHE__REDIS__KEY_PREFIX=$RUN:"
  TLS="MAILMESH_TLS__CERT_FILE=$WORK/tls.crt MAILMESH_TLS__KEY_FILE=$WORK/tls.key"
  STORAGE_URL=https://127.0.0.1:$STORAGE
  start() { # NAME ADMIN_PORT VAR=VALUE...: a service with its own identity (ADR 0006)
    local name=$1 admin=$2 role=$1
    shift 2
    [ "$name" = imap-pop3-gateway ] && role=gateway
    env -i PATH="$PATH" MAILMESH_TELEMETRY__LOG_LEVEL=warn MAILMESH_ADMIN__LISTEN="127.0.0.1:$admin" \
      MAILMESH_INTERNAL_TLS__CERT_FILE="$PKI/$role.crt" MAILMESH_INTERNAL_TLS__KEY_FILE="$PKI/$role.key" \
      MAILMESH_INTERNAL_TLS__CA_FILE="$PKI/ca.crt" "$@" "$BIN/$name" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${name//-/_}=$!"
    wait_ready "$name" "$admin" "$!" "$WORK/$name.log"
  }
  # shellcheck disable=SC2086
  start storage $((P + 10)) $QUEUE $OBJECTS $CACHE $RELAXED_PASSWORDS MAILMESH_GRPC_LISTEN=127.0.0.1:$STORAGE \
    MAILMESH_STORAGE__DIRECTORY_TOPIC=$RUN.directory MAILMESH_STORAGE__MAILBOX_TOPIC=$RUN.mailboxes
  export MAILCTL_ENDPOINT=$STORAGE_URL MAILCTL_PKI_DIR=$PKI
  accounts
  # shellcheck disable=SC2046,SC2086
  start auth-check $((P + 11)) $CACHE $(auth_settings) MAILMESH_GRPC_LISTEN=127.0.0.1:$AUTH \
    MAILMESH_AUTH__AUTHSERV_ID=mx.acme.test
  # shellcheck disable=SC2046,SC2086
  start smtp-ingress $((P + 12)) $QUEUE $OBJECTS $CACHE $TLS $(smtp_settings) MAILMESH_LISTEN=127.0.0.1:$SMTP \
    MAILMESH_STORAGE_ENDPOINT=$STORAGE_URL MAILMESH_AUTH_CHECK_ENDPOINT=https://127.0.0.1:$AUTH \
    MAILMESH_SMTP__TOPIC=$RUN.mail MAILMESH_SMTP__HOSTNAME=mx.acme.test MAILMESH_SMTP__SRS__SECRET="$SRS_SECRET"
  # shellcheck disable=SC2046,SC2086
  start submission $((P + 13)) $QUEUE $OBJECTS $CACHE $TLS $(smtp_settings) $(submission_settings) \
    MAILMESH_LISTEN=127.0.0.1:$SUB MAILMESH_LISTEN_TLS=127.0.0.1:$SUBS MAILMESH_STORAGE_ENDPOINT=$STORAGE_URL \
    MAILMESH_SMTP__TOPIC=$RUN.mail MAILMESH_SMTP__HOSTNAME=mx.acme.test MAILMESH_SMTP__AUTHSERV_ID=mx.acme.test
  # shellcheck disable=SC2046,SC2086
  start delivery-worker $((P + 14)) $QUEUE $OBJECTS $CACHE $(outbound_settings) \
    MAILMESH_STORAGE_ENDPOINT=$STORAGE_URL MAILMESH_WORKER__TOPIC=$RUN.mail MAILMESH_WORKER__GROUP=$RUN.workers \
    MAILMESH_OUTBOUND__GROUP=$RUN.outbound MAILMESH_WORKER__HOSTNAME=mx.acme.test \
    MAILMESH_WORKER__SRS__SECRET="$SRS_SECRET"
  # shellcheck disable=SC2046,SC2086
  start imap-pop3-gateway $((P + 15)) $CACHE $TLS $(gateway_settings) MAILMESH_STORAGE_ENDPOINT=$STORAGE_URL \
    MAILMESH_IMAP_LISTEN=127.0.0.1:$IMAP MAILMESH_IMAPS_LISTEN=127.0.0.1:$IMAPS \
    MAILMESH_POP3_LISTEN=127.0.0.1:$POP3 MAILMESH_POP3S_LISTEN=127.0.0.1:$POP3S
  "$BIN/redteam" --label distributed --net 2 --smtp 127.0.0.1:$SMTP --submissions 127.0.0.1:$SUBS \
    --imaps 127.0.0.1:$IMAPS --pop3s 127.0.0.1:$POP3S --storage "$MAILCTL_ENDPOINT" \
    --auth-check https://127.0.0.1:$AUTH --pki "$PKI" --mx 127.0.0.1:$MX_PORT \
    --authserv-id mx.acme.test --deadline "$DEADLINE" \
    --pid "storage=$PID_storage" --pid "imap-pop3-gateway=$PID_imap_pop3_gateway" --imap-pid "$PID_imap_pop3_gateway" \
    --pid "smtp-ingress=$PID_smtp_ingress" || STATUS=1
fi
exit $STATUS
