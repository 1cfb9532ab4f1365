#!/usr/bin/env bash
# Installs the Debian packages polyattn needs; does nothing (and needs no network) when all are present.
set -euo pipefail

# clang and libomp-dev: the ThreadSanitizer stage (LLVM's OpenMP runtime is instrumented for it; GCC's is not).
# libopenmpi-dev and openmpi-bin: polyattn::mpi (parallel/distributed.hpp) and its tests under mpirun.
# ninja-build: the test command's generator (it keeps both cores busy across targets, where make waits for a
# library before compiling the tests that link it).
# python3-dev: Python.h for the extension module of the Python package (python/).
# pybind11-dev: the C++ headers and CMake package the extension module is built with.
# python3-pybind11: pybind11 for Debian's python3 (its CMake helper finds the interpreter's settings through it).
# python3-numpy: the arrays the module takes and returns.
# python3-pytest: the runner of the Python tests (tests/python), called by ctest.
# python3-torch: polyattn.torch, its tests and the PyTorch example and benchmark.
# libopenblas0-openmp: the BLAS numpy and torch load, built on the same OpenMP runtime as polyattn (libgomp), so
# that one process does not run two thread pools (the pthread build's) side by side.
packages=(cmake g++ ninja-build libeigen3-dev catch2 libbenchmark-dev gnuplot-nox clang libomp-dev libopenmpi-dev
          openmpi-bin python3-dev pybind11-dev python3-pybind11 python3-numpy python3-pytest python3-torch
          libopenblas0-openmp)

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
