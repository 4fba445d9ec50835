"""Scratch: ml-l3m's recorded outputs vs aim-megatron on the imported checkpoint (same weights, input)."""
import sys
from pathlib import Path
import torch
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint.convert import SINGLE_PROCESS
from aim_megatron.distributed import parallel
from aim_megatron.models.aim import loss_mask
run, refp = Path(sys.argv[1]), Path(sys.argv[2])
step = checkpoint.resolve(run / "checkpoints")
cfg = checkpoint.config_from_checkpoint(step, SINGLE_PROCESS)
parallel.initialize(cfg)
(model,) = parallel.build_model(cfg, wrap_ddp=False)
checkpoint.load(step, cfg, [model]); model.eval()
ref = torch.load(refp, weights_only=True)
with torch.no_grad():
    errors = model(ref["images"], ref["prefix_len"])
    mask = loss_mask(ref["prefix_len"], cfg.model.num_patches)
    loss = (errors * mask).sum() / mask.sum()
    feats = torch.stack([model.block_features(ref["images"], [i]) for i in range(cfg.model.num_layers)])
rl = abs(loss.item() - ref["loss"].item()) / abs(ref["loss"].item())
rf = ((feats - ref["block_features"]).abs().max() / ref["block_features"].abs().max()).item()
print(f"loss ours {loss.item():.8f} l3m {ref['loss'].item():.8f} rel diff {rl:.2e}; "
      f"per-block features max|diff|/max|ref| {rf:.2e} (eps {cfg.model.layernorm_eps})")
parallel.shutdown()
