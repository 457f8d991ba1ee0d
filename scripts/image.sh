#!/usr/bin/env bash
# Builds the mailmesh runtime image here, with no registry and no Docker daemon, and
# proves it: a Debian rootfs made by mmdebstrap from image/packages (the packages the
# Dockerfile's distroless runtime image is made of), the binaries of image/binaries
# from a cargo profile directory, assembled into an OCI image layout with umoci; then
# the image is unpacked and run with runc (an OCI runtime: the image's own user,
# working directory and environment, read-only root filesystem, no capabilities, as
# the chart runs it; `--runtime chroot` where runc cannot run): every binary's
# libraries resolve inside it, every binary starts, and `mailctl dev` takes a message
# over SMTP and hands it back over IMAP (Python smtplib/imaplib on loopback).
#
#   scripts/image.sh [--profile release|debug] [--build] [--out DIR] [--archive FILE]
#   scripts/image.sh --check-sync      # only the Dockerfile / image/* drift check
#
# One source of truth: image/binaries (also read by the Dockerfile's build stage and
# scripts/image-deps.sh), image/packages (names the Dockerfile's runtime image and
# suite), and the Dockerfile's USER / ENTRYPOINT / CMD (copied into this image's
# config). The drift check runs first on every invocation and fails on any mismatch.
#
# Needs root (runc or chroot, mounts, file ownership), mmdebstrap, umoci and runc
# (installed with apt-get when missing), python3, curl and the Debian mirror of
# /etc/apt/sources*.
# The base layer is cached in ~/.cache/mailmesh-image (MAILMESH_IMAGE_CACHE), keyed by
# the package list and mirror, and rebuilt when older than
# MAILMESH_IMAGE_BASE_MAX_AGE_DAYS (7) so security updates come in.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=release
BUILD=0
RUN=1
RUNTIME_KIND=auto
KEEP=0
CHECK_ONLY=0
REFRESH_BASE=0
TAG=dev
OUT=
ARCHIVE=
TARGET_DIR=${CARGO_TARGET_DIR:-target}
CACHE=${MAILMESH_IMAGE_CACHE:-$HOME/.cache/mailmesh-image}
BASE_MAX_AGE_DAYS=${MAILMESH_IMAGE_BASE_MAX_AGE_DAYS:-7}
# Bumped whenever the way the base layer is made changes (invalidates the cache).
BASE_RECIPE=1
# Timestamp of every file in the base layer (as Bazel's pkg_tar/distroless use), so
# the same package versions give the same layer digest.
BASE_MTIME=946684800

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  cat <<EOF
Options:
  --profile release|debug  cargo profile whose binaries go in (default release)
  --target-dir DIR         cargo target directory (default \$CARGO_TARGET_DIR or target)
  --build                  run cargo build for that profile first (default: never builds)
  --out DIR                where the OCI layout goes (default TARGET_DIR/image/PROFILE)
  --archive FILE           also write the layout as an oci-archive tar
  --tag TAG                the image's tag in the layout (default dev)
  --refresh-base           rebuild the cached base layer
  --runtime runc|chroot    how the image is run (default runc when it works here)
  --no-run                 build only: skip running the image and the smoke test
  --keep                   keep the unpacked image and dev log (printed path)
  --check-sync             only check that the Dockerfile and image/* agree
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=${2:?}; shift ;;
    --target-dir) TARGET_DIR=${2:?}; shift ;;
    --build) BUILD=1 ;;
    --out) OUT=${2:?}; shift ;;
    --archive) ARCHIVE=${2:?}; shift ;;
    --tag) TAG=${2:?}; shift ;;
    --refresh-base) REFRESH_BASE=1 ;;
    --no-run) RUN=0 ;;
    --keep) KEEP=1 ;;
    --runtime) RUNTIME_KIND=${2:?}; shift ;;
    --check-sync) CHECK_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$PROFILE" in release|debug) ;; *) echo "image.sh: --profile is release or debug" >&2; exit 2 ;; esac
case "$RUNTIME_KIND" in auto|runc|chroot) ;; *) echo "image.sh: --runtime is runc or chroot" >&2; exit 2 ;; esac

T0=$(date +%s.%N)
step() { printf '== [%6.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }
die() { echo "image.sh: FAILED: $*" >&2; exit 1; }

# --- the lists -------------------------------------------------------------------
entries() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' "$1" | grep -v '^$' || true; }
mapfile -t BINS < <(entries image/binaries)
[ "${#BINS[@]}" -gt 0 ] || die "image/binaries lists no binary"
PACKAGES=()
RUNTIME=
SUITE=
while read -r line; do
  case "$line" in
    runtime:*) RUNTIME=$(echo "${line#runtime:}" | xargs) ;;
    suite:*) SUITE=$(echo "${line#suite:}" | xargs) ;;
    *:*) die "image/packages: unknown key in '$line'" ;;
    *) PACKAGES+=("$line") ;;
  esac
done < <(entries image/packages)
{ [ -n "$RUNTIME" ] && [ -n "$SUITE" ]; } || die "image/packages needs 'runtime:' and 'suite:' lines"
[ "${#PACKAGES[@]}" -gt 0 ] || die "image/packages lists no package"

# --- drift check: Dockerfile <-> image/* <-> image-deps.sh ------------------------
# Prints the runtime stage's USER, WORKDIR, ENTRYPOINT and CMD (JSON) for the config.
step "sync check: Dockerfile, image/binaries, image/packages, scripts/image-deps.sh"
DOCKER_CONFIG_JSON=$(python3 - "$RUNTIME" "$SUITE" "${BINS[@]}" <<'PY'
import json, re, sys
runtime, suite, bins = sys.argv[1], sys.argv[2], sys.argv[3:]
errors = []
def fail(msg): errors.append(msg)
if len(set(bins)) != len(bins):
    fail("image/binaries lists a binary twice")
for b in bins:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", b):
        fail(f"image/binaries: {b!r} is not a binary name")
# Dockerfile instructions: continuation lines joined, comments dropped.
lines, cur = [], ""
for raw in open("Dockerfile", encoding="utf-8"):
    s = raw.rstrip("\n")
    if not cur and (s.lstrip().startswith("#") or not s.strip()):
        continue
    if cur and s.lstrip().startswith("#"):
        continue
    if s.endswith("\\"):
        cur += s[:-1] + " "
        continue
    lines.append(cur + s)
    cur = ""
stages = []
for ins in lines:
    word, _, rest = ins.strip().partition(" ")
    word = word.upper()
    if word == "FROM":
        image = [t for t in rest.split() if not t.startswith("--")][0]
        stages.append({"from": image, "ins": []})
    elif stages:
        stages[-1]["ins"].append((word, rest.strip()))
if len(stages) < 2:
    fail("Dockerfile: expected a build stage and a runtime stage")
else:
    build, final = stages[0], stages[-1]
    if final["from"] != runtime:
        fail(f"Dockerfile's runtime stage is FROM {final['from']}, image/packages says runtime: {runtime}")
    if not build["from"].endswith("-" + suite):
        fail(f"Dockerfile's build stage is FROM {build['from']}, not a -{suite} image (image/packages suite: {suite})")
    release = {"bullseye": "11", "bookworm": "12", "trixie": "13"}.get(suite)
    if release is None:
        fail(f"image/packages: unknown suite {suite}")
    elif f"-debian{release}" not in runtime:
        fail(f"runtime {runtime} is not Debian {release} ({suite})")
    runs = " ".join(rest for word, rest in build["ins"] if word == "RUN")
    if "< image/binaries" not in runs or 'target/release/$bin' not in runs:
        fail("Dockerfile's build stage must copy the binaries listed in image/binaries "
             "(a `while read -r bin ... done < image/binaries` loop)")
    if re.search(r"\bfor\s+\w+\s+in\b", runs):
        fail("Dockerfile's build stage has a `for ... in` list: read image/binaries instead")
    if ("COPY", "--from=build /out/ /usr/local/bin/") not in final["ins"]:
        fail("Dockerfile's runtime stage must `COPY --from=build /out/ /usr/local/bin/`")
    cfg = {"user": None, "workdir": None, "entrypoint": None, "cmd": None, "env": []}
    for word, rest in final["ins"]:
        if word in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(rest)
            except ValueError:
                fail(f"Dockerfile {word} must be exec (JSON) form")
                continue
            cfg[word.lower()] = value
        elif word == "USER":
            cfg["user"] = rest
        elif word == "WORKDIR":
            cfg["workdir"] = rest
        elif word == "ENV":
            fail("Dockerfile runtime ENV: teach scripts/image.sh to copy it")
    if not cfg["user"] or not cfg["entrypoint"]:
        fail("Dockerfile's runtime stage needs USER and ENTRYPOINT")
    elif cfg["entrypoint"][0] not in [f"/usr/local/bin/{b}" for b in bins]:
        fail(f"ENTRYPOINT {cfg['entrypoint'][0]} is not one of image/binaries")
deps = open("scripts/image-deps.sh", encoding="utf-8").read()
if "image/binaries" not in deps or re.search(r"\bfor\s+bin\s+in\s+[a-z]", deps):
    fail("scripts/image-deps.sh must take its binaries from image/binaries")
if errors:
    for e in errors:
        print("  drift: " + e, file=sys.stderr)
    sys.exit(1)
print(json.dumps(cfg))
PY
) || die "the Dockerfile and image/* disagree (see drift: lines above)"
echo "   in sync: ${#BINS[@]} binaries, ${#PACKAGES[@]} packages, runtime $RUNTIME ($SUITE)"
[ "$CHECK_ONLY" = 1 ] && exit 0

[ "$(id -u)" = 0 ] || die "needs root (chroot, mounts, file ownership)"
missing=()
for tool in mmdebstrap umoci runc; do
  if [ "$tool" = runc ] && { [ "$RUN" = 0 ] || [ "$RUNTIME_KIND" = chroot ]; }; then continue; fi
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]} (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in python3 dpkg-deb flock curl; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done

# --- the binaries -----------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  step "cargo build ($PROFILE)"
  if [ "$PROFILE" = release ]; then
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --locked --bins
  else
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --locked --bins
  fi
fi
BIN_DIR=$(cd "$TARGET_DIR/$PROFILE" 2>/dev/null && pwd) || die "no $TARGET_DIR/$PROFILE (build first, or --build / --target-dir)"
HEAD_TIME=$(git log -1 --format=%ct 2>/dev/null || date +%s)
stale=()
for bin in "${BINS[@]}"; do
  [ -x "$BIN_DIR/$bin" ] || die "$BIN_DIR/$bin is missing (image/binaries lists it; build first or pass --build)"
  [ "$(stat -c %Y "$BIN_DIR/$bin")" -ge "$HEAD_TIME" ] || stale+=("$bin")
done
[ "${#stale[@]}" = 0 ] || echo "   note: built before the last commit: ${stale[*]}"

mkdir -p "$CACHE"
OUT=${OUT:-$TARGET_DIR/image/$PROFILE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock -n 9 || die "another scripts/image.sh is writing $OUT"

WORK=
RUNC_PREFIX="mailmesh-image-$$-"
BASE_TMP=
DEV_PID=
MOUNTS=()
cleanup() {
  local rc=$?
  set +e
  if [ -n "$DEV_PID" ] && kill -0 "$DEV_PID" 2>/dev/null; then
    kill -TERM "$DEV_PID"
    for _ in $(seq 100); do kill -0 "$DEV_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DEV_PID" 2>/dev/null
    wait "$DEV_PID" 2>/dev/null
  fi
  if [ -n "$WORK" ] && command -v runc >/dev/null; then
    for id in $(runc list -q 2>/dev/null | grep "^${RUNC_PREFIX}" || true); do
      runc delete -f "$id" >/dev/null 2>&1 || echo "image.sh: could not delete runc container $id" >&2
    done
  fi
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" || echo "image.sh: could not unmount ${MOUNTS[i]}" >&2
  done
  for dir in "$BASE_TMP" "$WORK"; do
    if [ -z "$dir" ] || [ ! -d "$dir" ]; then continue; fi
    if grep -q " $dir/" /proc/mounts; then
      echo "image.sh: leaving $dir: something is still mounted in it" >&2
    elif [ "$KEEP" = 1 ] && [ "$dir" = "$WORK" ]; then
      echo "kept: $WORK (unpacked image in bundle/rootfs, dev log in dev.log)"
    else
      rm -rf "$dir"
    fi
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- base layer: Debian packages, extracted like distroless does ------------------
ARCH=$(dpkg --print-architecture)
# The host's Debian entries for the suite (same mirror as apt here), as deb822.
SOURCES=$(python3 - "$SUITE" <<'PY'
import glob, re, sys
suite = sys.argv[1]
wanted = {suite, suite + "-updates", suite + "-security"}
out = []
def emit(uris, suites, signed):
    suites = [s for s in suites if s in wanted]
    if uris and suites:
        out.append("Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n%s" % (
            " ".join(uris), " ".join(suites), f"Signed-By: {signed}\n" if signed else ""))
for path in sorted(glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*.list")):
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        m = re.match(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
        if m and "main" in m.group(4).split():
            opts = m.group(1) or ""
            signed = re.search(r"signed-by=(\S+?)\]?(\s|$)", opts)
            emit([m.group(2)], [m.group(3)], signed.group(1) if signed else None)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path, encoding="utf-8").read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and "main" in fields.get("components", "").split() \
                and fields.get("enabled", "yes").lower() != "no":
            emit(fields.get("uris", "").split(), fields.get("suites", "").split(), fields.get("signed-by"))
print("\n".join(out), end="")
PY
)
KEY=$(printf '%s\n' "recipe $BASE_RECIPE" "arch $ARCH" "suite $SUITE" "${PACKAGES[@]}" "$SOURCES" | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-$KEY.tar
BASE_VERSIONS=$CACHE/base-$KEY.versions
if [ "$REFRESH_BASE" = 0 ] && [ -s "$BASE_TAR" ] && [ -s "$BASE_VERSIONS" ] &&
   [ -z "$(find "$BASE_TAR" -mtime "+$BASE_MAX_AGE_DAYS")" ]; then
  step "base layer: cached $BASE_TAR"
else
  step "base layer: mmdebstrap $SUITE (${PACKAGES[*]})"
  # Bases of other package lists or mirrors, unused this long, go.
  find "$CACHE" -maxdepth 1 -name 'base-*' -mtime "+$BASE_MAX_AGE_DAYS" -delete
  BASE_TMP=$(mktemp -d "$CACHE/base.XXXXXX")
  mirror=()
  if [ -n "$SOURCES" ]; then
    printf '%s\n' "$SOURCES" > "$BASE_TMP/mirror.sources"
    mirror=("$BASE_TMP/mirror.sources")
    echo "   mirror: $(grep '^URIs:' "$BASE_TMP/mirror.sources" | cut -d' ' -f2- | sort -u | tr '\n' ' ')"
  else
    echo "   mirror: no $SUITE entry in /etc/apt/sources*: mmdebstrap's default"
  fi
  rootfs=$BASE_TMP/rootfs
  # extract: the packages (and what they depend on) unpacked, no maintainer scripts,
  # as distroless is made; the .debs stay so their file lists can be read.
  if ! mmdebstrap --variant=extract --architectures="$ARCH" --skip=cleanup/apt/cache \
      --include="$(IFS=,; echo "${PACKAGES[*]}")" "$SUITE" "$rootfs" "${mirror[@]}" \
      > "$BASE_TMP/mmdebstrap.log" 2>&1; then
    tail -30 "$BASE_TMP/mmdebstrap.log" >&2
    die "mmdebstrap failed"
  fi
  # Keep exactly the listed packages' files: apt's extra dependencies (debconf and
  # mawk, which need perl and maintainer scripts to mean anything) and mmdebstrap's
  # own files (apt and dpkg state, copied resolv.conf/hostname, device nodes) go.
  python3 - "$rootfs" "$BASE_VERSIONS.tmp" "${PACKAGES[@]}" <<'PY'
import glob, os, shutil, subprocess, sys
rootfs, versions_out, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
keep, dropped, versions, controls = set(), [], [], {}
for deb in sorted(glob.glob(os.path.join(rootfs, "var/cache/apt/archives/*.deb"))):
    field = lambda f: subprocess.run(["dpkg-deb", "-f", deb, f], check=True,
                                     capture_output=True, text=True).stdout.strip()
    pkg = field("Package")
    if pkg not in wanted:
        dropped.append(pkg)
        continue
    versions.append(f"{pkg}={field('Version')}")
    controls[pkg] = subprocess.run(["dpkg-deb", "-f", deb], check=True,
                                   capture_output=True, text=True).stdout
    tar = subprocess.run(f"dpkg-deb --fsys-tarfile '{deb}' | tar -t", shell=True, check=True,
                         capture_output=True, text=True).stdout
    for path in tar.splitlines():
        path = path.removeprefix("./").rstrip("/")
        while path:
            keep.add(path)
            path = os.path.dirname(path)
missing = wanted - {v.split("=")[0] for v in versions}
if missing:
    sys.exit(f"packages not found on the mirror: {' '.join(sorted(missing))}")
removed = 0
for dirpath, dirnames, filenames in os.walk(rootfs, topdown=False):
    for name in filenames + dirnames:
        full = os.path.join(dirpath, name)
        rel = os.path.relpath(full, rootfs)
        if rel in keep:
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            if not os.listdir(full):
                os.rmdir(full)
        else:
            os.unlink(full)
            removed += 1
# Documentation is not needed at run time; the copyright files stay (licences).
for sub in ("usr/share/man", "usr/share/info", "usr/share/lintian"):
    shutil.rmtree(os.path.join(rootfs, sub), ignore_errors=True)
docs = os.path.join(rootfs, "usr/share/doc")
for pkg in os.listdir(docs) if os.path.isdir(docs) else []:
    if os.path.islink(os.path.join(docs, pkg)):
        continue  # e.g. libgomp1 -> gcc-12-base
    for name in os.listdir(os.path.join(docs, pkg)):
        doc = os.path.join(docs, pkg, name)
        if name == "copyright":
            continue
        if os.path.isdir(doc) and not os.path.islink(doc):
            shutil.rmtree(doc)
        else:
            os.unlink(doc)
# Package records where scanners look for them in distroless images.
status = os.path.join(rootfs, "var/lib/dpkg/status.d")
os.makedirs(status, exist_ok=True)
for pkg, control in controls.items():
    with open(os.path.join(status, pkg), "w") as f:
        f.write(control)
with open(versions_out, "w") as f:
    f.write("\n".join(versions) + "\n")
print(f"   kept {len(versions)} packages; dropped the dependencies {' '.join(dropped) or 'none'}"
      f" and {removed} files that were not the listed packages'")
PY
  # What distroless adds to its packages: users, nsswitch, the CA bundle (normally
  # written by ca-certificates' maintainer script), /tmp, the nonroot home.
  cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat > "$rootfs/etc/group" <<'EOF'
root:x:0:
tty:x:5:
staff:x:50:
nonroot:x:65532:
nobody:x:65534:
EOF
  cat > "$rootfs/etc/nsswitch.conf" <<'EOF'
passwd:         files
group:          files
shadow:         files
hosts:          files dns
networks:       files
protocols:      files
services:       files
ethers:         files
rpc:            files
EOF
  mkdir -p "$rootfs/etc/ssl/certs"
  find "$rootfs/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort |
    while read -r crt; do awk 1 "$crt"; done > "$rootfs/etc/ssl/certs/ca-certificates.crt"
  [ -s "$rootfs/etc/ssl/certs/ca-certificates.crt" ] || die "no CA certificates in the rootfs"
  chmod 644 "$rootfs"/etc/{passwd,group,nsswitch.conf} "$rootfs/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$rootfs/home/nonroot" "$rootfs/tmp" "$rootfs/root"
  chown 65532:65532 "$rootfs/home/nonroot"
  chmod 700 "$rootfs/home/nonroot" "$rootfs/root"
  chmod 1777 "$rootfs/tmp"
  tar --sort=name --format=posix --numeric-owner --mtime="@$BASE_MTIME" \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$BASE_TAR.tmp" .
  mv "$BASE_VERSIONS.tmp" "$BASE_VERSIONS"
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$BASE_TMP"
  BASE_TMP=
fi
echo "   $(wc -l < "$BASE_VERSIONS") packages: $(tr '\n' ' ' < "$BASE_VERSIONS")"

# --- the image ----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/mailmesh-image.XXXXXX)
step "binaries layer: ${BINS[*]} from $BIN_DIR"
# Owned by root, mode 0755, the last commit's time: the same binaries give the same
# layer digest.
tar --sort=name --format=posix --numeric-owner --owner=0 --group=0 --mode=0755 \
  --mtime="@$HEAD_TIME" --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  --transform='s,^,usr/local/bin/,' -C "$BIN_DIR" -cf "$WORK/binaries.tar" "${BINS[@]}"

step "OCI layout with umoci: $OUT/oci ($TAG)"
OCI=$OUT/oci
if [ -e "$OCI" ]; then
  [ -f "$OCI/oci-layout" ] || die "$OCI exists and is not an OCI layout: not removing it"
  rm -rf "$OCI"
fi
CREATED=$(date -u -d "@$HEAD_TIME" +%Y-%m-%dT%H:%M:%SZ)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || REVISION="$REVISION-dirty"
umoci init --layout "$OCI"
umoci new --image "$OCI:$TAG"
umoci raw add-layer --image "$OCI:$TAG" --history.created "$CREATED" \
  --history.created_by "mmdebstrap --variant=extract $SUITE: ${PACKAGES[*]} (scripts/image.sh)" \
  "$BASE_TAR"
umoci raw add-layer --image "$OCI:$TAG" --history.created "$CREATED" \
  --history.created_by "COPY ${BINS[*]} /usr/local/bin/ ($PROFILE)" "$WORK/binaries.tar"
# USER, ENTRYPOINT, CMD (and WORKDIR) from the Dockerfile's runtime stage; the rest as
# distroless's nonroot image has it.
mapfile -t CONFIG_ARGS < <(python3 -c '
import json, sys
c = json.loads(sys.argv[1])
print("--config.user=" + c["user"])
print("--config.workingdir=" + (c["workdir"] or "/home/nonroot"))
for e in c["entrypoint"]: print("--config.entrypoint=" + e)
for e in c["cmd"] or []: print("--config.cmd=" + e)
' "$DOCKER_CONFIG_JSON")
umoci config --image "$OCI:$TAG" --no-history --created "$CREATED" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.label "org.opencontainers.image.revision=$REVISION" \
  --config.label "org.opencontainers.image.title=mailmesh" \
  --config.label "io.mailmesh.profile=$PROFILE" \
  "${CONFIG_ARGS[@]}"
umoci gc --layout "$OCI"
read -r DIGEST CONFIG_DIGEST PACKED < <(python3 - "$OCI" "$TAG" <<'PY'
import json, os, sys
oci, tag = sys.argv[1:]
blob = lambda d: os.path.join(oci, "blobs", *d.split(":"))
index = json.load(open(os.path.join(oci, "index.json")))
desc = next(m for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
manifest = json.load(open(blob(desc["digest"])))
size = desc["size"] + manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
print(desc["digest"], manifest["config"]["digest"], size)
PY
)
[ -n "${PACKED:-}" ] || die "could not read the image's manifest"
UNPACKED_BYTES=$(( $(stat -c %s "$BASE_TAR") + $(stat -c %s "$WORK/binaries.tar") ))
mib() { awk -v n="$1" 'BEGIN { printf "%.1f", n / 1048576 }'; }
if [ -n "$ARCHIVE" ]; then
  step "oci-archive: $ARCHIVE"
  mkdir -p "$(dirname "$ARCHIVE")"
  tar --sort=name --numeric-owner --owner=0 --group=0 --mtime="@$HEAD_TIME" \
    -C "$OCI" -cf "$ARCHIVE" oci-layout index.json blobs
fi
echo "   image  $OCI:$TAG"
echo "   digest $DIGEST (config $CONFIG_DIGEST)"
echo "   size   $(mib "$PACKED") MiB compressed, $(mib "$UNPACKED_BYTES") MiB unpacked"

if [ "$RUN" = 0 ]; then
  step "done (--no-run: not run)"
  exit 0
fi

# --- run it -------------------------------------------------------------------------
step "unpacking with umoci"
umoci unpack --image "$OCI:$TAG" "$WORK/bundle" >/dev/null
ROOTFS=$WORK/bundle/rootfs
# What a runtime would run: user, working directory, environment, arguments, all
# from the runtime config umoci derived from the image config.
read -r IMG_UID IMG_GID IMG_CWD < <(python3 -c '
import json, sys
p = json.load(open(sys.argv[1]))["process"]
print(p["user"]["uid"], p["user"]["gid"], p["cwd"])' "$WORK/bundle/config.json")
mapfile -t IMG_ARGS < <(python3 -c '
import json, sys
print("\n".join(json.load(open(sys.argv[1]))["process"]["args"]))' "$WORK/bundle/config.json")
IMG_ENV=$(python3 -c '
import json, sys
print(json.dumps(json.load(open(sys.argv[1]))["process"]["env"]))' "$WORK/bundle/config.json")
[ "$IMG_UID" != 0 ] || die "the image runs as root"
case "$ARCH" in
  amd64) LDSO=/lib64/ld-linux-x86-64.so.2 ;;
  arm64) LDSO=/lib/ld-linux-aarch64.so.1 ;;
  *) die "no dynamic loader path known for $ARCH" ;;
esac
# The nonroot home as a writable volume (mailctl dev keeps mailmesh-data there), kept
# across the runs below as a pod's emptyDir would be.
HOME_VOL=$WORK/home
mkdir -p "$HOME_VOL"
chown "$IMG_UID:$IMG_GID" "$HOME_VOL"
chmod 700 "$HOME_VOL"
# Mount points for what every runtime provides.
for file in resolv.conf hosts; do
  [ -e "$ROOTFS/etc/$file" ] || : > "$ROOTFS/etc/$file"
done

NOFILE=$(ulimit -Hn)
[ "$NOFILE" != unlimited ] || NOFILE=1048576
# runc_config BUNDLE_DIR [VAR=value ...] -- ARGS: writes BUNDLE_DIR/config.json: umoci's
# runtime config (the image's user, working directory, environment) with the chart's
# restrictions (read-only root, no capabilities, no new privileges, /tmp a tmpfs), the
# home volume, the host's network (the smoke test talks to it over loopback) and the
# host's /etc/resolv.conf and /etc/hosts, as a runtime gives them.
runc_config() {
  local bundle=$1 extra=()
  shift
  while [ "$1" != -- ]; do extra+=("$1"); shift; done
  shift
  NOFILE=$NOFILE python3 -c '
import json, os, sys
base, rootfs, home, out, n = sys.argv[1:6]
n = int(n)
extra, args = sys.argv[6:6 + n], sys.argv[6 + n:]
c = json.load(open(base))
c["root"] = {"path": rootfs, "readonly": True}
p = c["process"]
p.update(terminal=False, args=args, env=p["env"] + extra, noNewPrivileges=True)
p["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
nofile = int(os.environ["NOFILE"])  # the host limit: a container cannot raise it
p["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]
c["linux"]["namespaces"] = [ns for ns in c["linux"]["namespaces"] if ns["type"] != "network"]
c["mounts"] += [
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    {"destination": p["cwd"], "type": "bind", "source": home, "options": ["rbind", "rw"]},
    {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]},
    {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
]
json.dump(c, open(out, "w"), indent=1)
' "$WORK/bundle/config.json" "$ROOTFS" "$HOME_VOL" "$bundle/config.json" \
    "${#extra[@]}" "${extra[@]}" "$@"
}

if [ "$RUNTIME_KIND" = auto ]; then
  RUNTIME_KIND=chroot
  if command -v runc >/dev/null; then
    # Tried once: runc needs namespaces and cgroups, which some sandboxes lack.
    probe=$(mktemp -d "$WORK/probe.XXXXXX")
    runc_config "$probe" -- "$LDSO" --version
    if runc run --bundle "$probe" "${RUNC_PREFIX}probe" >/dev/null 2>"$probe/err"; then
      RUNTIME_KIND=runc
    else
      echo "   runc cannot run here ($(head -c 300 "$probe/err")): chroot instead"
    fi
    runc delete -f "${RUNC_PREFIX}probe" >/dev/null 2>&1 || true
  fi
fi

if [ "$RUNTIME_KIND" = runc ]; then
  # in_image [VAR=value ...] -- ARGS: runs ARGS in a runc container of the image (see
  # runc_config). It execs runc, which passes stdin and forwards signals to the
  # program: call it in $(...) or with &.
  in_image() {
    local bundle
    bundle=$(mktemp -d "$WORK/run.XXXXXX")
    runc_config "$bundle" "$@"
    exec runc run --bundle "$bundle" "${RUNC_PREFIX}${bundle##*.}"
  }
  RUN_DESC="runc $(runc --version | awk 'NR == 1 { print $3 }'), uid $IMG_UID, read-only root, no capabilities"
else
  # in_image [VAR=value ...] -- ARGS: chroot into the unpacked image, change to its
  # working directory, drop to its user (no supplementary groups), and exec ARGS with
  # only the image's environment plus the given variables. (chroot(8) has no working
  # directory option, hence Python.) It execs: call it in $(...) or with &, so the
  # background pid is the program's own.
  in_image() {
    local extra=()
    while [ "$1" != -- ]; do extra+=("$1"); shift; done
    shift
    exec env -i PATH=/usr/bin:/bin python3 -c '
import json, os, sys
root, uid, gid, cwd, env = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
n = int(sys.argv[6]); extra, args = sys.argv[7:7 + n], sys.argv[7 + n:]
os.chroot(root); os.chdir(cwd)
os.setgroups([]); os.setgid(gid); os.setuid(uid)
environ = dict(e.split("=", 1) for e in env + extra)
os.execve(args[0], args, environ)
' "$ROOTFS" "$IMG_UID" "$IMG_GID" "$IMG_CWD" "$IMG_ENV" "${#extra[@]}" "${extra[@]}" "$@"
  }
  # /proc, a minimal /dev, a /tmp, the home volume, and the host's /etc/resolv.conf
  # and /etc/hosts, as a container runtime gives them (`mailctl dev` exits without a
  # resolv.conf: its outbound relay needs one).
  mount -t proc proc "$ROOTFS/proc" && MOUNTS+=("$ROOTFS/proc")
  mount -t tmpfs -o mode=755,nosuid,size=1m dev "$ROOTFS/dev" && MOUNTS+=("$ROOTFS/dev")
  while read -r node major minor; do
    mknod -m 666 "$ROOTFS/dev/$node" c "$major" "$minor"
  done <<'EOF'
null 1 3
zero 1 5
full 1 7
random 1 8
urandom 1 9
tty 5 0
EOF
  mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$ROOTFS/tmp" && MOUNTS+=("$ROOTFS/tmp")
  mount --bind "$HOME_VOL" "$ROOTFS$IMG_CWD" && MOUNTS+=("$ROOTFS$IMG_CWD")
  for file in resolv.conf hosts; do
    mount --bind "/etc/$file" "$ROOTFS/etc/$file" && MOUNTS+=("$ROOTFS/etc/$file")
  done
  RUN_DESC="chroot, uid $IMG_UID"
fi

step "in the image ($RUN_DESC): every binary's libraries resolve"
for bin in "${BINS[@]}"; do
  libs=$(in_image -- "$LDSO" --list "/usr/local/bin/$bin" 2>&1) || die "$bin: $LDSO --list failed: $libs"
  if grep -q 'not found' <<<"$libs"; then
    echo "$libs" >&2
    die "$bin links a library the image does not have"
  fi
  printf '   %-18s %s\n' "$bin" "$(awk '{print $1}' <<<"$libs" | xargs -n1 basename | grep -v '^linux-vdso' | tr '\n' ' ')"
done

step "in the image: the default command (${IMG_ARGS[*]}) and every binary with --help"
out=$(in_image -- "${IMG_ARGS[@]}" 2>&1) || die "the image's default command failed: $out"
grep -q '^Usage:' <<<"$out" || die "the image's default command printed no usage: $out"
echo "   ${IMG_ARGS[*]}: exit 0, usage printed"
for bin in "${BINS[@]}"; do
  rc=0
  out=$(in_image -- "/usr/local/bin/$bin" --help 2>&1) || rc=$?
  if [ "$rc" = 0 ] && grep -q '^Usage:' <<<"$out"; then
    printf '   %-18s --help: exit 0, usage printed\n' "$bin"
  else
    echo "$out" >&2
    die "$bin --help in the image: exit $rc"
  fi
done

step "in the image: mailctl dev, smoke test over loopback (SMTP in, IMAP out)"
read -r P_ADMIN P_STORAGE P_SMTP P_SUBMISSION P_SUBMISSIONS P_IMAP P_IMAPS P_POP3 P_POP3S < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
DEV_ENV=(
  MAILMESH_PORTS__STORAGE="$P_STORAGE" MAILMESH_PORTS__SMTP="$P_SMTP"
  MAILMESH_PORTS__SUBMISSION="$P_SUBMISSION" MAILMESH_PORTS__SUBMISSIONS="$P_SUBMISSIONS"
  MAILMESH_PORTS__IMAP="$P_IMAP" MAILMESH_PORTS__IMAPS="$P_IMAPS"
  MAILMESH_PORTS__POP3="$P_POP3" MAILMESH_PORTS__POP3S="$P_POP3S"
  MAILCTL_ENDPOINT="https://127.0.0.1:$P_STORAGE"
)
in_image "${DEV_ENV[@]}" -- /usr/local/bin/mailctl dev --admin-listen "127.0.0.1:$P_ADMIN" \
  > "$WORK/dev.log" 2>&1 &
DEV_PID=$!
ready=0
for _ in $(seq 240); do
  kill -0 "$DEV_PID" 2>/dev/null || { cat "$WORK/dev.log" >&2; die "mailctl dev exited while starting"; }
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P_ADMIN/readyz" || true)" = 200 ]; then
    ready=1
    break
  fi
  sleep 0.5
done
[ "$ready" = 1 ] || { tail -30 "$WORK/dev.log" >&2; die "mailctl dev not ready within 120 s"; }
sed -n '/^mailmesh dev is running/,/^  submissions/p' "$WORK/dev.log" | sed 's/^/   | /'
PASSWORD=$(python3 -c 'import secrets; print("Smoke-" + secrets.token_urlsafe(18))')
admin() {
  local out
  out=$(in_image "${DEV_ENV[@]}" -- /usr/local/bin/mailctl "$@" 2>&1) || {
    echo "$out" >&2
    die "mailctl $* (in the image) failed"
  }
  echo "   mailctl $*: ok"
}
admin tenant add smoke
admin domain add smoke example.test
out=$(in_image "${DEV_ENV[@]}" -- /usr/local/bin/mailctl user add alice@example.test --password-stdin \
  2>&1 <<<"$PASSWORD") || { echo "$out" >&2; die "mailctl user add (in the image) failed"; }
echo "   mailctl user add alice@example.test --password-stdin: ok"
python3 - "$P_SMTP" "$P_IMAP" "$PASSWORD" <<'PY' || { tail -30 "$WORK/dev.log" >&2; die "the SMTP/IMAP smoke test failed (above: the end of mailctl dev's log)"; }
import imaplib, secrets, smtplib, ssl, sys, time
smtp_port, imap_port, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tls = ssl.create_default_context()
tls.check_hostname = False
tls.verify_mode = ssl.CERT_NONE  # dev's certificate is self-signed
token = secrets.token_hex(8)
msg = (f"From: Smoke <sender@example.org>\r\nTo: alice@example.test\r\n"
       f"Subject: image smoke {token}\r\nMessage-ID: <{token}@example.org>\r\n\r\n"
       f"sent into the image, token {token}\r\n")
with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
    s.ehlo("smoke.example.org")
    s.starttls(context=tls)
    s.ehlo("smoke.example.org")
    refused = s.sendmail("sender@example.org", ["alice@example.test"], msg)
    assert not refused, refused
print(f"   smtp  127.0.0.1:{smtp_port} STARTTLS: message {token} accepted")
deadline = time.time() + 60
with imaplib.IMAP4("127.0.0.1", imap_port, timeout=30) as m:
    m.starttls(ssl_context=tls)
    m.login("alice@example.test", password)
    while True:
        m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", f'"image smoke {token}"')
        if typ == "OK" and data[0].split():
            break
        if time.time() > deadline:
            sys.exit("the message did not arrive in INBOX within 60 s")
        time.sleep(0.5)
    num = data[0].split()[-1]
    typ, fetched = m.fetch(num, "(RFC822)")
    body = fetched[0][1].decode()
    assert f"token {token}" in body and "Received:" in body, body
    assert "Authentication-Results:" in body, "no Authentication-Results (auth-check):\n" + body
    m.logout()
print(f"   imap  127.0.0.1:{imap_port} STARTTLS: alice@example.test read it back ({len(body)} bytes,"
      " Received and Authentication-Results added)")
PY
step "stopping mailctl dev (SIGTERM)"
kill -TERM "$DEV_PID"
rc=0
wait "$DEV_PID" || rc=$?
DEV_PID=
[ "$rc" = 0 ] || { tail -20 "$WORK/dev.log" >&2; die "mailctl dev exited $rc on SIGTERM"; }
grep -q 'mailmesh dev stopped' "$WORK/dev.log" || die "mailctl dev did not log its clean stop"
echo "   stopped cleanly"
step "image OK: $OCI:$TAG $DIGEST, $(mib "$PACKED") MiB"
