#!/usr/bin/env bash
# POP3, mailmesh's gateway beside Dovecot on this machine, in one run (compare ratios
# from one run only).
#
#   loadtest/pop3-mixed.sh [CONNECTIONS=8] [SECONDS=20] [ROUNDS=2]
#
# Both serve the same mail (loadtest/mailboxes.sh): 8 users with 200 messages each,
# the same Argon2id password hashes. The client is `pop3-load`
# (loadtest/src/pop3_load.rs): connection i works on user i mod 8 (one session per
# maildrop, as POP3 locks it); it logs in, runs STAT and UIDL, 20 operations (50% RETR,
# 20% LIST, 10% TOP n 10, 20% DELE), RSET and QUIT, for SECONDS. Prints ops/s and
# logins/s of each and mailmesh/Dovecot. PERF=1 also profiles each mailmesh round.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-8}
SECS=${2:-20}
ROUNDS=${3:-2}
WORK=/tmp/mailmesh-loadtest-pop3
LOAD_BIN=pop3-load
# shellcheck source=loadtest/mailboxes.sh
. loadtest/mailboxes.sh
export MAILMESH_POP3__ALLOW_PLAINTEXT_AUTH=true
mailboxes_up
MM_POP3=$((MM_PORT + 4))
# Warm up both (Dovecot builds its index on first access).
"$LOAD" --server "127.0.0.1:$DC_POP3_PORT" --connections 8 --seconds 3 >/dev/null
"$LOAD" --server "127.0.0.1:$MM_POP3" --connections 8 --seconds 3 >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: Dovecot"
  "$LOAD" --server "127.0.0.1:$DC_POP3_PORT" --connections "$C" --seconds "$SECS" --sample-pid "$DC_PID" | tee "$WORK/dc-$round"
  echo "== round $round: mailmesh"
  profile_start
  "$LOAD" --server "127.0.0.1:$MM_POP3" --connections "$C" --seconds "$SECS" --sample-pid "$MM_PID" | tee "$WORK/mm-$round"
  profile_stop "pop3-$round"
  ratio "$WORK/dc-$round" "$WORK/mm-$round"
done
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
