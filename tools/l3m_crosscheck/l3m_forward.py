"""Scratch: load an exported file the way ml-l3m loads model.checkpoint (run/runner.py:
prepare_and_load_checkpoints, then load_state_dict(strict=False)), report missing/unexpected keys,
and record ml-l3m's loss and per-block features on the input of a reference_outputs.pt."""
import sys
import torch
from l3m.helpers import checkpoint as ckpt_helpers
from l3m.loss.mae_loss import RasterPixelLoss
from run_l3m import build

weights, inputs, out, size = sys.argv[1:5]
model, n, img, p = build(size)
status = model.load_state_dict(ckpt_helpers.prepare_and_load_checkpoints({"checkpoint": weights}), strict=False)
print("l3m load_state_dict(strict=False):", status)
assert not status.missing_keys and not status.unexpected_keys
model.eval()
ref = torch.load(inputs, weights_only=True)
loss_fn = RasterPixelLoss(read_key="image_preds", norm_pix_loss=True, mask_read_key="encoder_prefix_mask",
                          patch_size=p, image_size=img)
mask = torch.arange(n)[None, :] >= ref["prefix_len"][:, None]
with torch.no_grad():
    loss = loss_fn(model({"image": ref["images"], "encoder_prefix_mask": mask}))
    loss = loss[0] if isinstance(loss, tuple) else loss
    feats = model({"image": ref["images"], "encoder_prefix_mask": torch.zeros_like(mask)})["image_tokens_trunk"]
torch.save({"images": ref["images"], "prefix_len": ref["prefix_len"], "loss": loss,
            "block_features": torch.stack(feats)}, out)
print("l3m loss", float(loss))
