#!/usr/bin/env bash
# The main job on a fresh machine: real MNIST, offline (see README.md). Paths given to it (--out)
# are the caller's: env.sh works in the repository, the demo where it was started.
caller=$PWD
source "$(dirname "$0")/env.sh"
cd "$caller"
exec python -m hmtconv demo "$@"
