#!/usr/bin/env bash
# The whole test suite: property tests on the simulated mesh plus real gloo processes.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
