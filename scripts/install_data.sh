#!/usr/bin/env bash
# Install the real image data used by the data-path tests and examples (Debian bookworm packages).
#   dataset-fashion-mnist        70,000 labelled 28x28 grayscale images (IDX .gz) in /usr/share/datasets/fashion-mnist
#   opencv-doc, *-backgrounds,   ~150 real JPEG photos: grayscale, 4:2:0 / 4:2:2 / 4:4:4, progressive
#   *-wallpapers
# Idempotent: packages already at the pinned version are left alone. Needs root (or sudo).
set -euo pipefail

PACKAGES=(
  "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
  "opencv-doc=4.6.0+dfsg-12"
  "mate-backgrounds=1.26.0-1"
  "plasma-workspace-wallpapers=4:5.27.5-2"
  "lomiri-wallpapers-20.04=20.04.0-2"
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for spec in "${PACKAGES[@]}"; do
  name="${spec%%=*}"; version="${spec#*=}"
  installed="$(dpkg-query -W -f='${Status} ${Version}' "$name" 2>/dev/null || true)"
  if [ "$installed" != "install ok installed $version" ]; then missing+=("$spec"); fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_data.sh: all data packages already installed"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
  # A newer Debian point release may have replaced a pinned version: fall back to the candidate.
  echo "install_data.sh: pinned versions unavailable, installing the current candidates" >&2
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]%%=*}"
fi
echo "install_data.sh: installed ${missing[*]%%=*}"
