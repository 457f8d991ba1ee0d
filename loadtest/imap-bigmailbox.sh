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
# RFC822.SIZE), UID SEARCH UNSEEN, NOOP. Prints per command the median and p90
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
  python3 - "$@" "$REPEAT" <<'PY'
import imaplib, os, sys, time
name, port, pids, repeat = sys.argv[1], int(sys.argv[2]), sys.argv[3:-1], int(sys.argv[-1])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    # The processes and their children (Dovecot forks one per session).
    total, seen = 0, set(pids)
    todo = list(pids)
    while todo:
        p = todo.pop()
        try:
            f = open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
            for t in os.listdir("/proc/%s/task" % p):
                for c in open("/proc/%s/task/%s/children" % (p, t)).read().split():
                    if c not in seen:
                        seen.add(c); todo.append(c)
        except OSError:
            pass
    return total / tick
c = imaplib.IMAP4("127.0.0.1", port)
c.login("user0@acme.test", "pw")
typ, data = c.select("INBOX")
exists = int(data[0])
typ, data = c.uid("SEARCH", None, "ALL")
uids = data[0].split()
last = b"%s:%s" % (uids[max(0, len(uids) - 100)], uids[-1])
commands = [
    ("SELECT", lambda: c.select("INBOX")),
    ("STATUS", lambda: c.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")),
    ("FETCH 1:* FLAGS", lambda: c.fetch("1:*", "(FLAGS)")),
    ("UID FETCH last 100", lambda: c.uid("FETCH", last, "(FLAGS INTERNALDATE RFC822.SIZE)")),
    ("UID SEARCH UNSEEN", lambda: c.uid("SEARCH", None, "UNSEEN")),
    ("NOOP", lambda: c.noop()),
]
for label, run in commands:
    run()  # warm
    times = []
    before = cpu()
    for _ in range(repeat):
        t = time.perf_counter()
        typ, _ = run()
        times.append(time.perf_counter() - t)
        assert typ == "OK", (label, typ)
    used = cpu() - before
    times.sort()
    print("%s %-20s median %8.2f ms  p90 %8.2f ms  cpu %8.2f ms/cmd" % (
        name, label, 1000 * times[len(times) // 2], 1000 * times[int(len(times) * 0.9)],
        1000 * used / repeat))
print("%s messages %d" % (name, exists))
c.logout()
PY
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
