#!/usr/bin/env bash
# Checks the Helm chart and keeps k8s/ in sync with it.
#
#   scripts/chart-check.sh           # lint, schema, render, validate, diff against k8s/
#   scripts/chart-check.sh --update  # regenerate k8s/ from the chart
#
# Needs helm and kubernetes-validate (scripts/backends.sh install puts them in
# $MAILMESH_TOOLS).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${MAILMESH_TOOLS:-$HOME/.cache/mailmesh-tools}
export PATH="$TOOLS/bin:$TOOLS/venv/bin:$PATH"

CHART=charts/mailmesh
VALUES=$CHART/ci/test-values.yaml
RENDERED=k8s/mailmesh.yaml
KUBE_VERSION=1.33.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

render() {
  {
    echo "# Rendered from $CHART with $VALUES by scripts/chart-check.sh --update."
    echo "# Do not edit: CI fails when this differs from the chart's output."
    helm template mailmesh "$CHART" --namespace mail -f "$VALUES" "$@"
  }
}

if [ "${1:-}" = "--update" ]; then
  render >"$RENDERED"
  echo "wrote $RENDERED"
  exit 0
fi

echo "== helm lint --strict"
helm lint --strict "$CHART" -f "$VALUES"

echo "== required values are enforced"
if helm template mailmesh "$CHART" >"$work/out" 2>&1; then
  echo "helm template succeeded without kafka.brokers and s3.bucket" >&2
  exit 1
fi
grep -q "kafka/brokers" "$work/out" || { cat "$work/out" >&2; exit 1; }
# No mailDomain: no host names to give (never *.localhost), so nothing renders.
for without in "-f $VALUES --set mailDomain=" "--set kafka.brokers=kafka:9092 --set s3.bucket=mail --set redis.urlSecret=redis --set tls.secretName=mail-tls"; do
  # shellcheck disable=SC2086 # $without is a list of arguments
  if helm template mailmesh "$CHART" $without >"$work/out" 2>&1; then
    echo "helm template succeeded without mailDomain ($without)" >&2
    exit 1
  fi
  grep -qF "mailDomain is required: the hosts are mx.<mailDomain> (MX), smtp.<mailDomain> (submission) and mail.<mailDomain> (IMAP/POP3)" "$work/out" ||
    { cat "$work/out" >&2; exit 1; }
done

echo "== the schema rejects wrong types"
if helm template mailmesh "$CHART" -f "$VALUES" --set-json 'admin={"port":"9090"}' >"$work/out" 2>&1; then
  echo "a string admin.port was accepted" >&2
  exit 1
fi
if helm template mailmesh "$CHART" -f "$VALUES" --set kafka.topic.partitions=0 >"$work/out" 2>&1; then
  echo "kafka.topic.partitions=0 was accepted" >&2
  exit 1
fi

echo "== rendered manifests validate (Kubernetes $KUBE_VERSION, strict)"
render >"$work/rendered.yaml"
kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$work/rendered.yaml"
# Defaults plus only the required values render and validate too.
helm template mailmesh "$CHART" --set kafka.brokers=kafka:9092 --set s3.bucket=mail \
  --set redis.urlSecret=redis --set tls.secretName=mail-tls --set mailDomain=example.com >"$work/minimal.yaml"
kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$work/minimal.yaml"

echo "== NOTES warn about an unsealed DKIM key store and certificate names missing a host"
notes() {
  helm install mailmesh "$CHART" --namespace mail --dry-run=client "$@" | sed -n '/^NOTES:/,$p'
}
notes --set kafka.brokers=kafka:9092 --set s3.bucket=mail --set redis.urlSecret=redis \
  --set tls.secretName=mail-tls --set mailDomain=example.com >"$work/notes"
grep -qF "WARNING: storage.dkimKeySecret is not set" "$work/notes" ||
  { cat "$work/notes" >&2; echo "no warning without storage.dkimKeySecret" >&2; exit 1; }
notes -f "$VALUES" --set 'tls.certManager.dnsNames={mx.example.com,smtp.example.com,mail.example.com}' >"$work/notes"
if grep -q "WARNING" "$work/notes"; then
  cat "$work/notes" >&2; echo "warnings with storage.dkimKeySecret and every host named" >&2; exit 1
fi
notes -f "$VALUES" --set 'tls.certManager.dnsNames={mx.example.com}' >"$work/notes"
grep -qF "WARNING: tls.certManager.dnsNames does not name smtp.example.com, mail.example.com" "$work/notes" ||
  { cat "$work/notes" >&2; echo "no warning for certificate names missing hosts" >&2; exit 1; }

echo "== a service's settings roll only its own pods"
render --set storage.snapshotEvery=12345 >"$work/changed.yaml"
python3 - "$work/rendered.yaml" "$work/changed.yaml" <<'PY'
import sys, yaml
def checksums(path):
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "Deployment"}
before, after = checksums(sys.argv[1]), checksums(sys.argv[2])
assert len(before) >= 6, before
moved = sorted(name for name in before if before[name] != after[name])
assert moved == ["mailmesh-storage"], f"a storage setting rolls {moved}"
PY

echo "== the generated internal certificates chain to the CA and name one role each"
mkdir "$work/pki"
python3 - "$work/minimal.yaml" "$work/pki" <<'PY'
import base64, sys, yaml
rendered, out = sys.argv[1], sys.argv[2]
for doc in yaml.safe_load_all(open(rendered)):
    name = (doc or {}).get("metadata", {}).get("name", "")
    if doc and doc["kind"] == "Secret" and name.startswith("mailmesh-internal-") and name != "mailmesh-internal-ca":
        role = name[len("mailmesh-internal-"):]
        for key, file in (("tls.crt", f"{role}.crt"), ("tls.key", f"{role}.key"), ("ca.crt", "ca.crt")):
            open(f"{out}/{file}", "wb").write(base64.b64decode(doc["data"][key]))
PY
for role in storage auth-check smtp-ingress submission delivery-worker gateway admin; do
  for purpose in sslclient sslserver; do
    openssl verify -CAfile "$work/pki/ca.crt" -purpose "$purpose" "$work/pki/$role.crt" >/dev/null
  done
  openssl x509 -in "$work/pki/$role.crt" -noout -ext subjectAltName | grep -qx "    DNS:$role.mailmesh.internal" ||
    { echo "$role.crt does not name $role.mailmesh.internal" >&2; exit 1; }
done

echo "== k8s/ is in sync with the chart"
if ! diff -u "$RENDERED" "$work/rendered.yaml"; then
  echo "k8s/ is stale: run scripts/chart-check.sh --update" >&2
  exit 1
fi
echo "chart checks passed"
