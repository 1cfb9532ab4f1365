#!/usr/bin/env bash
# Installs the Debian packages polyattn needs; does nothing (and needs no network) when all are present.
set -euo pipefail

# clang and libomp-dev: the ThreadSanitizer stage (LLVM's OpenMP runtime is instrumented for it; GCC's is not).
# libopenmpi-dev and openmpi-bin: polyattn::mpi (parallel/distributed.hpp) and its tests under mpirun.
# ninja-build: the test command's generator (it keeps both cores busy across targets, where make waits for a
# library before compiling the tests that link it).
packages=(cmake g++ ninja-build libeigen3-dev catch2 libbenchmark-dev gnuplot-nox clang libomp-dev libopenmpi-dev
          openmpi-bin)

missing=()
for package in "${packages[@]}"; do
  # `dpkg -s` also succeeds for removed packages whose config files remain, so check the status.
  dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$package")
done
(( ${#missing[@]} == 0 )) && exit 0

echo "install-deps: installing ${missing[*]}"
sudo=()
(( EUID == 0 )) || sudo=(sudo)
# Passed through env because sudo resets the environment.
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
