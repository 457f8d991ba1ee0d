#!/usr/bin/env bash
# Mass IDLE: K IMAP connections idling at once on one mailmesh gateway and on
# Dovecot (with imap-hibernate, its way of holding many), on this machine.
#
#   loadtest/imap-idle.sh [CONNECTIONS=10000] [HOLD_SECONDS=30]
#
# `imap-load --idle K` logs K connections in (64 at a time), selects INBOX and enters
# IDLE on each (users user0..7: K/8 connections per user), holds them HOLD seconds and
# logs them out. During the hold the script measures the server's memory (PSS of all
# its processes: the whole `mailctl dev` — storage, queue, SMTP and the gateway — and
# every Dovecot process) before and while holding, and delivers one message to user0;
# every connection of user0 must be told (`* N EXISTS`) before the hold ends.
# SKIP_DOVECOT=1 measures mailmesh alone.
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-10000}
HOLD=${2:-30}
WORK=/tmp/mailmesh-loadtest-idle
# Few messages: what is measured is the connections.
PER_USER=20
LOAD_BIN=imap-load
# shellcheck source=loadtest/mailboxes.sh
. loadtest/mailboxes.sh
export MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true
export MAILMESH_IMAP__MAX_CONNECTIONS=$((K + 100))
# Dovecot watches each idling mailbox with inotify (Debian's limit: 128 instances per
# user); below K, most of its sessions would only poll every 30 s.
if [ "$(cat /proc/sys/fs/inotify/max_user_instances)" -lt "$((K + 100))" ]; then
  echo "$((K + 100))" >/proc/sys/fs/inotify/max_user_instances
fi
mailboxes_up
EXPECTED=$(( (K + USERS - 1) / USERS ))

# run NAME PORT PID DELIVER_COMMAND...
run() {
  local name=$1 port=$2 pid=$3
  shift 3
  # A few sessions first, so what every login costs once (Argon2's working memory
  # on the password threads, the first listing) is not counted per connection.
  "$LOAD" --server "127.0.0.1:$port" --idle 16 --hold 0 >/dev/null
  local before
  before=$(pss_kb "$pid")
  "$LOAD" --server "127.0.0.1:$port" --idle "$K" --hold "$HOLD" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  local load=$!
  until grep -q '^idling' "$WORK/$name.out" 2>/dev/null; do
    kill -0 "$load" 2>/dev/null || { cat "$WORK/$name.err"; return 1; }
    sleep 1
  done
  sleep 2
  local holding
  holding=$(pss_kb "$pid")
  "$@"
  wait "$load"
  local after
  after=$(pss_kb "$pid")
  echo "== $name"
  cat "$WORK/$name.out"
  head -3 "$WORK/$name.err"
  echo "$name memory MB: before $((before / 1024)) holding $((holding / 1024)) after $((after / 1024)); per idle connection $(( (holding - before) / K )) KiB; user0 connections told of the new message: $(awk '/^pushed/ {print $2}' "$WORK/$name.out") of $EXPECTED"
}

deliver_dovecot() {
  local md=$WORK/dovecot/home/user0@acme.test/Maildir
  cp "$WORK/seed/0/00000.eml" "$md/tmp/pushed.eml"
  chown nobody:nogroup "$md/tmp/pushed.eml"
  mv "$md/tmp/pushed.eml" "$md/new/pushed.eml"
}
deliver_mailmesh() {
  python3 - "$MM_PORT" "$WORK/seed/0/00000.eml" <<'PY'
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=60)
s.sendmail("bob@example.org", ["user0@acme.test"], open(sys.argv[2], "rb").read())
s.quit()
PY
}

[ -n "${SKIP_DOVECOT:-}" ] || run dovecot "$DC_PORT" "$DC_PID" deliver_dovecot
run mailmesh "$((MM_PORT + 2))" "$MM_PID" deliver_mailmesh
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
