#!/bin/sh
# The whole test suite, from a fresh Debian machine: sets up, then runs pytest as root.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
