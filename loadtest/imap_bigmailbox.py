"""Per-command latency and server CPU on one big mailbox, one connection logged in once.

    python3 loadtest/imap_bigmailbox.py NAME PORT PID... REPEAT

Logs in as $IMAP_USER (user0@acme.test) with $IMAP_PASSWORD (pw), selects INBOX,
fetches six header fields of every message once (a client's first sync, cold), then
runs each command REPEAT times (after one warm-up): SELECT INBOX, STATUS, LIST,
FETCH 1:* (FLAGS), UID FETCH of the last 100 (sizes; then header fields, as a client's
first sync asks), UID SEARCH UNSEEN, NOOP. Prints per
command the median and p90 latency and the CPU the PIDs (and their children) used
per command. Used by imap-bigmailbox.sh and smtp-distributed.sh (IMAP=1).
"""
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
c.login(os.environ.get("IMAP_USER", "user0@acme.test"), os.environ.get("IMAP_PASSWORD", "pw"))
typ, data = c.select("INBOX")
exists = int(data[0])
typ, data = c.uid("SEARCH", None, "ALL")
uids = data[0].split()
last = b"%s:%s" % (uids[max(0, len(uids) - 100)], uids[-1])
# A client's first sync: header fields of every message, once, before anything is
# cached (the server's own caches are cold too: the mailbox was just filled).
before, t = cpu(), time.perf_counter()
typ, _ = c.uid("FETCH", b"1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO CC SUBJECT DATE MESSAGE-ID)])")
assert typ == "OK", typ
print("%s %-20s %8.0f ms  cpu %8.0f ms" % (
    name, "first headers 1:*", 1000 * (time.perf_counter() - t), 1000 * (cpu() - before)))
commands = [
    ("SELECT", lambda: c.select("INBOX")),
    ("STATUS", lambda: c.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")),
    ("LIST", lambda: c.list('""', "*")),
    ("FETCH 1:* FLAGS", lambda: c.fetch("1:*", "(FLAGS)")),
    ("UID FETCH last 100", lambda: c.uid("FETCH", last, "(FLAGS INTERNALDATE RFC822.SIZE)")),
    # What a client's first sync asks of every message (Thunderbird-like header list).
    ("UID FETCH 100 headers", lambda: c.uid("FETCH", last,
        "(UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO CC SUBJECT DATE MESSAGE-ID)])")),
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
