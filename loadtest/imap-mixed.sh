#!/usr/bin/env bash
# IMAP, a mixed workload, mailmesh's gateway beside Dovecot on this machine, in one
# run (compare ratios from one run only).
#
#   loadtest/imap-mixed.sh [CONNECTIONS=16] [SECONDS=20] [ROUNDS=2]
#
# Both serve the same mail (loadtest/mailboxes.sh): 8 users with 200 messages each,
# the same Argon2id password hashes. The client is
# `imap-load` (loadtest/src/imap_load.rs): each connection logs in, selects INBOX, runs
# 20 operations (30% FETCH 1:* FLAGS, 30% FETCH n BODY.PEEK[], 10% SEARCH, 20% STORE
# +/-\Seen, 10% NOOP) and logs out, for SECONDS. Dovecot reads a maildir on local disk;
# mailmesh's gateway reads through the storage service (`mailctl dev`: embedded log,
# local object store). Prints ops/s and logins/s of each and mailmesh/Dovecot.
# Needs: dovecot-imapd (Debian), python3 with argon2-cffi (installed here).
# PERF=1 also profiles each mailmesh round (loadtest/common.sh: profile_start).
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-16}
SECS=${2:-20}
ROUNDS=${3:-2}
WORK=/tmp/mailmesh-loadtest-imap
LOAD_BIN=imap-load
# shellcheck source=loadtest/mailboxes.sh
. loadtest/mailboxes.sh
export MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true
mailboxes_up
# Warm up both (Dovecot builds its index on first access).
"$LOAD" --server "127.0.0.1:$DC_PORT" --connections 8 --seconds 3 >/dev/null
"$LOAD" --server "127.0.0.1:$((MM_PORT + 2))" --connections 8 --seconds 3 >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: Dovecot"
  "$LOAD" --server "127.0.0.1:$DC_PORT" --connections "$C" --seconds "$SECS" --sample-pid "$DC_PID" | tee "$WORK/dc-$round"
  echo "== round $round: mailmesh"
  profile_start
  "$LOAD" --server "127.0.0.1:$((MM_PORT + 2))" --connections "$C" --seconds "$SECS" --sample-pid "$MM_PID" | tee "$WORK/mm-$round"
  profile_stop "imap-$round"
  ratio "$WORK/dc-$round" "$WORK/mm-$round"
done
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
