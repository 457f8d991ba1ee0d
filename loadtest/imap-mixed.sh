#!/usr/bin/env bash
# IMAP, a mixed workload, mailmesh's gateway beside Dovecot on this machine, in one
# run (compare ratios from one run only).
#
#   loadtest/imap-mixed.sh [CONNECTIONS=16] [SECONDS=20] [ROUNDS=2]
#
# Both serve the same mail: 8 users (user0..7@acme.test, password hashed with Argon2id
# m=19456,t=2,p=1 on both sides) with 200 messages each. The client is
# `imap-load` (loadtest/src/imap_load.rs): each connection logs in, selects INBOX, runs
# 20 operations (30% FETCH 1:* FLAGS, 30% FETCH n BODY.PEEK[], 10% SEARCH, 20% STORE
# +/-\Seen, 10% NOOP) and logs out, for SECONDS. Dovecot reads a maildir on local disk;
# mailmesh's gateway reads through the storage service (`mailctl dev`: embedded log,
# local object store). Prints ops/s and logins/s of each and mailmesh/Dovecot.
# Needs: dovecot-imapd (Debian), python3 with argon2-cffi (installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-16}
SECS=${2:-20}
ROUNDS=${3:-2}
WORK=/tmp/mailmesh-loadtest-imap
DC_PORT=${DC_PORT:-2643}
MM_PORT=${MM_PORT:-2727}
USERS=8
PER_USER=200
rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/dovecot/dovecot.conf" ] && doveadm -c "$WORK/dovecot/dovecot.conf" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

command -v dovecot >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dovecot-imapd >/dev/null
# The distribution's own instance is not used.
service dovecot stop >/dev/null 2>&1 || true
python3 -c "import argon2" 2>/dev/null || pip install -q argon2-cffi
cargo build --release -q -p mailctl -p mailmesh-loadtest
MAILCTL=$PWD/target/release/mailctl
LOAD=$PWD/target/release/imap-load
# shellcheck source=loadtest/common.sh
. loadtest/common.sh
DNS_PORT=${DNS_PORT:-2753}
start_dns
export MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH=true MAILMESH_IMAP__MAX_AUTH_FAILURES=1000000

# The messages: plain and multipart, 2-12 KiB, from a fixed seed.
python3 - "$WORK/seed" "$USERS" "$PER_USER" <<'PY'
import os, random, sys
out, users, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(7)
for u in range(users):
    d = os.path.join(out, str(u)); os.makedirs(d)
    for i in range(per):
        body = "\r\n".join("line %d of message %d %s" % (k, i, "x" * random.randint(10, 70))
                           for k in range(random.randint(30, 150)))
        if i % 3 == 0:
            msg = ("From: Bob <bob@example.org>\r\nTo: user%d@acme.test\r\nSubject: report %d\r\n"
                   "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <%d.%d@example.org>\r\n"
                   "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                   "--b\r\nContent-Type: text/plain\r\n\r\n%s\r\n--b\r\n"
                   "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                   "AAECAwQFBgcICQ==\r\n--b--\r\n") % (u, i, u, i, body)
        else:
            msg = ("From: Bob <bob@example.org>\r\nTo: user%d@acme.test\r\nSubject: note %d\r\n"
                   "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <%d.%d@example.org>\r\n\r\n%s\r\n") % (u, i, u, i, body)
        open(os.path.join(d, "%05d.eml" % i), "wb").write(msg.encode())
PY
HASH=$(python3 -c "import argon2; print(argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash('pw'))")

# Dovecot: maildir under $WORK/dovecot/home, passwd-file with the same Argon2id hash.
setup_dovecot() {
  local d=$WORK/dovecot
  mkdir -p "$d/run" "$d/home"
  : >"$d/users"
  for u in $(seq 0 $((USERS - 1))); do
    echo "user$u@acme.test:{ARGON2ID}$HASH" >>"$d/users"
    local md=$d/home/user$u@acme.test/Maildir
    mkdir -p "$md/cur" "$md/new" "$md/tmp"
    for f in "$WORK/seed/$u"/*.eml; do
      cp "$f" "$md/cur/$(basename "$f" .eml).seed:2,"
    done
  done
  chown -R nobody:nogroup "$d/home"
  cat >"$d/dovecot.conf" <<CF
base_dir = $d/run
state_dir = $d/run
log_path = $d/log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
mail_max_userip_connections = 10000
default_process_limit = 1000
default_client_limit = 10000
passdb {
  driver = passwd-file
  args = $d/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$d/home/%u
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $DC_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
service anvil {
  chroot =
}
service imap-login {
  chroot =
}
CF
  dovecot -c "$d/dovecot.conf"
}

seed_mailmesh() {
  start_mailmesh "$WORK/mm"
  for u in $(seq 0 $((USERS - 1))); do
    echo pw | "$MAILCTL" user add "user$u@acme.test" --password-stdin >/dev/null
  done
  python3 - "$WORK/seed" "$USERS" "$((MM_PORT))" <<'PY'
import os, smtplib, sys
seed, users, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
for u in range(users):
    d = os.path.join(seed, str(u))
    for f in sorted(os.listdir(d)):
        s.sendmail("bob@example.org", ["user%d@acme.test" % u], open(os.path.join(d, f), "rb").read())
s.quit()
PY
  # Wait until every message is delivered.
  for _ in $(seq 1 300); do
    [ "$(inbox_count "user$((USERS - 1))@acme.test")" -ge "$PER_USER" ] && break
    sleep 0.2
  done
}

setup_dovecot
seed_mailmesh
# Warm up both (Dovecot builds its index on first access).
"$LOAD" --server "127.0.0.1:$DC_PORT" --connections 8 --seconds 3 >/dev/null
"$LOAD" --server "127.0.0.1:$((MM_PORT + 2))" --connections 8 --seconds 3 >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: Dovecot"
  "$LOAD" --server "127.0.0.1:$DC_PORT" --connections "$C" --seconds "$SECS" | tee "$WORK/dc-$round"
  echo "== round $round: mailmesh"
  "$LOAD" --server "127.0.0.1:$((MM_PORT + 2))" --connections "$C" --seconds "$SECS" | tee "$WORK/mm-$round"
  python3 - "$WORK/dc-$round" "$WORK/mm-$round" <<'PY'
import sys
def first(path):
    f = open(path).readline().split()
    return float(f[1]), float(f[3])
(dops, dlog), (mops, mlog) = first(sys.argv[1]), first(sys.argv[2])
print("ratio mailmesh/dovecot: ops/s %.2f, logins/s %.2f" % (mops / dops, mlog / dlog))
PY
done
echo "mailmesh peak RSS (all of mailctl dev): $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$MM_PID/status") MB"
