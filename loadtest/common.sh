# Shared by the loadtest scripts (sourced): `mailctl dev` on MM_PORT.. (nine ports),
# ready, with tenant acme and domain acme.test. Needs MAILCTL, WORK, PIDS; extra
# settings come as MAILMESH_* variables exported by the caller.

# need_postfix: Debian's postfix (smtpd, virtual(8), smtp-source), installed when
# missing without configuring the distribution's own instance.
need_postfix() {
  command -v smtp-source >/dev/null && return 0
  echo "installing postfix (for smtpd and smtp-source)" >&2
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null
}

# dovecot_users DIR ADDRESS...: a SQLite passdb in DIR (users.db, sql.conf.ext) giving
# every address the password `pw` as the Argon2id hash in HASH. SQL, not passwd-file:
# Dovecot checks passwords from a blocking (SQL) passdb in its auth-worker processes,
# on every core, and those from passwd-file one at a time in its single auth process
# (which held Dovecot to 0.8 of a core in the IMAP benchmark).
dovecot_users() {
  local d=$1
  shift
  python3 - "$d/users.db" "$HASH" "$@" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT NOT NULL)")
db.executemany("INSERT INTO users VALUES (?, ?)", [(u, "{ARGON2ID}" + sys.argv[2]) for u in sys.argv[3:]])
db.commit()
PY
  chmod 644 "$d/users.db"
  cat >"$d/sql.conf.ext" <<CF
driver = sqlite
connect = $d/users.db
password_query = SELECT userid AS user, password FROM users WHERE userid = '%u'
CF
}

# postfix_alternate: lets a private Postfix instance run from $WORK/pf/etc (WORK must
# be a fixed place: Postfix only starts a second instance from a directory the
# default main.cf lists in alternate_config_directories). The distribution's own
# instance is stopped and not used; its main.cf (absent with "No configuration") only
# authorises ours and lets it log to a file. postfix_restore (in the caller's
# cleanup) stops ours and puts the machine's main.cf back as it was.
postfix_alternate() {
  postfix stop >/dev/null 2>&1 || true
  if [ -f /etc/postfix/main.cf ]; then cp /etc/postfix/main.cf "$WORK/main.cf.orig"; else touch "$WORK/main.cf.none"; fi
  if ! grep -q "^alternate_config_directories = $WORK/pf/etc" /etc/postfix/main.cf 2>/dev/null; then
    cat >>/etc/postfix/main.cf <<CF
compatibility_level = 3.6
alternate_config_directories = $WORK/pf/etc
maillog_file_prefixes = /var, /dev/stdout, /tmp
maillog_file = $WORK/postfix-default.log
CF
  fi
}
postfix_restore() {
  [ -f "$WORK/pf/etc/main.cf" ] && postfix -c "$WORK/pf/etc" stop >/dev/null 2>&1 || true
  if [ -f "$WORK/main.cf.orig" ]; then
    cp "$WORK/main.cf.orig" /etc/postfix/main.cf
  elif [ -f "$WORK/main.cf.none" ]; then
    rm -f /etc/postfix/main.cf
  fi
}

# Storage settings for the loadtests' short passwords (`pw`): the default policy wants
# 12 characters and no common ones.
RELAXED_PASSWORDS="MAILMESH_STORAGE__PASSWORD_POLICY__MIN_LENGTH=1 MAILMESH_STORAGE__PASSWORD_POLICY__REFUSE_COMMON=false"

# start_mailmesh DATA_DIR: starts it; sets MM_PID, MAILCTL_ENDPOINT and MAILCTL_PKI_DIR
# (the dev platform's admin identity).
start_mailmesh() {
  MAILMESH_PORTS__SMTP=$MM_PORT MAILMESH_PORTS__STORAGE=$((MM_PORT + 1)) \
  MAILMESH_PORTS__IMAP=$((MM_PORT + 2)) MAILMESH_PORTS__IMAPS=$((MM_PORT + 3)) \
  MAILMESH_PORTS__POP3=$((MM_PORT + 4)) MAILMESH_PORTS__POP3S=$((MM_PORT + 5)) \
  MAILMESH_PORTS__SUBMISSION=$((MM_PORT + 6)) MAILMESH_PORTS__SUBMISSIONS=$((MM_PORT + 7)) \
  MAILMESH_SMTP__CONNECTIONS_PER_IP_PER_MINUTE=0 \
  MAILMESH_IMAP__CONNECTIONS_PER_IP_PER_MINUTE=0 MAILMESH_POP3__CONNECTIONS_PER_IP_PER_MINUTE=0 \
  MAILMESH_TELEMETRY__LOG_LEVEL=warn \
    env $RELAXED_PASSWORDS "$MAILCTL" dev --data-dir "$1" --admin-listen "127.0.0.1:$((MM_PORT + 8))" \
    >"$1.log" 2>&1 &
  MM_PID=$!
  PIDS+=("$MM_PID")
  export MAILCTL_ENDPOINT=https://127.0.0.1:$((MM_PORT + 1)) MAILCTL_PKI_DIR=$1/pki
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$((MM_PORT + 8))/readyz" >/dev/null && break
    sleep 0.5
  done
  "$MAILCTL" tenant add acme >/dev/null
  "$MAILCTL" domain add acme acme.test >/dev/null
}

# inbox_count ADDRESS: messages in the user's INBOX (0 when it cannot be read).
inbox_count() {
  "$MAILCTL" --json mailbox list "$1" 2>/dev/null |
    python3 -c 'import json,sys; print(next((m["messages"] for m in json.load(sys.stdin) if m["name"]=="INBOX"),0))' 2>/dev/null || echo 0
}

# start_dns: a DNS server on 127.0.0.1:$DNS_PORT that answers every question at once
# (NXDOMAIN), for auth-check: the checks run, the network is not what is measured.
start_dns() {
  [ -x /usr/sbin/dnsmasq ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null
  /usr/sbin/dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$DNS_PORT" \
    --listen-address=127.0.0.1 --bind-interfaces --local=/#/ --pid-file="$WORK/dnsmasq.pid" &
  PIDS+=($!)
  export MAILMESH_AUTH__DNS__SERVERS="[\"127.0.0.1:$DNS_PORT\"]"
}

# With PERF=1: profile_start and profile_stop NAME wrap a mailmesh round in
# `perf record` (sampling `mailctl dev` at 499 Hz with call graphs) and write the
# hottest functions, flat, to $WORK/perf-NAME.txt (the data stays in $WORK/perf.data).
profile_start() {
  [ -n "${PERF:-}" ] || return 0
  command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
  perf record -q -F 499 -g -o "$WORK/perf.data" -p "$MM_PID" >/dev/null 2>&1 &
  PERF_PID=$!
}
profile_stop() {
  [ -n "${PERF:-}" ] || return 0
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  { perf report -i "$WORK/perf.data" --no-children --sort symbol -g none --stdio 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' |
    cut -c1-160 | head -40 >"$WORK/perf-$1.txt"; } || true
  echo "hottest functions (perf): $WORK/perf-$1.txt"
}
