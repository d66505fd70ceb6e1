#!/usr/bin/env bash
# Installs everything Prelabel needs on a fresh Debian/Ubuntu machine, idempotently:
#   system packages (the Python shared library that Triton's python-backend stub links), a virtual
#   environment in .venv, and Prelabel itself (editable). `--test` adds what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
packages=()
ldconfig -p | grep -q "libpython${pyver}.so.1.0" || packages+=("libpython${pyver}")
if [[ "${1:-}" == "--test" ]]; then
  command -v redis-server >/dev/null || packages+=(redis-server)
  command -v promtool >/dev/null || packages+=(prometheus)          # promtool check metrics/rules
  command -v kubectl >/dev/null || packages+=(kubernetes-client)    # kubectl kustomize
  command -v chromium >/dev/null || packages+=(chromium)            # the Label Studio browser test
fi
if ((${#packages[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing system packages: ${packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
extra="[embedded]"; [[ "${1:-}" == "--test" ]] && extra="[embedded,test]"
echo "setup: installing Prelabel${extra} into .venv (torch takes a minute the first time)"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extra}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import prelabel, torch, tritonclient.grpc, pytriton" \
  || { echo "setup: the installation is incomplete; see pip's output above" >&2; exit 1; }
if [[ "${1:-}" == "--test" && ! -x .venv-labelstudio/bin/label-studio ]]; then
  # A real Label Studio for tests/test_labelstudio.py, in a virtualenv of its own (its pins clash with ours).
  echo "setup: installing label-studio into .venv-labelstudio (about a minute, 1 GB)"
  "$python" -m venv .venv-labelstudio
  .venv-labelstudio/bin/pip install --quiet --disable-pip-version-check "label-studio==1.23.2" 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv-labelstudio/bin/python -c "import label_studio" \
    || { echo "setup: label-studio did not install; see pip's output above" >&2; exit 1; }
fi
if [[ "${1:-}" == "--test" && ! -x .venv-numpy2/bin/python ]]; then
  # numpy 2 laid over .venv's packages, for tests/test_numpy2.py: Triton's python backend with numpy 2.
  echo "setup: making .venv-numpy2 (numpy 2 over .venv)"
  "$python" -m venv .venv-numpy2
  .venv-numpy2/bin/pip install --quiet --disable-pip-version-check "numpy>=2,<3"
  purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
  echo "import site; site.addsitedir('$(.venv/bin/python -c "$purelib")')" \
    > "$(.venv-numpy2/bin/python -c "$purelib")/zz-prelabel-venv.pth"
  .venv-numpy2/bin/python -c "import numpy, prelabel, torch; assert numpy.__version__ >= '2'" \
    || { echo "setup: .venv-numpy2 is not usable" >&2; exit 1; }
fi
echo "setup: done"
