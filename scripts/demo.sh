#!/usr/bin/env bash
# The main job on a fresh machine: real MNIST, offline (see README.md).
source "$(dirname "$0")/env.sh"
exec python -m hmtconv demo "$@"
