#!/usr/bin/env bash
# IMAP per-command cost on one big mailbox, mailmesh's gateway beside Dovecot on
# this machine, in one run (compare ratios from one run only).
#
#   loadtest/imap-bigmailbox.sh [MESSAGES=50000] [REPEAT=20]
#
# One user with MESSAGES messages in INBOX (loadtest/mailboxes.sh: the same mail in
# Dovecot's maildir and, over SMTP, in `mailctl dev`). One connection logs in once,
# then runs each command REPEAT times: SELECT INBOX, STATUS INBOX (MESSAGES UIDNEXT
# UNSEEN), FETCH 1:* (FLAGS), UID FETCH of the last 100 (FLAGS INTERNALDATE
# RFC822.SIZE, then FROM/TO/CC/SUBJECT/DATE/MESSAGE-ID header fields), UID SEARCH
# UNSEEN, NOOP. Prints per command the median and p90
# latency and the server's CPU per command (utime+stime of Dovecot's processes or of
# mailctl dev, sampled around each batch), and mailmesh/Dovecot for each.
# Needs: dovecot-imapd (Debian), python3 with argon2-cffi (installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
export USERS=1
export PER_USER=${1:-50000}
REPEAT=${2:-20}
WORK=/tmp/mailmesh-loadtest-bigmailbox
LOAD_BIN=imap-load
# shellcheck source=loadtest/mailboxes.sh
. loadtest/mailboxes.sh
export MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true
mailboxes_up
# Delivery is asynchronous: wait until the mailbox is whole.
for _ in $(seq 1 600); do
  [ "$(inbox_count user0@acme.test)" -ge "$PER_USER" ] && break
  sleep 0.5
done
echo "mailmesh INBOX: $(inbox_count user0@acme.test) messages"

measure() { # NAME PORT PID...
  python3 loadtest/imap_bigmailbox.py "$@" "$REPEAT"
}
# Dovecot builds its index on the first SELECT: done once before measuring.
python3 -c "import imaplib; c=imaplib.IMAP4('127.0.0.1', $DC_PORT); c.login('user0@acme.test','pw'); c.select('INBOX'); c.logout()"
measure dovecot "$DC_PORT" "$DC_PID" | tee "$WORK/result-dovecot"
measure mailmesh "$((MM_PORT + 2))" "$MM_PID" | tee "$WORK/result-mailmesh"
python3 - "$WORK/result-dovecot" "$WORK/result-mailmesh" <<'PY'
import sys, re
def rows(path):
    out = {}
    for line in open(path):
        m = re.match(r"\S+ (.+?)\s+median\s+([\d.]+) ms\s+p90\s+([\d.]+) ms\s+cpu\s+([\d.]+)", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(4)))
    return out
d, m = rows(sys.argv[1]), rows(sys.argv[2])
for k in d:
    (dl, dc), (ml, mc) = d[k], m[k]
    print("ratio mailmesh/dovecot %-20s latency %6.2f  cpu %6.2f" % (k, ml / dl if dl else 0, mc / dc if dc else float("inf")))
PY
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
