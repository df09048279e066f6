# Sourced by the benchmarks: $repo, $work (the script's first argument, else target/bench; made
# and made absolute) and $kiln, a release build made fresh.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$repo/target/bench}
mkdir -p "$work"
work=$(cd "$work" && pwd)
kiln=$repo/target/release/kiln
(cd "$repo" && cargo build --release --quiet)
