#!/usr/bin/env bash
# The new-user trial (issue 19) replayed end to end against `mailctl dev`, with
# clients written by others: swaks, Python's smtplib/imaplib/poplib, curl and mutt
# (batch mode). Each step prints `ok <step>`; the first mismatch stops the run with
# `FAIL <step>`, what was expected, the client's transcript and the end of dev's log.
#
#   scripts/trial.sh                         # the debug build of mailctl
#   MAILCTL=target/release/mailctl scripts/trial.sh
#
# MAILCTL defaults to ${CARGO_TARGET_DIR:-~/.cache/mailmesh-ci-target}/debug/mailctl;
# this script never builds it. Dev runs in a fresh temporary directory (its data in
# ./mailmesh-data there, as the README's command has it) on free loopback ports below
# the ephemeral range, claimed in $TMPDIR/mailmesh-test-ports as the Rust tests claim
# theirs, so runs (and tests) side by side do not collide. auth-check asks a dnsmasq
# this script starts (as the tests do). Missing Debian tools (swaks, dnsmasq, mutt,
# curl, python3-dkim) are installed with apt-get first. MAILMESH_* and MAILCTL_*
# variables of the caller are ignored: the trial uses dev's defaults (the default
# password policy included). TRIAL_KEEP=1 keeps the scratch directory (dev.log,
# mailmesh-data).
#
# Regressions checked (each was a defect of the trial, since fixed):
#   - RCPT TO:<Postmaster> accepted on a fresh dev, RCPT TO:<> refused (501)
#   - the password policy refuses short and common passwords, saying why
#   - `mailctl --json ...` output ends with a newline
#   - STARTTLS with a parameter: 501
#   - Received: shows the client as [127.0.0.1]
#   - the recipient tenant's max_message_bytes on the MX: SIZE= over it is 552 5.3.4
#     at RCPT, a too-large DATA is 552 (never 250)
#   - `mailctl dkim generate`, then the very next submitted message is signed with the
#     new selector, h= naming From twice (over-signing)
#   - a full mailbox: 452 4.2.2 at RCPT; `mailctl user quota U` without a size says
#     the quota was removed
#   - a restart of dev loses nothing (mail accepted just before the stop is read after)
#   - POP3 past the login-failure limit answers [SYS/TEMP], not [AUTH]
set -euo pipefail

T0=$SECONDS
MAILCTL=${MAILCTL:-${CARGO_TARGET_DIR:-$HOME/.cache/mailmesh-ci-target}/debug/mailctl}
PY=${PYTHON:-python3}

# The caller's mailmesh settings are not the trial's.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(MAILMESH|MAILCTL)_' || true)

log() { printf '[trial] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------
# Tools

need_tools() {
  local missing=()
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v "$PY" >/dev/null 2>&1 || missing+=(python3)
  command -v script >/dev/null 2>&1 || missing+=(bsdutils)
  [ -x /usr/sbin/dnsmasq ] || [ -x /usr/bin/dnsmasq ] || missing+=(dnsmasq-base)
  command -v swaks >/dev/null 2>&1 || missing+=(swaks)
  # swaks --tls needs Net::SSLeay (only a Recommends of the package).
  perl -MNet::SSLeay -MIO::Socket::SSL -e 1 >/dev/null 2>&1 ||
    missing+=(libnet-ssleay-perl libio-socket-ssl-perl)
  command -v mutt >/dev/null 2>&1 || missing+=(mutt)
  # dkimpy verifies the DKIM signature independently.
  /usr/bin/python3 -c 'import dkim' >/dev/null 2>&1 || missing+=(python3 python3-dkim)
  if [ ${#missing[@]} -eq 0 ]; then return; fi
  log "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need_tools
if [ ! -x "$MAILCTL" ]; then
  log "no mailctl at $MAILCTL: build it (cargo build -p mailctl) or set MAILCTL"
  exit 1
fi

# ---------------------------------------------------------------------------------
# Scratch space, ports, clean-up

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailmesh-trial.XXXXXX")
DATA=$WORK/mailmesh-data
DEV_LOG=$WORK/dev.log
DEV_PID=
DNS_PID=
CLAIMS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_dev 2>/dev/null || true
  if [ -n "$DNS_PID" ]; then kill "$DNS_PID" 2>/dev/null || true; wait "$DNS_PID" 2>/dev/null || true; fi
  for claim in "${CLAIMS[@]}"; do rm -f "$claim"; done
  if [ "${TRIAL_KEEP:-}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Claims N free loopback ports (TCP and UDP) as mailmesh_testkit::free_port does:
# from 20000-31999 (below the ephemeral range), one claim file each in
# $TMPDIR/mailmesh-test-ports, stale after 10 minutes.
free_ports() {
  "$PY" - "$1" <<'PY'
import os, random, socket, sys, tempfile, time
claims = os.path.join(tempfile.gettempdir(), 'mailmesh-test-ports')
os.makedirs(claims, exist_ok=True)
want, got, seed = int(sys.argv[1]), [], random.randrange(12000)
for step in range(12000):
    port = 20000 + (seed + step * 7919) % 12000
    claim = os.path.join(claims, str(port))
    try:
        if time.time() - os.path.getmtime(claim) > 600:
            os.unlink(claim)
    except OSError:
        pass
    try:
        os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        continue
    free = True
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(('127.0.0.1', port))
        except OSError:
            free = False
        finally:
            s.close()
    if free:
        got.append(port)
        print(port, claim)
    if len(got) == want:
        break
else:
    sys.exit('no free loopback ports in 20000-31999')
PY
}

names=(STORAGE SMTP SUBMISSION SUBMISSIONS IMAP IMAPS POP3 POP3S ADMIN DNS)
mapfile -t claimed < <(free_ports "${#names[@]}")
[ "${#claimed[@]}" -eq "${#names[@]}" ] || { log "could not claim ${#names[@]} ports"; exit 1; }
for i in "${!names[@]}"; do
  read -r port claim <<<"${claimed[$i]}"
  CLAIMS+=("$claim")
  export "P_${names[$i]}=$port"
done
export TLS_CRT=$DATA/tls/tls.crt MAILCTL WORK DATA

# ---------------------------------------------------------------------------------
# Reporting

ok() { printf 'ok %s\n' "$*"; }

# fail STEP WHAT [TRANSCRIPT]: the first mismatch ends the run.
fail() {
  local step=$1 what=$2 transcript=${3:-}
  printf 'FAIL %s\n  expected: %s\n' "$step" "$what" >&2
  if [ -n "$transcript" ]; then
    printf -- '--- transcript ---\n%s\n' "$transcript" >&2
  fi
  if [ -f "$DEV_LOG" ]; then
    printf -- '--- last lines of %s ---\n' "$DEV_LOG" >&2
    tail -n 25 "$DEV_LOG" >&2
  fi
  exit 1
}

# ---------------------------------------------------------------------------------
# The platform

dnsmasq_bin=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
# SPF for the senders the MX sees; every other name is NXDOMAIN (nothing leaves the
# machine).
cat >"$WORK/dnsmasq.conf" <<EOF
port=$P_DNS
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
local=/#/
pid-file=$WORK/dnsmasq.pid
txt-record=example.org,"v=spf1 ip4:127.0.0.1 -all"
EOF
"$dnsmasq_bin" --keep-in-foreground --conf-file="$WORK/dnsmasq.conf" >"$WORK/dnsmasq.log" 2>&1 &
DNS_PID=$!

export MAILCTL_ENDPOINT=https://127.0.0.1:$P_STORAGE

start_dev() {
  (
    cd "$WORK"
    export MAILMESH_PORTS__STORAGE=$P_STORAGE MAILMESH_PORTS__SMTP=$P_SMTP \
      MAILMESH_PORTS__SUBMISSION=$P_SUBMISSION MAILMESH_PORTS__SUBMISSIONS=$P_SUBMISSIONS \
      MAILMESH_PORTS__IMAP=$P_IMAP MAILMESH_PORTS__IMAPS=$P_IMAPS \
      MAILMESH_PORTS__POP3=$P_POP3 MAILMESH_PORTS__POP3S=$P_POP3S \
      MAILMESH_AUTH__DNS__SERVERS="[\"127.0.0.1:$P_DNS\"]"
    exec "$MAILCTL" dev --admin-listen "127.0.0.1:$P_ADMIN"
  ) >>"$DEV_LOG" 2>&1 &
  DEV_PID=$!
}

# Waits for /readyz and the banner (printed once every port is open).
wait_dev() {
  local step=$1 banners=$2 deadline=$((SECONDS + 90))
  while :; do
    if ! kill -0 "$DEV_PID" 2>/dev/null; then
      fail "$step" "mailctl dev running" "$(tail -n 40 "$DEV_LOG")"
    fi
    if curl -fsS -o /dev/null "http://127.0.0.1:$P_ADMIN/readyz" 2>/dev/null &&
      [ "$(grep -c '^mailmesh dev is running' "$DEV_LOG")" -ge "$banners" ]; then
      return 0
    fi
    [ $SECONDS -lt $deadline ] || fail "$step" "ready within 90 s" "$(tail -n 40 "$DEV_LOG")"
    sleep 0.2
  done
}

# SIGTERM (as Ctrl-C would), then waits for the exit; its status in DEV_EXIT.
stop_dev() {
  [ -n "$DEV_PID" ] || return 0
  kill -TERM "$DEV_PID" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$DEV_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  kill -KILL "$DEV_PID" 2>/dev/null || true
  DEV_EXIT=0
  wait "$DEV_PID" 2>/dev/null || DEV_EXIT=$?
  DEV_PID=
}

# mailctl as the README runs it: from the directory dev runs in (it finds its admin
# identity in ./mailmesh-data/pki), the endpoint from MAILCTL_ENDPOINT.
mctl() { (cd "$WORK" && "$MAILCTL" "$@"); }

# Python with the clients' common set-up: ports P['smtp'] ..., TLS context CTX that
# trusts dev's certificate, expect(condition, what). The program is on stdin.
PRELUDE='
import os, sys, ssl, time, re, json, smtplib, imaplib, poplib, subprocess
P = {k[2:].lower(): int(v) for k, v in os.environ.items() if k.startswith("P_")}
CTX = ssl.create_default_context(cafile=os.environ["TLS_CRT"])
def expect(cond, what):
    if not cond:
        print("expected: " + what, flush=True)
        sys.exit(1)
def mx():
    s = smtplib.SMTP("127.0.0.1", P["smtp"], timeout=30)
    s.set_debuglevel(1)
    s.ehlo("client.example.org")
    s.starttls(context=CTX)
    s.ehlo("client.example.org")
    return s
def imap(user, password):
    m = imaplib.IMAP4("127.0.0.1", P["imap"], timeout=30)
    m.debug = 4
    m.starttls(ssl_context=CTX)
    m.login(user, password)
    return m
'
# py STEP [ARGS...] <<'PY' ... PY: runs the program; on failure its output (the
# clients' transcripts) goes into the report.
py() {
  local step=$1 program rc=0
  shift
  program=$PRELUDE$(cat)
  PYTHONUNBUFFERED=1 "$PY" -c "$program" "$@" >"$WORK/py.out" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    fail "$step" "$(grep -m1 '^expected: ' "$WORK/py.out" | sed 's/^expected: //' || echo 'the client to succeed')" \
      "$(cat "$WORK/py.out")"
  fi
}

# Messages in ADDRESS's MAILBOX, as `mailctl --json mailbox list` says.
count() {
  mctl --json mailbox list "$1" | "$PY" -c '
import json, sys
print(next(m["messages"] for m in json.load(sys.stdin) if m["name"] == sys.argv[1]))' "$2"
}

# wait_count STEP ADDRESS MAILBOX N: until MAILBOX holds N messages (30 s).
wait_count() {
  local step=$1 address=$2 mailbox=$3 n=$4 have deadline=$((SECONDS + 30))
  while :; do
    have=$(count "$address" "$mailbox" 2>&1) || have="? ($have)"
    [ "$have" = "$n" ] && return 0
    [ $SECONDS -lt $deadline ] || fail "$step" "$n message(s) in $mailbox of $address (has $have)"
    sleep 0.2
  done
}

ALICE=alice@acme.test ALICE_PW='Lantern-Orbit-42-Quill'
BOB=bob@acme.test BOB_PW='Copper-Meadow-17-Falcon'
export ALICE ALICE_PW BOB BOB_PW
LIMIT=100000 # acme's max_message_bytes

# ---------------------------------------------------------------------------------
# 1. The run command

step="dev starts (fresh data dir, free ports) and is ready"
start_dev
wait_dev "$step" 1
for want in "smtp         127.0.0.1:$P_SMTP" "submission   127.0.0.1:$P_SUBMISSION" \
  "submissions  127.0.0.1:$P_SUBMISSIONS" "imap         127.0.0.1:$P_IMAP" \
  "imaps        127.0.0.1:$P_IMAPS" "pop3         127.0.0.1:$P_POP3" \
  "pop3s        127.0.0.1:$P_POP3S" "auth-check   in process" \
  "postmaster   postmaster@localhost (RCPT TO:<Postmaster> lands here; password in mailmesh-data/postmaster.password)"; do
  grep -qF -- "$want" "$DEV_LOG" || fail "$step" "the banner to show \"$want\"" "$(cat "$DEV_LOG")"
done
[ -s "$DATA/postmaster.password" ] || fail "$step" "$DATA/postmaster.password written"
ok "$step ($((SECONDS - T0)) s)"

# ---------------------------------------------------------------------------------
# 2. Postmaster and the null path, on the fresh platform (smtplib on the MX)

step="RCPT TO:<> is 501, RCPT TO:<Postmaster> is taken on a fresh dev (smtplib, MX STARTTLS)"
py "$step" <<'PY'
s = mx()
expect(s.mail("sender@example.org")[0] == 250, "MAIL 250")
code, msg = s.rcpt("")
expect(code == 501, "RCPT TO:<> answered 501, got %d %s" % (code, msg))
code, msg = s.rcpt("Postmaster")
expect(code == 250, "RCPT TO:<Postmaster> answered 250, got %d %s" % (code, msg))
code, msg = s.data(b"From: sender@example.org\r\nTo: postmaster\r\nSubject: for the postmaster\r\n\r\nhello postmaster\r\n")
expect(code == 250, "DATA 250, got %d %s" % (code, msg))
s.quit()
PY
wait_count "$step" postmaster@localhost INBOX 1
ok "$step"

step="the postmaster reads it over POP3S (curl, password from mailmesh-data/postmaster.password)"
out=$(curl -sS --cacert "$TLS_CRT" --max-time 30 -u "postmaster@localhost:$(cat "$DATA/postmaster.password")" \
  "pop3s://127.0.0.1:$P_POP3S/1" 2>&1) || fail "$step" "curl to succeed" "$out"
grep -q '^Subject: for the postmaster' <<<"$out" || fail "$step" "the message for the postmaster" "$out"
ok "$step"

# ---------------------------------------------------------------------------------
# 3. Tenant, domain, users; the password policy

step="a tenant with max_message_bytes $LIMIT and its domain (mailctl)"
out=$(mctl tenant add acme --max-message-bytes "$LIMIT" 2>&1) || fail "$step" "tenant add" "$out"
out=$(mctl domain add acme acme.test 2>&1) || fail "$step" "domain add" "$out"
ok "$step"

step="user add refuses a short and a common password, saying why"
refused() { # refused PASSWORD REASON
  local out rc=0
  out=$(mctl user add "$ALICE" --password-stdin <<<"$1" 2>&1) || rc=$?
  [ $rc -ne 0 ] || fail "$step" "password \"$1\" refused" "$out"
  grep -q "^error: .*$2" <<<"$out" || fail "$step" "the refusal of \"$1\" to say \"$2\"" "$out"
}
refused 'hunter2' 'at least 12 characters (this one has 7)'
refused 'password1234' 'most common'
for who in "$ALICE:$ALICE_PW" "$BOB:$BOB_PW"; do
  out=$(mctl user add "${who%%:*}" --password-stdin <<<"${who#*:}" 2>&1) ||
    fail "$step" "user add ${who%%:*} with a good password" "$out"
  [ "$out" = "user ${who%%:*} added" ] || fail "$step" "user ${who%%:*} added" "$out"
done
ok "$step"

step="mailctl --json output ends with a newline"
for args in "tenant list" "mailbox list $ALICE" "quota show $ALICE" "user list acme"; do
  # shellcheck disable=SC2086
  mctl --json $args >"$WORK/json.out" 2>&1 || fail "$step" "mailctl --json $args" "$(cat "$WORK/json.out")"
  [ "$(tail -c1 "$WORK/json.out" | od -An -c | tr -d ' ')" = '\n' ] ||
    fail "$step" "mailctl --json $args to end with a newline" "$(od -c "$WORK/json.out" | tail -n 3)"
  "$PY" -c 'import json,sys; json.load(open(sys.argv[1]))' "$WORK/json.out" 2>/dev/null ||
    fail "$step" "mailctl --json $args to print JSON" "$(cat "$WORK/json.out")"
done
grep -q "\"max_message_bytes\":$LIMIT" < <(mctl --json tenant list) ||
  fail "$step" "tenant list to show max_message_bytes $LIMIT" "$(mctl --json tenant list)"
ok "$step"

# ---------------------------------------------------------------------------------
# 4. The MX (port 25's role)

step="the MX takes mail over STARTTLS (swaks)"
out=$(swaks --server "127.0.0.1:$P_SMTP" --tls --ehlo client.example.org --timeout 30 \
  --from sender@example.org --to "$ALICE" --header 'Subject: hello from swaks' \
  --body 'hello from swaks' 2>&1) || fail "$step" "swaks to succeed" "$out"
grep -q '<~  250 2.0.0 Ok: queued as ' <<<"$out" || fail "$step" "250 queued" "$out"
wait_count "$step" "$ALICE" INBOX 1
ok "$step"

step="STARTTLS with a parameter is 501 (smtplib)"
py "$step" <<'PY'
s = smtplib.SMTP("127.0.0.1", P["smtp"], timeout=30)
s.set_debuglevel(1)
s.ehlo("client.example.org")
code, msg = s.docmd("STARTTLS", "junk")
expect(code == 501, "STARTTLS junk answered 501, got %d %s" % (code, msg))
# The session goes on in plain text, and a plain STARTTLS still works.
code, msg = s.docmd("NOOP")
expect(code == 250, "NOOP 250 after it, got %d %s" % (code, msg))
s.starttls(context=CTX)
s.quit()
PY
ok "$step"

step="SIZE= over the recipient tenant's limit is 552 5.3.4 at RCPT (smtplib)"
py "$step" <<PY
s = mx()
expect("size" in s.esmtp_features, "SIZE offered")
code, msg = s.mail("sender@example.org", ["SIZE=$((LIMIT * 2))"])
expect(code == 250, "MAIL SIZE=$((LIMIT * 2)) 250 (under the MX's own limit), got %d %s" % (code, msg))
code, msg = s.rcpt("$ALICE")
expect(code == 552 and msg.startswith(b"5.3.4"), "RCPT answered 552 5.3.4, got %d %s" % (code, msg))
s.rset()
code, msg = s.mail("sender@example.org", ["SIZE=1000"])
code, msg = s.rcpt("$ALICE")
expect(code == 250, "RCPT with SIZE=1000 answered 250, got %d %s" % (code, msg))
s.rset()
s.quit()
PY
ok "$step"

step="a DATA over the tenant's limit is 552, not 250 (swaks, no SIZE=)"
"$PY" -c "
import sys
line = 'x' * 76 + '\n'
sys.stdout.write(line * ($LIMIT * 3 // 2 // 77))" >"$WORK/big.txt"
rc=0
out=$(swaks --server "127.0.0.1:$P_SMTP" --tls --ehlo client.example.org --timeout 30 \
  --from sender@example.org --to "$ALICE" --header 'Subject: too big' \
  --body "$WORK/big.txt" --suppress-data 2>&1) || rc=$?
grep -qE '^<(\*\*|~\*) +552 5\.3\.4 ' <<<"$out" || fail "$step" "552 5.3.4 after the data" "$out"
! grep -q 'Ok: queued' <<<"$out" || fail "$step" "no 250 for it" "$out"
[ $rc -ne 0 ] || fail "$step" "swaks to report the refusal" "$out"
ok "$step"

# ---------------------------------------------------------------------------------
# 5. Submission (587 STARTTLS, 465 implicit TLS) and DKIM

step="submission 587 STARTTLS with AUTH (smtplib), before any DKIM key"
py "$step" <<'PY'
s = smtplib.SMTP("127.0.0.1", P["submission"], timeout=30)
s.set_debuglevel(1)
s.ehlo("laptop")
expect("auth" not in s.esmtp_features, "no AUTH before TLS")
s.starttls(context=CTX)
s.ehlo("laptop")
s.login(os.environ["ALICE"], os.environ["ALICE_PW"])
refused = s.sendmail(os.environ["ALICE"], [os.environ["BOB"]],
    b"From: Alice <alice@acme.test>\r\nTo: bob@acme.test\r\nSubject: before the key\r\n\r\nunsigned\r\n")
expect(refused == {}, "no recipient refused")
s.quit()
PY
wait_count "$step" "$BOB" INBOX 1
ok "$step"

SELECTOR=trial$RANDOM
step="mailctl dkim generate, then the very next message (465 implicit TLS, swaks) is signed with selector $SELECTOR"
printed=$(mctl dkim generate acme.test --selector "$SELECTOR" 2>&1) || fail "$step" "dkim generate" "$printed"
record=$(grep "^$SELECTOR._domainkey.acme.test. IN TXT " <<<"$printed" | sed 's/ ; signing$//' |
  cut -d' ' -f4- | "$PY" -c 'import sys, re; print("".join(re.findall(r"\"([^\"]*)\"", sys.stdin.read())))')
[[ $record == "v=DKIM1; k=rsa; p="* ]] || fail "$step" "a TXT record for $SELECTOR" "$printed"
out=$(swaks --server "127.0.0.1:$P_SUBMISSIONS" --tlsc --ehlo laptop --timeout 30 \
  --auth PLAIN --auth-user "$ALICE" --auth-password "$ALICE_PW" \
  --from "$ALICE" --to "$BOB" --header 'From: Alice <alice@acme.test>' \
  --header 'Subject: after the key' --body 'signed, I hope' 2>&1) ||
  fail "$step" "swaks to submit over implicit TLS" "$out"
grep -q '<~  250 2.0.0 Ok: queued as ' <<<"$out" || fail "$step" "250 queued" "$out"
wait_count "$step" "$BOB" INBOX 2
# Bob reads both over IMAP STARTTLS; dkimpy checks the signature with the record.
DKIMPY=/usr/bin/python3
py "$step" "$SELECTOR" "$record" "$DKIMPY" <<'PY'
selector, record, dkimpy = sys.argv[1:4]
m = imap(os.environ["BOB"], os.environ["BOB_PW"])
m.select("INBOX", readonly=True)
def message(subject):
    typ, data = m.search(None, "SUBJECT", '"%s"' % subject)
    ids = data[0].split()
    expect(len(ids) == 1, "one message %r in bob's INBOX, found %s" % (subject, ids))
    return m.fetch(ids[0], "(BODY.PEEK[])")[1][0][1]
before, after = message("before the key"), message("after the key")
expect(b"DKIM-Signature" not in before, "no signature before the key")
head = after.split(b"\r\n\r\n", 1)[0].decode()
fields = re.findall(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M | re.I)
expect(len(fields) == 1, "one DKIM-Signature on the message after `dkim generate`:\n" + head)
print(head)
sig = re.sub(r"\s+", "", fields[0])
tags = dict(t.split("=", 1) for t in sig.split(";") if "=" in t)
expect(tags.get("s") == selector and tags.get("d") == "acme.test",
       "s=%s; d=acme.test, got s=%s d=%s" % (selector, tags.get("s"), tags.get("d")))
h = [n.lower() for n in tags.get("h", "").split(":")]
expect(h.count("from") == 2, "h= to name from twice (over-signing), got h=%s" % tags.get("h"))
check = ("import sys, dkim\nmsg = sys.stdin.buffer.read()\n"
         "def dns(name, timeout=5):\n    return %r.encode() if name.decode().rstrip('.') == %r else None\n"
         "print(dkim.verify(msg, dnsfunc=dns))\n") % (record, selector + "._domainkey.acme.test")
verdict = subprocess.run([dkimpy, "-c", check], input=after, capture_output=True).stdout.decode().strip()
expect(verdict == "True", "dkimpy to verify the signature, said %r" % verdict)
m.logout()
PY
ok "$step"

step="mutt (batch mode, smtp_url) submits over 587 STARTTLS"
cat >"$WORK/muttrc" <<EOF
set ssl_ca_certificates_file="$TLS_CRT"
set ssl_starttls=yes
set ssl_force_tls=yes
set smtp_url="smtp://alice%40acme.test@127.0.0.1:$P_SUBMISSION/"
set smtp_pass="$ALICE_PW"
set from="alice@acme.test"
set realname="Alice"
set use_from=yes
set use_envelope_from=yes
set hostname="acme.test"
set record=""
set copy=no
set folder="$WORK/Mail"
set tmpdir="$WORK"
set imap_user="bob@acme.test"
set imap_pass="$BOB_PW"
set wait_key=no
set quit=yes
set sort=date
set pipe_split=no
EOF
mkdir -p "$WORK/Mail" # (else mutt asks whether to create it)
echo 'a message from mutt' >"$WORK/mutt-body.txt"
out=$(HOME=$WORK mutt -n -F "$WORK/muttrc" -s 'sent by mutt' -- "$BOB" <"$WORK/mutt-body.txt" 2>&1) ||
  fail "$step" "mutt to send" "$out"
wait_count "$step" "$BOB" INBOX 3
ok "$step"

step="mutt reads bob's INBOX over IMAPS (pty, <pipe-message>); its message is signed too"
rm -f "$WORK/mutt-read.txt"
out=$(cd "$WORK" && HOME=$WORK TERM=vt100 timeout 60 script -qec \
  "mutt -n -F $WORK/muttrc -f 'imaps://bob%40acme.test@127.0.0.1:$P_IMAPS/INBOX' -e 'push \"<tag-pattern>~A<enter><tag-prefix><pipe-message>cat >>$WORK/mutt-read.txt<enter><quit>\"'" \
  /dev/null </dev/null 2>&1) || fail "$step" "mutt to read the mailbox and quit" "$out"
for subject in 'before the key' 'after the key' 'sent by mutt'; do
  grep -q "^Subject: $subject" "$WORK/mutt-read.txt" 2>/dev/null ||
    fail "$step" "\"$subject\" among what mutt piped" \
      "$(cat "$WORK/mutt-read.txt" 2>/dev/null; echo '--- screen ---'; tr '\033\r' '\n' <<<"$out" | cat -v)"
done
signed=$(grep -c "^DKIM-Signature: v=1; a=rsa-sha256; s=$SELECTOR; d=acme.test;" "$WORK/mutt-read.txt" || true)
[ "$signed" = 2 ] || fail "$step" "two of the three messages mutt piped signed with $SELECTOR (found $signed)" \
  "$(cat "$WORK/mutt-read.txt")"
ok "$step"

# ---------------------------------------------------------------------------------
# 6. Reading: IMAPS (curl), POP3 STLS (poplib); Received shows [127.0.0.1]

step="alice reads over IMAPS (curl); Received shows the client as [127.0.0.1]"
out=$(curl -sS --cacert "$TLS_CRT" --max-time 30 -u "$ALICE:$ALICE_PW" \
  "imaps://127.0.0.1:$P_IMAPS/INBOX;UID=1" 2>&1) || fail "$step" "curl to fetch UID 1" "$out"
grep -q '^hello from swaks' <<<"$out" || fail "$step" "the swaks message" "$out"
grep -q '^Received: from client.example.org (\[127\.0\.0\.1\])' <<<"$out" ||
  fail "$step" "Received: from client.example.org ([127.0.0.1])" "$out"
ok "$step"

step="alice reads over POP3 STLS (poplib)"
py "$step" <<'PY'
p = poplib.POP3("127.0.0.1", P["pop3"], timeout=30)
p.set_debuglevel(1)
p.stls(context=CTX)
p.user(os.environ["ALICE"])
p.pass_(os.environ["ALICE_PW"])
expect(p.stat()[0] == 1, "one message for alice")
text = b"\n".join(p.retr(1)[1]).decode()
expect("\nhello from swaks" in text, "the swaks message")
expect(re.search(r"^Received: from client\.example\.org \(\[127\.0\.0\.1\]\)", text, re.M),
       "Received with [127.0.0.1]")
p.quit()
PY
ok "$step"

# ---------------------------------------------------------------------------------
# 7. Quota: a full mailbox, then no quota

step="a full mailbox is 452 4.2.2 at RCPT (mailctl user quota, smtplib)"
out=$(mctl user quota "$BOB" 1000 2>&1) || fail "$step" "user quota $BOB 1000" "$out"
[ "$out" = "quota of $BOB set to 1000 bytes" ] || fail "$step" "the quota set" "$out"
py "$step" <<'PY'
q = json.loads(subprocess.run([os.environ["MAILCTL"], "--json", "quota", "show", os.environ["BOB"]],
    cwd=os.environ["WORK"], capture_output=True, check=True).stdout)
expect(q["used_bytes"] > q["limit_bytes"], "bob's mailbox over its quota: %s" % q)
s = mx()
s.mail("sender@example.org")
code, msg = s.rcpt(os.environ["BOB"])
expect(code == 452 and msg.startswith(b"4.2.2"), "RCPT to bob answered 452 4.2.2, got %d %s" % (code, msg))
code, msg = s.rcpt(os.environ["ALICE"])
expect(code == 250, "RCPT to alice still 250, got %d %s" % (code, msg))
s.rset()
s.quit()
PY
ok "$step"

step="mailctl user quota U without a size says the quota was removed"
out=$(mctl user quota "$BOB" 2>&1) || fail "$step" "user quota $BOB" "$out"
[ "$out" = "quota of $BOB removed" ] || fail "$step" "\"quota of $BOB removed\"" "$out"
py "$step" <<'PY'
q = json.loads(subprocess.run([os.environ["MAILCTL"], "--json", "quota", "show", os.environ["BOB"]],
    cwd=os.environ["WORK"], capture_output=True, check=True).stdout)
expect(q["limit_bytes"] is None, "no limit left: %s" % q)
s = mx()
s.mail("sender@example.org")
code, msg = s.rcpt(os.environ["BOB"])
expect(code == 250, "RCPT to bob 250 again, got %d %s" % (code, msg))
s.rset()
s.quit()
PY
ok "$step"

# ---------------------------------------------------------------------------------
# 8. A restart loses nothing

step="a restart of dev loses nothing (mail accepted just before the stop is read after)"
before_alice=$(count "$ALICE" INBOX) before_bob=$(count "$BOB" INBOX)
before_pm=$(count postmaster@localhost INBOX)
py "$step" <<'PY'
s = mx()
refused = s.sendmail("sender@example.org", [os.environ["ALICE"]],
    b"From: sender@example.org\r\nSubject: just before the restart\r\n\r\nstill here?\r\n")
expect(refused == {}, "accepted")
s.quit()
PY
stop_dev
[ "$DEV_EXIT" = 0 ] || fail "$step" "dev to exit 0 on SIGTERM (exit $DEV_EXIT)"
start_dev
wait_dev "$step" 2
wait_count "$step" "$ALICE" INBOX $((before_alice + 1))
[ "$(count "$BOB" INBOX)" = "$before_bob" ] || fail "$step" "bob's $before_bob message(s) kept"
[ "$(count postmaster@localhost INBOX)" = "$before_pm" ] || fail "$step" "the postmaster's message kept"
py "$step" <<'PY'
m = imaplib.IMAP4_SSL("127.0.0.1", P["imaps"], ssl_context=CTX, timeout=30)
m.debug = 4
m.login(os.environ["ALICE"], os.environ["ALICE_PW"])
m.select("INBOX", readonly=True)
for subject in ("hello from swaks", "just before the restart"):
    ids = m.search(None, "SUBJECT", '"%s"' % subject)[1][0].split()
    expect(len(ids) == 1, "%r in alice's INBOX after the restart" % subject)
m.logout()
PY
ok "$step"

# ---------------------------------------------------------------------------------
# 9. Login failures (last: they lock 127.0.0.1 out of SMTP AUTH, IMAP and POP3)

step="POP3 past the login-failure limit says [SYS/TEMP], not [AUTH] (poplib, POP3S)"
py "$step" <<'PY'
def attempt(password):
    p = poplib.POP3_SSL("127.0.0.1", P["pop3s"], context=CTX, timeout=30)
    p.set_debuglevel(1)
    p.user(os.environ["ALICE"])
    try:
        p.pass_(password)
        reply = "+OK"
    except poplib.error_proto as e:
        reply = e.args[0].decode()
    try:
        p.quit()
    except Exception:
        pass
    return reply
for n in range(1, 11):
    reply = attempt("wrong password %d" % n)
    expect(reply.startswith("-ERR [AUTH]"), "wrong password %d: -ERR [AUTH], got %r" % (n, reply))
reply = attempt("wrong password 11")
expect(reply.startswith("-ERR [SYS/TEMP]"), "after 10 failures: -ERR [SYS/TEMP], got %r" % reply)
reply = attempt(os.environ["ALICE_PW"])
expect(reply.startswith("-ERR [SYS/TEMP]"), "the address locked out, right password too: got %r" % reply)
PY
ok "$step"

stop_dev
[ "$DEV_EXIT" = 0 ] || fail "dev stops cleanly" "exit 0 on SIGTERM (exit $DEV_EXIT)"
ok "dev stops cleanly on SIGTERM"
printf 'trial passed in %d s\n' $((SECONDS - T0))
