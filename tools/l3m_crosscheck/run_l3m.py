"""Scratch (not part of aim-megatron): build ml-l3m's AIM v1 with its own classes at a small size,
initialise it as run/runner.py does (meta device, FSDP2 via l3m.helpers.dist.fsdp.init_fsdp2,
to_empty, init_parameters), take one AdamW step with its RasterPixelLoss, save it exactly as
src/l3m/evaluator.py does (DistributedCheckpointUtils.save + save_on_master of the gathered
state), then record loss and per-block features on a fixed input.

usage: python run_l3m.py OUTDIR SIZE   (SIZE: tiny | small)
"""
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh

from l3m.helpers.checkpoint import DistributedCheckpointUtils, save_on_master
from l3m.helpers.dist import fsdp
from l3m.helpers.utils import init_parameters
from l3m.helpers.vision.mask_generator import RandomRasterMasking
from l3m.loss.mae_loss import RasterPixelLoss
from l3m.model.heads.simple_decoder import SimpleDecoder
from l3m.model.layers.attention import GenericAttention
from l3m.model.layers.misc import GenericIdentity
from l3m.model.layers.normalization import LayerNormFP32
from l3m.model.meta_models import MetaModel
from l3m.model.preprocessors.mask_builders import PrefixAttentionMaskBuilder
from l3m.model.preprocessors.vision import PatchEmbed, ViTPreprocessor
from l3m.model.trunks.transformer import Transformer
from l3m.model.utils import MultiBlock

SIZES = {  # image, patch, width, depth, heads, head width, head ffn, head blocks
    "tiny": (16, 4, 32, 4, 4, 32, 64, 2),
    "small": (64, 8, 128, 4, 4, 256, 1024, 2),
}


def build(size):
    img, p, d, depth, heads, hd, hffn, hblocks = SIZES[size]
    n = (img // p) ** 2
    norm = partial(LayerNormFP32, eps=1e-5)
    # The module tree of configs/aimv1/001_aim_v1_600M.yaml, sizes scaled down; the mask builder is
    # the dense PrefixAttentionMaskBuilder (same mask, SDPA instead of compiled flex attention; it
    # holds no weights, so the state dict is the config's).
    pre = MultiBlock([
        ViTPreprocessor(read_key="image", write_key="image_tokens",
                        patchifier=PatchEmbed(img_size=img, patch_size=p, in_chans=3, embed_dim=d, norm_layer=norm),
                        pos_embed_type="sincos", drop_patches=False, cls_token=False),
        PrefixAttentionMaskBuilder(read_key="encoder_prefix_mask", write_key="encoder_prefix_attn_mask", seq_len=n),
    ])
    trunk = Transformer(read_key="image_tokens", write_key="image_tokens",
                        self_attn_mask_read_key="encoder_prefix_attn_mask", embed_dim=d, num_blocks=depth,
                        mlp_ratio=4, norm_layer=norm,
                        attn_target=partial(GenericAttention, dim=d, num_heads=heads, qkv_bias=False,
                                            use_flex_attention=False),
                        weight_init_style="xavier_uniform", post_trunk_norm=True, use_bias=False)
    head = SimpleDecoder(read_key="image_tokens", write_key="image_preds", attn_target=partial(GenericIdentity),
                         input_dim=d, embed_dim=hd, output_dim=p * p * 3, num_layers=hblocks,
                         mlp_hidden_dim=hffn, norm_layer=norm, use_bias=False, patch_size=p, image_size=img)
    model = MetaModel(preprocessor=pre, trunk=trunk, postprocessor=torch.nn.Identity(), head=head)
    return model, n, img, p


def main(out, size):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "001_aim_v1_600M.yaml"))
    exp_cfg = cfg["experiment"]
    # CPU: FSDP2 casts parameters to param_dtype for compute; LayerNormFP32 relies on CUDA autocast
    # to take bf16 parameters, so compute in fp32 here (the stored master weights are fp32 either way).
    exp_cfg["fsdp"]["param_dtype"] = "fp32"
    with torch.device("meta"):
        model, n, img, p = build(size)
    model, _ = fsdp.init_fsdp2(model=model, device_mesh=mesh, exp_cfg=exp_cfg, broadcast=False)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    np.random.seed(0)
    init_parameters(model)
    loss_fn = RasterPixelLoss(read_key="image_preds", norm_pix_loss=True, mask_read_key="encoder_prefix_mask",
                              patch_size=p, image_size=img)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            eps=1e-8, weight_decay=0.05)
    masking = RandomRasterMasking(num_patches=n, prefix_range=(1, n - 1), seed=0)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, img, img, generator=g)
    data = {"image": images, "encoder_prefix_mask": torch.stack([masking() for _ in range(4)])}
    loss = loss_fn(model(dict(data)))
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    opt.step()
    opt.zero_grad()

    extra = {"cfg": cfg, "iteration": 0, "lr_scheduler": {"note": "fvcore scheduler not installed"},
             "loss_scaler": {}, "data_loader_train": None}
    DistributedCheckpointUtils.save(checkpoint_path=out / "checkpoint_0", model=model, optimizer=opt, extra=extra)
    state = DistributedCheckpointUtils.create_state_dict(model=model, optimizer=opt, extra=extra, gather_dtensors=True)
    save_on_master(state, (out / "checkpoint_0").with_suffix(".pth"))

    # reference outputs on a fixed input, after the step
    model.eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, img, img, generator=g)
    prefix = torch.tensor([1, n // 3, n - 1])
    mask = torch.arange(n)[None, :] >= prefix[:, None]
    with torch.no_grad():
        dd = model({"image": images, "encoder_prefix_mask": mask})
        loss = loss_fn(dd)
        loss = loss[0] if isinstance(loss, tuple) else loss
        full = model({"image": images, "encoder_prefix_mask": torch.zeros_like(mask)})
        feats = [f.full_tensor() if hasattr(f, "full_tensor") else f for f in full["image_tokens_trunk"]]
    to_local = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    torch.save({"images": images, "prefix_len": prefix, "loss": to_local(loss).detach(),
                "block_features": torch.stack([to_local(f) for f in feats]),
                "preds": to_local(dd["image_preds"]).detach()}, out / "reference_outputs.pt")
    sd_keys = list(state["model"])
    print(f"saved {out}; {len(sd_keys)} model keys, first {sd_keys[:3]}; loss {float(to_local(loss)):.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tiny")
