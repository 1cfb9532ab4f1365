#!/usr/bin/env bash
# Builds the Release tree and runs the demo; all arguments are passed on to polyattn_demo.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ! -f $root/examples/polyattn_demo.cpp ]]; then
  echo "demo.sh: there is no demo yet (examples/polyattn_demo.cpp does not exist)." >&2
  exit 1
fi

bash "$root/scripts/install-deps.sh"
cmake -S "$root" -B "$root/build/release" -DCMAKE_BUILD_TYPE=Release -DPOLYATTN_NATIVE=ON
cmake --build "$root/build/release" -j2 --target polyattn_demo
exec "$root/build/release/examples/polyattn_demo" "$@"
