#!/usr/bin/env bash
# Scratch environment that runs apple/ml-l3m's own AIM v1 modules next to aim-megatron, outside the
# repository (nothing of ml-l3m is committed or installed here): its src/ from a clone, its imports
# (omegaconf, hydra-core; timm only for to_2tuple/DropPath/weight-init helpers, taken from the timm
# wheel because timm's package import needs a torchvision matching our CPU torch), and empty
# package __init__.py files so `import l3m.model...` does not pull in its data/LLM/wandb stack.
# usage: tools/l3m_crosscheck/setup.sh ML_L3M_GIT_DIR [SCRATCH=/tmp/l3m-scratch]
set -euo pipefail
src_git=$1
scratch=${2:-/tmp/l3m-scratch}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$scratch/wheels" "$scratch/deps/timm/layers"
cd "$scratch"
git --git-dir="$src_git" archive HEAD src configs/aimv1 | tar -x
cp configs/aimv1/001_aim_v1_600M.yaml .
pip download -q --no-deps -d wheels timm omegaconf 'antlr4-python3-runtime==4.9.3' 'hydra-core==1.3.2'
pip install -q --no-deps --target deps wheels/omegaconf-* wheels/antlr4* wheels/hydra_core-*
timm_whl=$(ls wheels/timm-*.whl)
for f in helpers drop weight_init; do unzip -q -o -j "$timm_whl" "timm/layers/$f.py" -d deps/timm/layers; done
: > deps/timm/__init__.py
printf 'from .helpers import to_2tuple\nfrom .drop import DropPath\nfrom .weight_init import trunc_normal_, variance_scaling_\n' \
    > deps/timm/layers/__init__.py
for p in src/l3m src/l3m/model src/l3m/model/layers src/l3m/model/preprocessors src/l3m/model/trunks \
         src/l3m/model/heads src/l3m/helpers src/l3m/helpers/dist src/l3m/loss src/l3m/optim src/l3m/data; do
    : > "$p/__init__.py"
done
cp "$here/run_l3m.py" "$here/l3m_forward.py" .
echo "ready: cd $scratch && PYTHONPATH=deps:src:. python run_l3m.py out_tiny tiny"
