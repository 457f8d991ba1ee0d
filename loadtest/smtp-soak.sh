#!/usr/bin/env bash
# SMTP memory on `mailctl dev`: what an open session costs, and whether memory grows
# over a soak.
#
#   loadtest/smtp-soak.sh [MINUTES=10] [SESSIONS=20] [OPEN_SESSIONS=1000]
#
# 1. OPEN_SESSIONS connections each greet (EHLO), start a transaction (MAIL FROM,
#    RCPT TO) and stay open; the script measures the process's memory (PSS) before and
#    while they are held: the cost of one session mid-transaction.
# 2. For MINUTES, Postfix's `smtp-source` sends batches of 5,000 10 KiB messages over
#    SESSIONS connections to one mailbox; after each batch a client reads the mailbox
#    empty over IMAP (STORE \Deleted, EXPUNGE), as users do, so what is stored stays
#    level. Memory is sampled after every batch. At the end every message must have been
#    delivered (INBOX's UIDNEXT counts each one) and the samples of the first and the
#    last minute are compared.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-10}
S=${2:-20}
K=${3:-1000}
WORK=/tmp/mailmesh-loadtest-soak
MM_PORT=${MM_PORT:-2827}
DNS_PORT=${DNS_PORT:-2853}
BATCH=5000
rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# shellcheck source=loadtest/common.sh
. loadtest/common.sh
need_postfix
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p mailctl
MAILCTL=$PWD/target/release/mailctl
start_dns
export MAILMESH_SMTP__MAX_CONNECTIONS=$((K + S + 100))
export MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true
start_mailmesh "$WORK/mm"
echo pw | "$MAILCTL" user add alice@acme.test --password-stdin >/dev/null
IMAP_PORT=$((MM_PORT + 2))

pss_mb() {
  awk '/^Pss:/ {printf "%.1f", $2 / 1024}' "/proc/$MM_PID/smaps_rollup"
}

# A first batch, so what the first messages cost once is not counted below.
smtp-source -s "$S" -m 1000 -l 10240 -M client.example.org -f bench@example.org \
  -t alice@acme.test "127.0.0.1:$MM_PORT"

echo "== $K open sessions, each mid-transaction"
before=$(pss_mb)
python3 - "$MM_PORT" "$K" "$WORK/held" <<'PY' &
import socket, sys, time
port, k, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(k):
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    def reply():
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("connection %d closed" % i)
            if line[3:4] != b"-":
                return line
    reply()
    for cmd in (b"EHLO client%d.example.org" % i, b"MAIL FROM:<bench@example.org>",
                b"RCPT TO:<alice@acme.test>"):
        s.sendall(cmd + b"\r\n")
        line = reply()
        if not line.startswith(b"250"):
            raise SystemExit("%r: %r" % (cmd, line))
    socks.append((s, f))
open(marker, "w").write("held\n")
time.sleep(3600)
PY
holder=$!
PIDS+=("$holder")
until [ -f "$WORK/held" ]; do
  kill -0 "$holder" 2>/dev/null || { echo "the session holder failed" >&2; exit 1; }
  sleep 0.5
done
sleep 2
holding=$(pss_mb)
kill "$holder" 2>/dev/null || true
python3 -c "print('memory MB: before %s, holding %s: %.1f KiB per open session' % ('$before', '$holding', ($holding - $before) * 1024 / $K))"

expunge() {
  python3 - "$IMAP_PORT" <<'PY'
import imaplib, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login("alice@acme.test", "pw")
m.select("INBOX")
m.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
m.expunge()
m.logout()
PY
}
delivered() {
  python3 - "$IMAP_PORT" <<'PY'
import imaplib, re, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login("alice@acme.test", "pw")
typ, data = m.status("INBOX", "(UIDNEXT)")
m.logout()
print(int(re.search(rb"UIDNEXT (\d+)", data[0]).group(1)) - 1)
PY
}

echo "== soak: $MINUTES minutes of $BATCH-message batches over $S sessions"
sent=1000
start=$(date +%s)
echo "seconds sent pss_mb" >"$WORK/samples"
echo "0 $sent $(pss_mb)" >>"$WORK/samples"
while [ $(($(date +%s) - start)) -lt $((MINUTES * 60)) ]; do
  smtp-source -s "$S" -m "$BATCH" -l 10240 -M client.example.org -f bench@example.org \
    -t alice@acme.test "127.0.0.1:$MM_PORT"
  sent=$((sent + BATCH))
  expunge
  echo "$(($(date +%s) - start)) $sent $(pss_mb)" | tee -a "$WORK/samples"
done
for _ in $(seq 1 600); do
  [ "$(delivered)" -ge "$sent" ] && break
  sleep 0.5
done
got=$(delivered)
echo "sent $sent, delivered $got ($((sent - got)) missing)"
python3 - "$WORK/samples" "$MINUTES" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
rows = [(int(t), int(n), float(m)) for t, n, m in rows]
end = rows[-1][0]
first = [m for t, _, m in rows if t <= 60]
last = [m for t, _, m in rows if t >= end - 60]
print("PSS MB: first minute max %.1f, last minute max %.1f, overall max %.1f; %d messages in %d s (%.0f/s)"
      % (max(first), max(last), max(m for _, _, m in rows), rows[-1][1], end, rows[-1][1] / max(end, 1)))
PY
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
