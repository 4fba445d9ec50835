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
# They stay unpinned because the image's pip constraint file (PIP_CONSTRAINT) pins what it ships.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "megatron-core==0.16.1" safetensors scipy matplotlib

COPY . .
# --no-deps: never let pip replace the image's CUDA build of torch.
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import aim_megatron.config, aim_megatron.scaling, megatron.core"

CMD ["python", "-m", "aim_megatron.train", "--help"]
