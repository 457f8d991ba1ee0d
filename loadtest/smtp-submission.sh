#!/usr/bin/env bash
# SMTP submission and outbound relay, mailmesh beside Postfix on this machine, in one
# run (compare ratios from one run only).
#
#   loadtest/smtp-submission.sh [MESSAGES] [SESSIONS] [SIZE] [ROUNDS] [PER_SESSION]
#   (defaults 5000 20 10240 2 10)
#
# The client is `smtp-load` (loadtest/src/smtp_load.rs) as users' mail programs: each
# connection does EHLO, STARTTLS, EHLO, AUTH PLAIN (alice@acme.test, Argon2id hash
# m=19456,t=2,p=1 on both sides), sends PER_SESSION messages from alice to
# friend@remote.test and QUITs. Both servers sign every message with an RSA-2048
# DKIM key and relay it to Postfix's smtp-sink on loopback, which writes each message
# to a file; a run ends when the last message is at the sink.
# - Postfix: submission smtpd (TLS required, ECDSA P-256 certificate like mailmesh's),
#   SASL through Dovecot's auth service (SQLite passdb), reject_sender_login_mismatch,
#   OpenDKIM as a milter, queue fsynced, relayhost = the sink (no MX lookup).
# - mailmesh: `mailctl dev` (submission -> auth-check -> embedded queue fsynced ->
#   delivery worker -> MX lookup against a local dnsmasq -> the sink).
# Prints messages/s accepted and relayed, CPU ms per message and peak PSS (of every
# process of each side, sampled by smtp-load: Postfix's master and children + Dovecot
# + OpenDKIM, or mailctl dev) and the ratios mailmesh/Postfix.
# Needs: postfix, dovecot-core, opendkim, opendkim-tools, dnsmasq-base (Debian,
# installed when missing), python3 with argon2-cffi (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
S=${2:-20}
L=${3:-10240}
ROUNDS=${4:-2}
PER=${5:-10}
# The same place as smtp-inbound.sh: the default main.cf names it in
# alternate_config_directories.
WORK=/tmp/mailmesh-loadtest
rm -rf "$WORK" && mkdir -p "$WORK"
PF_PORT=${PF_PORT:-2626}
MM_PORT=${MM_PORT:-2627}
DNS_PORT=${DNS_PORT:-2653}
SINK_PORT=${SINK_PORT:-2640}
AUTH_PORT=${AUTH_PORT:-2641}
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  postfix_restore
}
trap cleanup EXIT

# shellcheck source=loadtest/common.sh
. loadtest/common.sh
need_postfix
command -v dovecot >/dev/null && command -v opendkim >/dev/null && command -v opendkim-genkey >/dev/null &&
  [ -e /usr/lib/dovecot/modules/auth/libdriver_sqlite.so ] ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dovecot-core dovecot-sqlite opendkim opendkim-tools >/dev/null
python3 -c "import argon2" 2>/dev/null || pip install -q argon2-cffi
service dovecot stop >/dev/null 2>&1 || true
service opendkim stop >/dev/null 2>&1 || true
postfix_alternate

cargo build --release -q -p mailctl -p mailmesh-loadtest
MAILCTL=$PWD/target/release/mailctl
LOAD=$PWD/target/release/smtp-load
HASH=$(python3 -c "import argon2; print(argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash('pw'))")

# The remote side: every message as a file under $WORK/sink.
mkdir -p "$WORK/sink"
chown nobody:nogroup "$WORK/sink"
smtp-sink -u nobody -h mx.remote.test -d "$WORK/sink/%H/" "127.0.0.1:$SINK_PORT" 1000 &
PIDS+=($!)
at_sink() {
  find "$WORK/sink" -type f | wc -l
}

# DNS for mailmesh: remote.test's MX is the sink's address; everything else NXDOMAIN.
[ -x /usr/sbin/dnsmasq ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null
/usr/sbin/dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$DNS_PORT" \
  --listen-address=127.0.0.1 --bind-interfaces --local=/#/ \
  --mx-host=remote.test,mx.remote.test,10 --host-record=mx.remote.test,127.0.0.1 &
PIDS+=($!)
export MAILMESH_AUTH__DNS__SERVERS="[\"127.0.0.1:$DNS_PORT\"]"
export MAILMESH_OUTBOUND__DNS__SERVERS="[\"127.0.0.1:$DNS_PORT\"]"
export MAILMESH_OUTBOUND__PORT=$SINK_PORT MAILMESH_OUTBOUND__ALLOW_PRIVATE_DESTINATIONS=true
# Postfix has no per-user hourly send limit; mailmesh's default (1,000) is lifted.
export MAILMESH_SUBMISSION__RECIPIENTS_PER_USER_PER_HOUR=0

# Dovecot: only its auth service, for Postfix's SASL, on a TCP port.
setup_dovecot_auth() {
  local d=$WORK/dovecot
  mkdir -p "$d/run"
  dovecot_users "$d" alice@acme.test
  cat >"$d/dovecot.conf" <<CF
base_dir = $d/run
state_dir = $d/run
log_path = $d/log
protocols =
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {
  driver = sql
  args = $d/sql.conf.ext
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  inet_listener {
    address = 127.0.0.1
    port = $AUTH_PORT
  }
}
service anvil {
  chroot =
}
CF
  dovecot -c "$d/dovecot.conf"
  DC_PID=$(cat "$d/run/master.pid")
  PIDS+=("$DC_PID")
}

# OpenDKIM signing acme.test with its own RSA-2048 key, as Postfix's milter on a unix
# socket (as Debian sets it up; over TCP each message waited 88 ms for delayed ACKs).
setup_opendkim() {
  local d=$WORK/opendkim
  mkdir -p "$d"
  chmod 755 "$d"
  opendkim-genkey -D "$d" -d acme.test -s pf1 -b 2048
  chown -R opendkim:opendkim "$d" 2>/dev/null || chown -R nobody:nogroup "$d"
  cat >"$d/opendkim.conf" <<CF
Domain acme.test
Selector pf1
KeyFile $d/pf1.private
Socket local:$d/milter.sock
UMask 000
Mode s
Canonicalization relaxed/relaxed
Syslog no
Background no
# The key lives under /tmp, which others can write to.
RequireSafeKeys no
UserID $(id -un opendkim 2>/dev/null || echo nobody)
CF
  opendkim -x "$d/opendkim.conf" -f &
  ODKIM_PID=$!
  PIDS+=("$ODKIM_PID")
}

setup_postfix() {
  local etc=$WORK/pf/etc
  mkdir -p "$etc" "$WORK/pf/spool" "$WORK/pf/data"
  chown postfix:postfix "$WORK/pf/data"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=submit.postfix.test -keyout "$etc/key.pem" -out "$etc/cert.pem" 2>/dev/null
  cp /etc/postfix/master.cf "$etc/master.cf"
  sed -i 's/^smtp      inet/#smtp      inet/' "$etc/master.cf"
  cat >>"$etc/master.cf" <<CF
127.0.0.1:$PF_PORT inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=dovecot
  -o smtpd_sasl_path=inet:127.0.0.1:$AUTH_PORT
  -o smtpd_sender_login_maps=static:alice@acme.test
  -o smtpd_sender_restrictions=reject_sender_login_mismatch
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
CF
  cat >"$etc/main.cf" <<CF
compatibility_level = 3.6
config_directory = $etc
queue_directory = $WORK/pf/spool
data_directory = $WORK/pf/data
mail_owner = postfix
setgid_group = postdrop
myhostname = submit.postfix.test
mydomain = acme.test
myorigin = acme.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$SINK_PORT
smtp_tls_security_level = may
smtpd_tls_cert_file = $etc/cert.pem
smtpd_tls_key_file = $etc/key.pem
smtpd_milters = unix:$WORK/opendkim/milter.sock
milter_default_action = tempfail
message_size_limit = 67108864
default_process_limit = 200
maillog_file_prefixes = /var, /dev/stdout, /tmp
maillog_file = $WORK/pf/maillog
CF
  postfix -c "$etc" check >/dev/null 2>&1 || true
  postfix -c "$etc" start >/dev/null 2>&1 || {
    echo "postfix did not start; see $WORK/pf/maillog" >&2
    exit 1
  }
  PF_PID=$(tr -d ' ' <"$WORK/pf/spool/pid/master.pid")
}

setup_dovecot_auth
setup_opendkim
setup_postfix

# load PORT OUT SAMPLE_PIDS...: the workload against PORT, its report in OUT; ends
# when all of this round's messages are at the sink.
load() {
  local port=$1 out=$2
  shift 2
  local samples=() p
  for p in "$@"; do samples+=(--sample-pid "$p"); done
  local target=$(($(at_sink) + N))
  "$LOAD" --server "127.0.0.1:$port" --starttls --auth alice@acme.test:pw \
    --from alice@acme.test --to friend@remote.test --messages "$N" --sessions "$S" \
    --size "$L" --per-session "$PER" --seconds 600 "${samples[@]}" \
    --delivered-check "[ \$(find $WORK/sink -type f | wc -l) -ge $target ]" | tee "$out"
  local last
  last=$(find "$WORK/sink" -type f -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
  grep -q '^DKIM-Signature: ' "$last" || {
    echo "the last message at the sink is not DKIM-signed: $last" >&2
    exit 1
  }
}

run_postfix() {
  echo "== round $round: Postfix (+ Dovecot auth, OpenDKIM)"
  load "$PF_PORT" "$WORK/pf-$round.out" "$PF_PID" "$DC_PID" "$ODKIM_PID"
}
run_mailmesh() {
  echo "== round $round: mailmesh (mailctl dev)"
  start_mailmesh "$WORK/mm-$round"
  echo pw | "$MAILCTL" user add alice@acme.test --password-stdin >/dev/null
  "$MAILCTL" dkim generate acme.test --selector mm1 --activate >/dev/null
  profile_start
  load "$((MM_PORT + 6))" "$WORK/mm-$round.out" "$MM_PID"
  profile_stop "submission-$round" >&2
  kill "$MM_PID"
  wait "$MM_PID" 2>/dev/null || true
}
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then run_postfix; run_mailmesh; else run_mailmesh; run_postfix; fi
  python3 - "$WORK/pf-$round.out" "$WORK/mm-$round.out" "$round" <<'PY'
import sys
def figures(path):
    f = {}
    for line in open(path):
        w = line.split()
        if w[0] == "ops/s":
            f["accepted"] = float(w[3])
        elif w[0] == "delivered/s":
            f["relayed"] = float(w[1])
        elif w[0] == "process":
            f["cpu"] = f.get("cpu", 0) + float(w[9])
            f["pss"] = f.get("pss", 0) + float(w[11])
    return f
p, m = figures(sys.argv[1]), figures(sys.argv[2])
print("round %s: mailmesh/postfix accepted %.2f, relayed %.2f, CPU per message %.2f"
      " (%.2f vs %.2f ms), peak PSS %.0f vs %.0f MB"
      % (sys.argv[3], m["accepted"] / p["accepted"], m["relayed"] / p["relayed"],
         m["cpu"] / p["cpu"], m["cpu"], p["cpu"], m["pss"], p["pss"]))
PY
done
