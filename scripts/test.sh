#!/usr/bin/env bash
# The test suite (fast checks; `-m slow` runs the long end-to-end ones).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
