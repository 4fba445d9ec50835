#!/usr/bin/env bash
# Set up everything aim-megatron needs on a fresh Debian/Python 3.11 machine (CPU):
# Debian packages (real image data, shellcheck, slurm-wlm + munge) and the pinned Python packages.
# Idempotent and quick when everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

bash scripts/install_data.sh

if ! dpkg-query -W -f='${Status}' shellcheck 2>/dev/null | grep -q "install ok installed"; then
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends shellcheck=0.9.0-1 \
    || $SUDO apt-get install -y -qq --no-install-recommends shellcheck
fi

# A real local Slurm cluster for tests/test_slurm_real.py (scripts/slurm_cluster.sh starts it).
if ! dpkg-query -W -f='${Status}' slurm-wlm 2>/dev/null | grep -q "install ok installed" \
    || ! dpkg-query -W -f='${Status}' munge 2>/dev/null | grep -q "install ok installed"; then
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm=22.05.8-4+deb12u3 munge=0.5.15-2+deb12u1 \
    || $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge
fi

"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps -e .
echo "setup.sh: environment ready"
