#!/usr/bin/env bash
# Side-by-side benchmark: every workload shape (hot aggregates, churn, steady load; each without
# and with a 3 ms broker round trip) through ordo and through the seed design it replaces
# (bench/seed-baseline, Node with Microsoft's SDK), on the same stand-ins and events.
#
# Builds ordo in release mode, installs the seed design's Node packages (npm ci), builds the
# Rust SecantusDB once (about 10 minutes; needs cmake, which the script installs with apt-get),
# and runs ordo-bench, which prints a table and the goals and writes
# target/ordo-bench/{summary.json,chart.svg}.
#
#   scripts/bench.sh                         # everything (about 6 minutes on 2 cores, once built)
#   scripts/bench.sh --shapes hot,churn      # some shapes
#   scripts/bench.sh --round-trip-ms 0       # without the added round trip
#   scripts/bench.sh --no-seed               # ordo alone
#   scripts/bench.sh --python-secantus ...   # MongoDB stand-in: the Python SecantusDB, which
#                                            # needs no build but runs on one core (650 guarded
#                                            # updates/s against 3,900-5,800): every row then
#                                            # measures that server, not ordo (about 10 minutes)
# Other arguments go to ordo-bench (see target/release/ordo-bench --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rust_secantus=1
args=()
for a in "$@"; do
  case "$a" in
    --python-secantus) rust_secantus=0 ;;
    --rust-secantus) rust_secantus=1 ;; # the default; kept so older command lines still run
    *) args+=("$a") ;;
  esac
done
bash scripts/provision.sh
tools="$root/.ordo/tools"
if [ "$rust_secantus" = 1 ] && [ ! -x "$tools/bin/secantusd-rs" ]; then
  if ! command -v cmake >/dev/null; then
    echo "bench: installing cmake (needed to build SecantusDB's storage engine)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq cmake; else sudo apt-get install -y cmake; fi
  fi
  echo "bench: building secantusd-rs into $tools (once)" >&2
  cargo install secantus-mdb --version =0.5.3-beta.196 --locked --ignore-rust-version \
    --root "$tools" --target-dir "$root/target/secantus"
fi
if [ "$rust_secantus" = 1 ]; then
  args=(--secantus-bin "$tools/bin/secantusd-rs" "${args[@]}")
else
  # The Python server, even when a secantusd-rs was built: say which one ran.
  args=(--secantus-bin /nonexistent "${args[@]}")
fi
seed="$root/bench/seed-baseline"
stamp="$seed/node_modules/.ordo-installed-package-lock.json"
if ! cmp -s "$seed/package-lock.json" "$stamp"; then
  command -v node >/dev/null || { echo "bench: Node 18+ is required for the seed design" >&2; exit 1; }
  (cd "$seed" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$seed/package-lock.json" "$stamp"
fi
cargo build --release --locked -p ordo-producer -p ordo-projector -p ordo-e2e --bins
exec target/release/ordo-bench --seed-dir "$seed" "${args[@]}"
