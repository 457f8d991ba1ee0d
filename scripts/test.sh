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

echo "== runtime image dependencies"
scripts/image-deps.sh

echo "all checks passed"
