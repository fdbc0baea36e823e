#!/bin/sh
# The boot-path benchmark (docs/benchmark.md): sets up, then prints a table of medians.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m tests.bench "$@"
