# Shared by the mailbox-reading benchmarks (sourced by them with WORK and LOAD_BIN
# set): the same mail in Dovecot and in `mailctl dev`. 8 users (user0..7@acme.test,
# password `pw` hashed with Argon2id m=19456,t=2,p=1 on both sides) with PER_USER
# messages each, plain and multipart, 2-12 KiB, from a fixed seed. Sets up WORK, the
# cleanup, the release builds (MAILCTL, LOAD) and the DNS server; installs
# dovecot-imapd/dovecot-pop3d (Debian) and python3's argon2-cffi when missing.
# Ports: DC_PORT, DC_POP3_PORT (Dovecot), MM_PORT.. (mailctl dev), DNS_PORT.

DC_PORT=${DC_PORT:-2643}
DC_POP3_PORT=${DC_POP3_PORT:-2644}
MM_PORT=${MM_PORT:-2727}
DNS_PORT=${DNS_PORT:-2753}
rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/dovecot/dovecot.conf" ] && doveadm -c "$WORK/dovecot/dovecot.conf" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p mailctl -p mailmesh-loadtest
MAILCTL=$CARGO_TARGET_DIR/release/mailctl
LOAD=$CARGO_TARGET_DIR/release/$LOAD_BIN
# shellcheck source=loadtest/common.sh
. loadtest/common.sh
start_dns

USERS=${USERS:-8}
PER_USER=${PER_USER:-200}

command -v dovecot >/dev/null && [ -e /usr/lib/dovecot/pop3 ] && [ -e /usr/lib/dovecot/modules/auth/libdriver_sqlite.so ] ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dovecot-imapd dovecot-pop3d dovecot-sqlite >/dev/null
# The distribution's own instance is not used.
service dovecot stop >/dev/null 2>&1 || true
python3 -c "import argon2" 2>/dev/null || pip install -q argon2-cffi
# Thousands of connections on each side.
ulimit -n "$(ulimit -Hn)"

seed_messages() {
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
}

# setup_dovecot: IMAP on DC_PORT and POP3 on DC_POP3_PORT from a maildir under
# $WORK/dovecot/home, users in SQLite with the same Argon2id hash (dovecot_users). Idle IMAP sessions are
# handed to imap-hibernate after a second (Dovecot's way of holding many IDLEs).
setup_dovecot() {
  local d=$WORK/dovecot
  mkdir -p "$d/run" "$d/home"
  local users=()
  for u in $(seq 0 $((USERS - 1))); do
    users+=("user$u@acme.test")
    local md=$d/home/user$u@acme.test/Maildir
    mkdir -p "$md/cur" "$md/new" "$md/tmp"
    for f in "$WORK/seed/$u"/*.eml; do
      cp "$f" "$md/cur/$(basename "$f" .eml).seed:2,"
    done
  done
  chown -R nobody:nogroup "$d/home"
  dovecot_users "$d" "${users[@]}"
  cat >"$d/dovecot.conf" <<CF
base_dir = $d/run
state_dir = $d/run
log_path = $d/log
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
mail_max_userip_connections = 20000
default_process_limit = 1000
default_client_limit = 20000
imap_hibernate_timeout = 1s
pop3_uidl_format = %f
passdb {
  driver = sql
  args = $d/sql.conf.ext
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$d/home/%u
}
service imap-login {
  chroot =
  inet_listener imap {
    address = 127.0.0.1
    port = $DC_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  chroot =
  inet_listener pop3 {
    address = 127.0.0.1
    port = $DC_POP3_PORT
  }
  inet_listener pop3s {
    port = 0
  }
}
service imap {
  unix_listener imap-master {
    mode = 0666
  }
}
service imap-hibernate {
  unix_listener imap-hibernate {
    mode = 0666
  }
}
service anvil {
  chroot =
}
CF
  dovecot -c "$d/dovecot.conf"
  PIDS+=("$(cat "$d/run/master.pid")")
}

# seed_mailmesh: `mailctl dev` with the users and the same messages (over SMTP).
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

# pss_kb PID...: the proportional set size of the processes and all their
# descendants, in KiB (shared pages counted once across them).
pss_kb() {
  local all=() p
  for p in "$@"; do all+=("$p" $(pgrep -d ' ' -P "$p" 2>/dev/null || true)); done
  local sum=0
  for p in "${all[@]}"; do
    local k
    k=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
    sum=$((sum + ${k:-0}))
  done
  echo "$sum"
}

# mailboxes_up: seeds and starts both servers (Dovecot's master PID in DC_PID).
mailboxes_up() {
  seed_messages
  HASH=$(python3 -c "import argon2; print(argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash('pw'))")
  setup_dovecot
  DC_PID=$(cat "$WORK/dovecot/run/master.pid")
  seed_mailmesh
}

# ratio FILE_DOVECOT FILE_MAILMESH: mailmesh/Dovecot for the two figures of a
# load generator's first line (`ops/s X <op>s/s Y ...`).
ratio() {
  python3 - "$1" "$2" <<'PY'
import sys
def first(path):
    f = open(path).readline().split()
    return float(f[1]), f[2], float(f[3])
(dops, what, dlog), (mops, _, mlog) = first(sys.argv[1]), first(sys.argv[2])
print("ratio mailmesh/dovecot: ops/s %.2f, %s %.2f" % (mops / dops, what, mlog / dlog))
PY
}
