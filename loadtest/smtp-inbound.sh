#!/usr/bin/env bash
# SMTP inbound, accepted and delivered, mailmesh beside Postfix on this machine, in
# one run (these machines are noisy: never compare figures from different runs).
#
#   loadtest/smtp-inbound.sh [MESSAGES] [SESSIONS] [SIZE] [ROUNDS]
#   (defaults 10000 20 10240 2: the reference workload of issue 8)
#
# The client for both is Postfix's own smtp-source, an independent load tool. Each
# round runs it against Postfix (smtpd -> virtual(8) maildir delivery, queue fsynced)
# and against `mailctl dev` (embedded queue fsynced before 250, auth-check doing SPF,
# DKIM, DMARC and iprev against a local DNS server that answers at once, delivery into
# maildir on the local object store, fsynced like virtual(8)'s maildir files), and
# measures until the last message is
# *delivered*, not only accepted. Prints msgs/s for each and the ratio mailmesh/Postfix.
# Needs: postfix (Debian), dnsmasq-base, a release build of mailctl (built here).
# PERF=1 also profiles each mailmesh round (loadtest/common.sh: profile_start).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
S=${2:-20}
L=${3:-10240}
ROUNDS=${4:-2}
# A fixed place: Postfix only runs a second instance from a configuration directory
# the default main.cf lists in alternate_config_directories.
WORK=/tmp/mailmesh-loadtest
rm -rf "$WORK" && mkdir -p "$WORK"
PF_PORT=${PF_PORT:-2626}
MM_PORT=${MM_PORT:-2627}
DNS_PORT=${DNS_PORT:-2653}
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  postfix_restore
}
trap cleanup EXIT

# shellcheck source=loadtest/common.sh
. loadtest/common.sh
need_postfix
postfix_alternate

cargo build --release -q -p mailctl
MAILCTL=$PWD/target/release/mailctl

start_dns

# Postfix: a private instance on 127.0.0.1:$PF_PORT delivering acme.test to one maildir.
setup_postfix() {
  local etc=$WORK/pf/etc
  mkdir -p "$etc" "$WORK/pf/spool" "$WORK/pf/data" "$WORK/pf/mail"
  chown nobody:nogroup "$WORK/pf/mail"
  chown postfix:postfix "$WORK/pf/data"
  cp /etc/postfix/master.cf "$etc/master.cf"
  sed -i 's/^smtp      inet/#smtp      inet/' "$etc/master.cf"
  echo "127.0.0.1:$PF_PORT inet n - n - - smtpd" >>"$etc/master.cf"
  cat >"$etc/main.cf" <<CF
compatibility_level = 3.6
config_directory = $etc
queue_directory = $WORK/pf/spool
data_directory = $WORK/pf/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = acme.test
virtual_mailbox_base = $WORK/pf/mail
virtual_mailbox_maps = static:alice/
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(getent group nogroup | cut -d: -f3)
virtual_minimum_uid = 100
virtual_mailbox_limit = 0
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
}

delivered_postfix() {
  { find "$WORK/pf/mail/alice/new" "$WORK/pf/mail/alice/cur" -type f 2>/dev/null || true; } | wc -l
}

delivered_mailmesh() {
  inbox_count alice@acme.test
}

# Runs smtp-source against PORT and waits until COUNT_FN reports N more delivered;
# prints "accept_seconds deliver_seconds".
measure() {
  local port=$1 count_fn=$2 before after t0 t1 t2
  before=$($count_fn)
  t0=$(date +%s.%N)
  smtp-source -s "$S" -m "$N" -l "$L" -M client.example.org -f bench@example.org \
    -t alice@acme.test "127.0.0.1:$port"
  t1=$(date +%s.%N)
  while :; do
    after=$($count_fn)
    [ "$((after - before))" -ge "$N" ] && break
    if python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $t1 > 300 else 1)"; then
      echo "only $((after - before)) of $N delivered after 300 s" >&2
      exit 1
    fi
    sleep 0.2
  done
  t2=$(date +%s.%N)
  python3 -c "print('%.3f %.3f' % ($t1 - $t0, $t2 - $t0))"
}

setup_postfix
printf '%-6s %-9s %12s %12s %12s %12s %8s\n' round server accept_s deliver_s accept/s delivered/s rss_MB
run_postfix() {
  read -r pa pd < <(measure "$PF_PORT" delivered_postfix)
  printf '%-6s %-9s %12s %12s %12.0f %12.0f %8s\n' "$round" postfix "$pa" "$pd" \
    "$(python3 -c "print($N/$pa)")" "$(python3 -c "print($N/$pd)")" "-"
}
run_mailmesh() {
  start_mailmesh "$WORK/mm-$round"
  echo pw | "$MAILCTL" user add alice@acme.test --password-stdin >/dev/null
  profile_start
  read -r ma md < <(measure "$MM_PORT" delivered_mailmesh)
  profile_stop "smtp-$round" >&2
  rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status")
  printf '%-6s %-9s %12s %12s %12.0f %12.0f %8s\n' "$round" mailmesh "$ma" "$md" \
    "$(python3 -c "print($N/$ma)")" "$(python3 -c "print($N/$md)")" "$rss"
  kill "$MM_PID"; wait "$MM_PID" 2>/dev/null || true
}
for round in $(seq 1 "$ROUNDS"); do
  # Alternate who goes first: neither always gets the cooler machine.
  if [ $((round % 2)) -eq 1 ]; then run_postfix; run_mailmesh; else run_mailmesh; run_postfix; fi
  python3 -c "print('round $round: mailmesh/postfix accepted %.2f, delivered %.2f' % ($pa/$ma, $pd/$md))"
done

