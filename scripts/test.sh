#!/usr/bin/env bash
# The test command (README and CI run exactly this): starts the real backends if they
# are not running, then the whole gate: format, lints, every test against real Kafka,
# S3 and Redis as well as the embedded backends, and the chart checks.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/backends.sh start
eval "$(scripts/backends.sh env)"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
# cargo-nextest runs them: installed (pinned) on a machine that has none.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest (once per machine)"
  cargo install --locked cargo-nextest@0.9.143
fi
cargo nextest run --workspace --locked --profile ci
# Doc tests (nextest does not run them).
cargo test --workspace --locked --doc -q

echo "== chart"
scripts/chart-check.sh

echo "== licences"
scripts/licenses.py

echo "== advisories (the RustSec snapshot in supply-chain/advisory-db)"
scripts/advisories.py

echo "== runtime image dependencies"
scripts/image-deps.sh

echo "== the runtime image, built and run here (debug binaries)"
scripts/image.sh --profile debug

echo "== the new-user trial: mailctl dev with swaks, smtplib, imaplib, poplib, curl, mutt"
# image-deps.sh built the binaries; the trial uses that mailctl.
MAILCTL="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/mailctl" \
  scripts/trial.sh

echo "all checks passed"
