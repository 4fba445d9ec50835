"""Checkpoints of Apple's pre-training code (apple/ml-l3m) <-> aim-megatron (issue #13, item 8).

The ml-l3m side is written out here by hand from ml-l3m's code (the files and classes are cited
at each definition), never from our modules: the state-dict key names, their order and shapes,
the float32 sin-cos positions, the three ways its trainer leaves weights on disk, and the
forward pass and loss of its AIM v1 (used to check that an imported checkpoint computes what
ml-l3m computes). Round trips: l3m -> ours (TP=2) -> l3m is bit-identical; ours -> l3m -> ours
(PP=2) gives the same parameters. Bad input ends in one line that names the fix."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import convert
from aim_megatron.checkpoint import l3m as l3m_format
from aim_megatron.distributed import parallel
from aim_megatron.config import load_config
from aim_megatron.models.aim import loss_mask
from conftest import TINY, run_distributed

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = 4  # TINY: model.num_heads=4


# --------------------------------------------------------------------------- ml-l3m, by hand

def l3m_aim_v1_keys(img, p, c, d, depth, hd, hffn, hdepth) -> dict[str, tuple]:
    """Key -> shape of ml-l3m's AIM v1 ``MetaModel.state_dict()``, in its order, as built by
    configs/aimv1/001_aim_v1_600M.yaml (src/l3m/model/meta_models.py MetaModel: preprocessor,
    trunk, postprocessor, head). A module lists its own parameters before its children's."""
    n = (img // p) ** 2
    keys = {
        # src/l3m/model/utils.py MultiBlock.blocks[0] = ViTPreprocessor (preprocessors/vision.py):
        # pos_embed is its own nn.Parameter(1, num_patches, D) (requires_grad=False for sincos);
        # patchifier = PatchEmbed: proj Conv2d(C, D, p, stride p, bias=True), norm LayerNormFP32(D).
        "preprocessor.blocks.0.pos_embed": (1, n, d),
        "preprocessor.blocks.0.patchifier.proj.weight": (d, c, p, p),
        "preprocessor.blocks.0.patchifier.proj.bias": (d,),
        "preprocessor.blocks.0.patchifier.norm.weight": (d,),
        "preprocessor.blocks.0.patchifier.norm.bias": (d,),
        # MultiBlock.blocks[1] = FlexAttnPrefixAttentionMaskBuilder: no parameters or buffers.
    }
    for i in range(depth):
        # src/l3m/model/trunks/transformer.py Block: attn, norm_1, mlp, norm_2 (this order);
        # attn = layers/attention.py GenericAttention(qkv_bias=False, use_bias=False): q_proj,
        # k_proj, v_proj, proj, each Linear(D, D) without bias (q_norm/k_norm are Identity);
        # mlp = layers/ffn.py MLP(use_bias=False): fc1 Linear(D, 4D), fc2 Linear(4D, D).
        b = f"trunk.blocks.{i}."
        keys.update({b + "attn.q_proj.weight": (d, d), b + "attn.k_proj.weight": (d, d),
                     b + "attn.v_proj.weight": (d, d), b + "attn.proj.weight": (d, d),
                     b + "norm_1.weight": (d,), b + "norm_1.bias": (d,),
                     b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc2.weight": (d, 4 * d),
                     b + "norm_2.weight": (d,), b + "norm_2.bias": (d,)})
    # Transformer(post_trunk_norm=True); postprocessor is torch.nn.Identity.
    keys.update({"trunk.post_trunk_norm.weight": (d,), "trunk.post_trunk_norm.bias": (d,)})
    # src/l3m/model/heads/simple_decoder.py SimpleDecoder: decoder_pos_embed is its own
    # Parameter(1, num_patches, H); decoder_projection Linear(D, H, bias=True); decoder_blocks are
    # Blocks whose attention is layers/misc.py GenericIdentity (no weights), MLP without bias;
    # decoder_norm; decoder_pred Linear(H, output_dim=588 for 600M, bias=True).
    keys.update({"head.decoder_pos_embed": (1, n, hd), "head.decoder_projection.weight": (hd, d),
                 "head.decoder_projection.bias": (hd,)})
    for j in range(hdepth):
        b = f"head.decoder_blocks.{j}."
        keys.update({b + "norm_1.weight": (hd,), b + "norm_1.bias": (hd,), b + "mlp.fc1.weight": (hffn, hd),
                     b + "mlp.fc2.weight": (hd, hffn), b + "norm_2.weight": (hd,), b + "norm_2.bias": (hd,)})
    keys.update({"head.decoder_norm.weight": (hd,), "head.decoder_norm.bias": (hd,),
                 "head.decoder_pred.weight": (p * p * c, hd), "head.decoder_pred.bias": (p * p * c,)})
    return keys


TINY_L3M = dict(img=16, p=4, c=3, d=32, depth=4, hd=32, hffn=64, hdepth=2)


def l3m_positions(dim: int, grid: int) -> torch.Tensor:
    """src/l3m/model/preprocessors/pos_embed/sinusoidal.py get_2d_sincos_pos_embed, as facts: numpy
    float32 throughout; a meshgrid with the column coordinate first; each half of the channels is
    [sin, cos] of position * omega_i, omega_i = 1 / 10000^(i / (dim/4)) for i < dim/4; the first
    half encodes the column, the second the row. Returned [1, grid*grid, dim] float32."""
    quarter = dim // 4
    omega = (1.0 / 10000 ** (np.arange(quarter, dtype=np.float32) / np.float32(dim / 4))).astype(np.float32)
    col, row = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    halves = []
    for coord in (col.reshape(-1), row.reshape(-1)):
        angle = coord[:, None] * omega[None, :]
        halves += [np.sin(angle), np.cos(angle)]
    return torch.from_numpy(np.concatenate(halves, axis=1)).float()[None]


def l3m_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random ml-l3m weights (fp32 as FSDP2 keeps them), every tensor distinct so mix-ups show;
    the positions as ml-l3m computes them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in l3m_aim_v1_keys(**TINY_L3M).items():
        if key.endswith("pos_embed"):
            sd[key] = l3m_positions(shape[-1], 4)
        else:
            one = 1.0 if "norm" in key and key.endswith("weight") else 0.0
            sd[key] = one + 0.1 * torch.randn(shape, generator=g)
    return sd


def l3m_loss_and_features(sd, images, prefix_len, heads=HEADS, p=4, eps=1e-5):
    """ml-l3m's AIM v1 forward and RasterPixelLoss (src/l3m/loss/mae_loss.py) on its own key names.
    Trunk Block: x + attn(norm_1(x)), x + mlp(norm_2(x)); attention: token q sees kv < prefix or
    kv <= q (FlexAttnPrefixAttentionMaskBuilder); head Block with GenericIdentity attention:
    x + norm_1(x), then x + mlp(norm_2(x)). Loss: target patch normalised by its mean and unbiased
    variance (+1e-6), prediction i vs patch i+1, MSE over the patch values, mean over the
    non-prefix targets. Returns (loss, per-block features with full attention)."""
    ln = lambda x, k: F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps)  # noqa: E731

    def trunk(images, allowed):
        x = F.conv2d(images, sd["preprocessor.blocks.0.patchifier.proj.weight"],
                     sd["preprocessor.blocks.0.patchifier.proj.bias"], stride=p).flatten(2).transpose(1, 2)
        x = ln(x, "preprocessor.blocks.0.patchifier.norm") + sd["preprocessor.blocks.0.pos_embed"]
        b, n, d = x.shape
        feats = []
        for i in range(sum(k.endswith("attn.q_proj.weight") for k in sd)):
            a = f"trunk.blocks.{i}."
            h = ln(x, a + "norm_1")
            q, k, v = (F.linear(h, sd[a + f"attn.{w}_proj.weight"]).reshape(b, n, heads, -1).transpose(1, 2)
                       for w in "qkv")
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).reshape(b, n, d)
            x = x + F.linear(o, sd[a + "attn.proj.weight"])
            h = ln(x, a + "norm_2")
            x = x + F.linear(F.gelu(F.linear(h, sd[a + "mlp.fc1.weight"])), sd[a + "mlp.fc2.weight"])
            feats.append(x)
        return ln(x, "trunk.post_trunk_norm"), feats

    n = (images.shape[-1] // p) ** 2
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (kv_idx[None] < prefix_len[:, None, None]) | (q_idx >= kv_idx)[None]
    x, _ = trunk(images, allowed[:, None])
    x = F.linear(x, sd["head.decoder_projection.weight"], sd["head.decoder_projection.bias"]) + sd["head.decoder_pos_embed"]
    for j in range(sum(k.endswith("mlp.fc1.weight") and "decoder_blocks" in k for k in sd)):
        a = f"head.decoder_blocks.{j}."
        x = x + ln(x, a + "norm_1")
        x = x + F.linear(F.gelu(F.linear(ln(x, a + "norm_2"), sd[a + "mlp.fc1.weight"])), sd[a + "mlp.fc2.weight"])
    pred = F.linear(ln(x, "head.decoder_norm"), sd["head.decoder_pred.weight"], sd["head.decoder_pred.bias"])
    b, c, hgt, wid = images.shape
    target = images.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    err = ((pred[:, :-1] - target[:, 1:]) ** 2).mean(-1)
    counted = (torch.arange(1, n)[None] >= prefix_len[:, None]).float()
    loss = (err * counted).sum() / counted.sum()
    _, feats = trunk(images, None)
    return loss, feats


class ConfigLike:
    """Stands in for the OmegaConf cfg ml-l3m pickles into its checkpoints: a class the reader
    cannot (and must not) import or run."""
    ran = []

    def __reduce__(self):
        return (ConfigLike._side_effect, ("unpickling ran code",))

    @staticmethod
    def _side_effect(msg):
        ConfigLike.ran.append(msg)
        return msg


def save_like_l3m(sd, out_dir):
    """The files ml-l3m's trainer writes (src/l3m/evaluator.py maybe_eval_and_save_ckpt with
    src/l3m/helpers/checkpoint.py DistributedCheckpointUtils): checkpoint_N/ (DCP of {"model",
    "optimizer"} + other.pth with the rest) and checkpoint_N.pth (one torch.save of all)."""
    import torch.distributed.checkpoint as dcp
    optimizer = {"state": {k: {"step": torch.tensor(9.0), "exp_avg": torch.zeros_like(v),
                               "exp_avg_sq": torch.zeros_like(v)} for k, v in list(sd.items())[:3]},
                 "param_groups": [{"lr": 1e-3, "params": list(sd)[:3]}]}
    extra = {"cfg": ConfigLike(), "iteration": 9, "lr_scheduler": {"lengths": [0.025, 0.975]},
             "loss_scaler": {}, "data_loader_train": None}
    d = out_dir / "checkpoint_9"
    dcp.save({"model": sd, "optimizer": optimizer}, checkpoint_id=str(d), no_dist=True)
    torch.save(extra, d / "other.pth")
    torch.save({"model": sd, "optimizer": optimizer, **extra}, out_dir / "checkpoint_9.pth")
    return d, out_dir / "checkpoint_9.pth"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """ml-l3m files, and checkpoint_9.pth imported at TP=2 (2 gloo processes)."""
    root = tmp_path_factory.mktemp("l3m")
    sd = l3m_state_dict()
    dcp_dir, pth = save_like_l3m(sd, root)
    run_distributed("tools/convert_checkpoint.py", 2, ["import", "--format", "l3m", "--src", str(pth),
                                                       "--dst", str(root / "run"), *TINY, "parallel.tp=2"])
    return sd, root, dcp_dir, pth


def export_l3m(run_dir):
    try:
        return convert.export_official(checkpoint.resolve(run_dir / "checkpoints"), fmt="l3m")
    finally:
        parallel.shutdown()


def megatron_params(run_dir):
    step = checkpoint.resolve(run_dir / "checkpoints")
    cfg = checkpoint.config_from_checkpoint(step, convert.SINGLE_PROCESS)
    try:
        parallel.initialize(cfg)
        model = parallel.build_model(cfg, wrap_ddp=False)
        checkpoint.load(step, cfg, model)
        return parallel.gather_full_state_dict(model), cfg
    finally:
        parallel.shutdown()


# --------------------------------------------------------------------------- tests

def test_key_names_order_and_shapes_are_ml_l3m_ones():
    tiny = load_config(None, TINY).model
    assert list(l3m_format.expected_shapes(tiny).items()) == list(l3m_aim_v1_keys(**TINY_L3M).items())
    big = load_config(None, ["model.preset=aim-600M"]).model  # the 600M config's numbers
    want = l3m_aim_v1_keys(img=224, p=14, c=3, d=1536, depth=24, hd=2048, hffn=8192, hdepth=12)
    assert l3m_format.expected_shapes(big) == want
    assert len(want) == 5 + 24 * 10 + 2 + 3 + 12 * 6 + 4
    assert want["head.decoder_pred.weight"] == (588, 2048) and want["preprocessor.blocks.0.pos_embed"] == (1, 256, 1536)


def test_positions_are_ml_l3m_float32_ones():
    for dim, grid in ((32, 4), (1536, 16), (2048, 16)):
        assert torch.equal(l3m_format.l3m_sincos_2d(dim, grid), l3m_positions(dim, grid))
    # and they are the 2D sin-cos of FACTS §1 up to float32 rounding
    from aim_megatron.models.aim import sincos_2d
    assert (l3m_format.l3m_sincos_2d(1536, 16)[0] - sincos_2d(1536, 16)).abs().max() < 1e-5


def test_three_files_read_the_same_and_run_no_pickled_code(imported, tmp_path):
    sd, _, dcp_dir, pth = imported
    ConfigLike.ran.clear()
    plain, nested, wrapped = tmp_path / "plain.pth", tmp_path / "nested.pt", tmp_path / "wrapped.pth"
    torch.save(sd, plain)
    torch.save({"model": sd}, nested)
    torch.save({k.replace("trunk.blocks.0.", "trunk.blocks.0._checkpoint_wrapped_module."): v
                for k, v in sd.items()}, wrapped)  # activation-checkpoint wrapper in the names
    for src in (pth, dcp_dir, plain, nested, wrapped):
        got = l3m_format.read(src)
        assert sorted(got) == sorted(sd), src
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], sd[k]) for k in sd), src
    assert ConfigLike.ran == []  # the pickled cfg was read as an inert stand-in


def test_l3m_to_ours_tp2_to_l3m_is_bit_identical(imported):
    sd, root, _, _ = imported
    meta = checkpoint.read_meta(checkpoint.resolve(root / "run" / "checkpoints"))
    # an import is weights only (no layout: it loads into any); the config names the target tp
    assert meta["weights_only"] and meta["layout"] is None and meta["step"] == 0
    assert meta["config"]["parallel"]["tp"] == 2
    out = export_l3m(root / "run")
    assert list(out) == list(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k
    # the file ml-l3m's model.checkpoint loads: torch.save({"model": state dict})
    convert.main(["export", "--format", "l3m", "--src", str(checkpoint.resolve(root / "run" / "checkpoints")),
                  "--out", str(root / "exported.pth")])
    saved = torch.load(root / "exported.pth", weights_only=True)
    assert list(saved) == ["model"] and all(torch.equal(saved["model"][k], sd[k]) for k in sd)


def test_ours_to_l3m_to_ours_pp2_keeps_every_parameter(imported):
    _, root, _, _ = imported
    ours_as_l3m = root / "ours_as_l3m.pth"
    assert convert.main(["export", "--format", "l3m", "--src",
                         str(checkpoint.resolve(root / "run" / "checkpoints")), "--out", str(ours_as_l3m)]) == 0
    run_distributed("tools/convert_checkpoint.py", 2, ["import", "--format", "l3m", "--src", str(ours_as_l3m),
                                                       "--dst", str(root / "run_pp2"), *TINY, "parallel.pp=2"])
    first, cfg = megatron_params(root / "run")
    second, cfg2 = megatron_params(root / "run_pp2")
    meta2 = checkpoint.read_meta(checkpoint.resolve(root / "run_pp2" / "checkpoints"))
    assert meta2["weights_only"] and meta2["config"]["parallel"]["pp"] == 2
    assert sorted(first) == sorted(second) and any(k.startswith("head.") for k in first)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert cfg.model.layernorm_eps == cfg2.model.layernorm_eps == 1e-5  # ml-l3m trains with 1e-5


def test_imported_model_computes_ml_l3m_loss_and_features(imported):
    sd, root, _, _ = imported
    step = checkpoint.resolve(root / "run" / "checkpoints")
    cfg = checkpoint.config_from_checkpoint(step, convert.SINGLE_PROCESS)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 16, 16, generator=g)
    prefix_len = torch.tensor([1, 7, 15])
    with torch.no_grad():
        want_loss, want_feats = l3m_loss_and_features(sd, images, prefix_len)
    try:
        parallel.initialize(cfg)
        (model,) = parallel.build_model(cfg, wrap_ddp=False)
        checkpoint.load(step, cfg, [model])
        model.eval()
        with torch.no_grad():
            errors = model(images, prefix_len)
            mask = loss_mask(prefix_len, cfg.model.num_patches)
            loss = (errors * mask).sum() / mask.sum()
            for i, want in enumerate(want_feats):
                torch.testing.assert_close(model.block_features(images, [i]), want, rtol=1e-5, atol=1e-5)
    finally:
        parallel.shutdown()
    assert math.isclose(loss.item(), want_loss.item(), rel_tol=1e-5), (loss.item(), want_loss.item())


def test_training_continues_from_the_import_as_from_fresh_weights(imported):
    """aim-pretrain resumes from an imported (step-0, weights-only) checkpoint, and its first
    AdamW update is the one a fresh optimizer makes from the same weights (the import holds no
    optimizer state: load leaves the optimizer and LR schedule freshly built)."""
    from aim_megatron.training.optim import build_scheduler
    _, root, _, _ = imported
    step = checkpoint.resolve(root / "run" / "checkpoints")
    cfg = checkpoint.config_from_checkpoint(step, [*convert.SINGLE_PROCESS, "train.micro_batch_size=16"])
    g = torch.Generator().manual_seed(5)
    n = cfg.train.global_batch_size
    batch = {"images": torch.randn(n, 3, 16, 16, generator=g), "prefix_len": torch.randint(1, 16, (n,), generator=g)}
    after = []
    try:
        parallel.initialize(cfg)
        for resume in (True, False):
            model = parallel.build_model(cfg)
            if resume:  # as the trainer resumes: optimizer and scheduler built, then loaded
                optimizer = parallel.build_optimizer(cfg, model)
                scheduler = build_scheduler(cfg, optimizer)
                assert checkpoint.load(step, cfg, model, optimizer, scheduler)["trainer"]["step"] == 0
            else:  # the same weights under a new optimizer
                checkpoint.load(step, cfg, model)
                optimizer = parallel.build_optimizer(cfg, model)
                scheduler = build_scheduler(cfg, optimizer)
            loss, _, ok = parallel.train_step(cfg, model, optimizer, parallel.split_microbatches(cfg, batch, 1))
            assert ok and math.isfinite(loss)
            after.append(parallel.gather_full_state_dict(model))
    finally:
        parallel.shutdown()
    resumed, fresh = after
    for k in fresh:
        assert torch.equal(resumed[k], fresh[k]), k


# --------------------------------------------------------------------------- bad input

def call(argv) -> int:
    try:
        return convert.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_input_is_one_line_naming_the_fix(imported, tmp_path, capsys):
    sd, _, dcp_dir, pth = imported
    dst = tmp_path / "run"

    def imp(src, *extra, fmt=("--format", "l3m")):
        return call(["import", *fmt, "--src", src, "--dst", dst, *TINY, *extra])

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    one_line(capsys, imp(text), "is not a torch.save file", "checkpoint_N.pth")
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    one_line(capsys, imp(listed), "holds no model state dict")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    one_line(capsys, imp(empty_dir), "without .metadata", "checkpoint_N/")
    one_line(capsys, imp(tmp_path / "missing.pth"), "no such file or directory")
    released = tmp_path / "released.pth"
    torch.save({"preprocessor.patchifier.proj.weight": torch.zeros(32, 3, 4, 4),
                "trunk.blocks.0.attn.qkv.weight": torch.zeros(96, 32)}, released)
    one_line(capsys, imp(released), "released AIM v1 names", "--format aim-v1")
    # a config that does not match the file: depth, then width
    one_line(capsys, imp(pth, "model.num_layers=2"), "unexpected keys", "model.num_layers=4")
    one_line(capsys, imp(pth, "model.hidden_size=64", "model.head_hidden_size=64"),
             "shape mismatch at preprocessor.blocks.0", "model.hidden_size=32")
    one_line(capsys, imp(pth, "model.head_type=linear"), "model.head_type=mlp")
    shifted = tmp_path / "learned_pos.pth"
    torch.save({**sd, "head.decoder_pos_embed": sd["head.decoder_pos_embed"] + 0.01}, shifted)
    one_line(capsys, imp(shifted), "head.decoder_pos_embed", "sin-cos")
    one_line(capsys, imp(pth, "--probe-out", tmp_path / "p.pt"), "hold no probe head")
    # ml-l3m files given without --format l3m: the fix is named
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    one_line(capsys, imp(pth, fmt=()), "--format l3m")
    one_line(capsys, imp(plain, fmt=()), "ml-l3m names", "--format l3m")
    one_line(capsys, imp(dcp_dir, fmt=()), "is a directory", "--format l3m")
    assert not dst.exists()
    # export
    step = checkpoint.resolve(imported[1] / "run" / "checkpoints")
    one_line(capsys, call(["export", "--format", "l3m", "--src", step, "--out", tmp_path / "a.safetensors"]),
             "torch.save", ".pth")
    one_line(capsys, call(["export", "--format", "l3m", "--src", step, "--out", tmp_path / "a.pth",
                           "--probe", pth]), "no probe head")
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "a.safetensors").exists()
