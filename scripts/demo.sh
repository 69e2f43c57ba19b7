#!/usr/bin/env bash
# The main job: train a small MLP with dp x tp on a simulated 8-device mesh.
source "$(dirname "$0")/env.sh"
exec python -m shardfn.demo "$@"
