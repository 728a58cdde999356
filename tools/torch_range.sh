#!/usr/bin/env bash
# Run the test suite on another torch release, in a virtual environment of its own.
#
#   bash tools/torch_range.sh TORCH TORCHVISION [VENV] [PYTEST ARGS...]
#   bash tools/torch_range.sh 2.11.0 0.26.0
#   bash tools/torch_range.sh 2.13.0 0.28.0 /tmp/venv-2.13 -x tests/optim
#   PYTHON=python3.10 bash tools/torch_range.sh 2.14.1 0.29.1 .venv-py310
#
# TORCH and TORCHVISION must be a matching pair (torchvision's release notes list them):
# 2.11/0.26, 2.12/0.27, 2.13/0.28, 2.14/0.29. The environment (default:
# .venv-torch-TORCH) is created when missing and reused after; the repository's own
# constraints.txt is not used, a file pinning the two releases is written into the
# environment instead. A wheel of the same release with a local label (such as
# 2.13.0+cpu) also satisfies the pin, so the suite then runs on that build. PYTHON names
# the interpreter of a new environment (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -lt 2 ]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
torch_version=$1 vision_version=$2
venv=${3:-.venv-torch-$torch_version}
shift $(( $# >= 3 ? 3 : 2 ))

[ -d "$venv" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
printf 'torch==%s\ntorchvision==%s\n' "$torch_version" "$vision_version" > "$venv/constraints.txt"
pip install -q -c "$venv/constraints.txt" -e ".[test]"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python -m pytest -q -p no:cacheprovider "$@"
