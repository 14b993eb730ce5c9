#!/bin/bash
# A prebuilt llama.cpp (CPU, Linux x86-64) for benchmarks/llamacpp_control_vector.py: the
# native libraries that node-llama-cpp publishes on npm (libllama + ggml's per-CPU-family
# backends, built on Ubuntu 22.04: glibc >= 2.34). Unpacked to ./llamacpp/bins/linux-x64.
set -euo pipefail
version=${1:-3.22.1}
tmp=$(mktemp -d)
(cd "$tmp" && npm pack --silent "@node-llama-cpp/linux-x64@${version}" >/dev/null)
mkdir -p llamacpp
tar -xzf "$tmp"/node-llama-cpp-linux-x64-"${version}".tgz -C llamacpp --strip-components=1
rm -rf "$tmp"
ls llamacpp/bins/linux-x64/libllama*.so
