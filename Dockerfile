# aim-megatron on NVIDIA's PyTorch container, which already carries PyTorch, Transformer Engine,
# apex, DALI and NCCL for Hopper. Build and run: see docs/slurm.md ("Container").
#   docker build -t aim-megatron:0.1 .
FROM nvcr.io/nvidia/pytorch:25.10-py3

# Megatron needs one hardware queue per GPU to overlap tensor-parallel communication.
ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_AVOID_RECORD_STREAMS=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/aim-megatron

# Dependencies in their own layer so source edits rebuild only the last steps. megatron-core is
# the only one the image lacks for sure; the rest of setup.py's list (numpy, pyyaml, psutil,
# tensorboard, tqdm, pillow, ...) ships with it, and the three below are no-ops when present.
# They stay unpinned because the image's pip constraint file (PIP_CONSTRAINT,
# /etc/pip/constraint.txt since 25.03) pins what it ships. megatron-core 0.16.1 declares
# torch>=2.6, numpy and packaging>=24.2, all in the image: --no-deps keeps pip from re-resolving
# the image's CUDA torch or its pinned packaging; the versions are printed for the build log
# (docs/gpu.md, "Dockerfile and the image's pip constraints").
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps "megatron-core==0.16.1" \
 && pip install --no-cache-dir safetensors scipy matplotlib \
 && python -c "import torch, packaging, megatron.core as m; print('torch', torch.__version__, '| packaging', packaging.__version__, '| megatron-core', m.__version__)"

COPY . .
# --no-deps: never let pip replace the image's CUDA build of torch.
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import aim_megatron.config, aim_megatron.scaling, megatron.core"

CMD ["python", "-m", "aim_megatron.train", "--help"]
