#!/usr/bin/env bash
# The runtime image (Dockerfile: gcr.io/distroless/cc-debian12) holds glibc, libgcc,
# libstdc++, OpenSSL and CA certificates, nothing else: every binary it ships may link
# only those. This builds the binaries (debug, as the tests do) and checks each with
# ldd, so a new C dependency (zlib was one) fails here instead of at pod start-up.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --locked -q
DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug
allowed='^(linux-vdso|libc|libm|libgcc_s|libstdc\+\+|libssl|libcrypto|libpthread|libdl|librt|ld-linux[-a-z0-9_]*)\.so'
bad=0
# The binaries the image ships: image/binaries (the Dockerfile and scripts/image.sh
# read it too).
mapfile -t bins < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' image/binaries | grep -v '^$')
[ "${#bins[@]}" -gt 0 ] || { echo "image/binaries lists no binary" >&2; exit 1; }
for bin in "${bins[@]}"; do
  while read -r lib; do
    if ! [[ $lib =~ $allowed ]]; then
      echo "$bin links $lib, which the runtime image does not have" >&2
      bad=1
    fi
  done < <(ldd "$DIR/$bin" | awk '{print $1}' | xargs -n1 basename)
done
[ "$bad" -eq 0 ] && echo "every binary links only what the runtime image has"
exit "$bad"
