#!/usr/bin/env bash
# End-to-end benchmark: provisions the Rust SecantusDB server (the faster MongoDB stand-in;
# about 9 minutes to build once), builds ordo in release mode, and runs ordo-bench, which prints
# a JSON summary and writes target/ordo-bench/{summary.json,chart.svg}.
# Arguments go to ordo-bench (try --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/provision.sh
tools="$root/.ordo/tools"
if [ ! -x "$tools/bin/secantusd-rs" ]; then
  if ! command -v cmake >/dev/null; then
    echo "bench: installing cmake (needed to build SecantusDB's storage engine)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq cmake; else sudo apt-get install -y cmake; fi
  fi
  echo "bench: building secantusd-rs into $tools (once)" >&2
  cargo install secantus-mdb --version =0.5.3-beta.196 --locked --ignore-rust-version \
    --root "$tools" --target-dir "$root/target/secantus"
fi
cargo build --release --locked -p ordo-producer -p ordo-projector -p ordo-e2e --bins
exec target/release/ordo-bench --secantus-bin "$tools/bin/secantusd-rs" "$@"
