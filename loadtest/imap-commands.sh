#!/usr/bin/env bash
# IMAP commands without logins, mailmesh's gateway beside Dovecot on this machine, in
# one run (compare ratios from one run only): what each command costs.
#
#   loadtest/imap-commands.sh [CONNECTIONS=10] [SECONDS=20] [ROUNDS=2]
#
# Both serve the same mail (loadtest/mailboxes.sh): one user per connection with
# PER_USER (200) messages. `imap-load --commands` (loadtest/src/imap_load.rs): each
# connection logs in once as its own user, selects INBOX and runs, for SECONDS, per 20
# commands: 2 SELECT, 4 FETCH 1:* (UID FLAGS), 4 FETCH n (BODY.PEEK[] RFC822.SIZE),
# 2 SEARCH, 3 STORE +/-\Seen, 2 APPEND of 3 KiB, 2 EXPUNGE of one message (STORE
# \Deleted + EXPUNGE), 1 NOOP. Dovecot reads and writes a maildir on local disk;
# mailmesh is `mailctl dev` (gateway -> storage over gRPC, embedded log, local
# object store). Prints commands/s, CPU ms per command (each server's whole process
# tree, sampled by imap-load) and mailmesh/Dovecot for both.
# Needs: dovecot-imapd (Debian), python3 with argon2-cffi (installed when missing).
# PERF=1 also profiles each mailmesh round (loadtest/common.sh: profile_start).
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-10}
SECS=${2:-20}
ROUNDS=${3:-2}
WORK=/tmp/mailmesh-loadtest-imap-commands
LOAD_BIN=imap-load
export USERS=$C
# shellcheck source=loadtest/mailboxes.sh
. loadtest/mailboxes.sh
export MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true
mailboxes_up
# Warm up both (Dovecot builds its index on first access).
"$LOAD" --server "127.0.0.1:$DC_PORT" --users "$C" --connections "$C" --seconds 3 >/dev/null
"$LOAD" --server "127.0.0.1:$((MM_PORT + 2))" --users "$C" --connections "$C" --seconds 3 >/dev/null
compare() {
  python3 - "$1" "$2" <<'PY'
import sys
def read(path):
    ops = cpu = None
    for line in open(path):
        f = line.split()
        if f[0] == "ops/s":
            ops = float(f[1])
        if f[0] == "process":
            cpu = float(f[f.index("cpu_ms_per_op") + 1])
    return ops, cpu
(dops, dcpu), (mops, mcpu) = read(sys.argv[1]), read(sys.argv[2])
print("ratio mailmesh/dovecot: commands/s %.2f (%.0f / %.0f), cpu per command %.2f (%.3f / %.3f ms)"
      % (mops / dops, mops, dops, mcpu / dcpu, mcpu, dcpu))
PY
}
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: Dovecot"
  "$LOAD" --commands --server "127.0.0.1:$DC_PORT" --users "$C" --connections "$C" --seconds "$SECS" --sample-pid "$DC_PID" | tee "$WORK/dc-$round"
  echo "== round $round: mailmesh"
  profile_start
  "$LOAD" --commands --server "127.0.0.1:$((MM_PORT + 2))" --users "$C" --connections "$C" --seconds "$SECS" --sample-pid "$MM_PID" | tee "$WORK/mm-$round"
  profile_stop "imap-commands-$round"
  compare "$WORK/dc-$round" "$WORK/mm-$round"
done
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
