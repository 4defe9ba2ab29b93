#!/usr/bin/env bash
# compute-sanitizer over the GPU kernel tests: memcheck (out-of-bounds / misaligned accesses, leaks of device errors)
# and racecheck (shared-memory hazards). Run on a GPU machine after building:
#     bash tests/sanitize.sh [pytest -k expression]      (default: every kernel test, CUDA graphs excluded)
# Exits non-zero if any tool reports an error.
set -u
expr="${1:-kernel and not graph}"
status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool  (-k '$expr')"
  compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
    python3 -m pytest tests -q -x -p no:cacheprovider -m gpu -k "$expr" 2>&1 | tail -15
  rc=${PIPESTATUS[0]}
  echo "== $tool exit code: $rc"
  [ "$rc" -ne 0 ] && status=1
done
exit $status
