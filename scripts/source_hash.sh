#!/usr/bin/env bash
# Prints one SHA-256 over the files the library is built from (csrc/, cmake/, CMakeLists.txt,
# VERSION), by path and content: scripts/build_prebuilt.sh records it beside a prebuilt
# library and scripts/gpu_check.sh uses that library only when its working tree gives the
# same value (else it builds: a library built from other sources would be tested instead).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find csrc cmake CMakeLists.txt VERSION -type f -print0 | LC_ALL=C sort -z |
  xargs -0 sha256sum | sha256sum | cut -d' ' -f1
