"""Official AIM v1 state dicts <-> aim-megatron checkpoints: import at TP=2 and at PP=2, export
back bit-identically (trunk and probe head), features of the imported trunk equal the plain-PyTorch
reference's, and files of another size, missing keys or impossible probe layers fail clearly."""
import pytest
import torch

from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import convert, official
from aim_megatron.distributed import parallel
from aim_megatron.config import load_config
from aim_megatron.evaluation.probe import AttentiveProbe, load_probe
from aim_megatron.models.reference import ReferenceAIM
from conftest import TINY, run_distributed


pytestmark = pytest.mark.usefixtures("one_thread")

def official_state_dict(overrides=(), seed=0, with_probe=True) -> dict[str, torch.Tensor]:
    """Random official-format weights: ReferenceAIM's trunk (+ an attentive probe head) with every
    tensor randomized, norms and running stats included, so any mix-up shows."""
    m = load_config(None, [*TINY, *overrides]).model
    torch.manual_seed(seed)
    sd = {k: 0.1 * torch.randn_like(v) + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
          for k, v in ReferenceAIM(m).state_dict().items() if not k.startswith("head.")}
    if with_probe:  # the released head.* key set (official AttentionPoolingClassifier, no linear bias)
        d, classes = m.hidden_size, 10
        sd.update({"head.cls_token": 0.02 * torch.randn(1, 1, d), "head.k.weight": 0.1 * torch.randn(d, d),
                   "head.v.weight": 0.1 * torch.randn(d, d), "head.linear.weight": 0.1 * torch.randn(classes, d),
                   "head.bn.running_mean": torch.randn(d), "head.bn.running_var": torch.rand(d) + 0.5,
                   "head.bn.num_batches_tracked": torch.tensor(7)})
    return sd


def import_at(tmp_path, layout: list[str]) -> tuple[dict, object]:
    src, dst = tmp_path / "official.pth", tmp_path / "run"
    sd = official_state_dict()
    torch.save(sd, src)
    run_distributed("tools/convert_checkpoint.py", 2,
                    ["import", "--src", str(src), "--dst", str(dst), "--probe-out", str(dst / "probe.pt"),
                     "--probe-layers", "last", *TINY, *layout])
    return sd, dst


@pytest.fixture(scope="module")
def imported_tp2(tmp_path_factory):
    return import_at(tmp_path_factory.mktemp("tp2"), ["parallel.tp=2"])


def export(dst):
    try:
        return convert.export_official(checkpoint.resolve(dst / "checkpoints"), dst / "probe.pt")
    finally:
        parallel.shutdown()


def assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_import_tp2_then_export_is_bit_identical(imported_tp2):
    sd, dst = imported_tp2
    meta = checkpoint.read_meta(checkpoint.resolve(dst / "checkpoints"))
    assert meta["config"]["parallel"]["tp"] == 2 and meta["step"] == 0 and meta["weights_only"]
    # released models use LayerNorm eps 1e-6 (pre-training default 1e-5): the import records it
    cfg = checkpoint.config_from_checkpoint(checkpoint.resolve(dst / "checkpoints"), convert.SINGLE_PROCESS)
    assert cfg.model.layernorm_eps == 1e-6
    out = export(dst)
    assert "head.cls_token" in out and out["trunk.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert_identical(sd, out)


def test_import_pp2_then_export_is_bit_identical(tmp_path):
    sd, dst = import_at(tmp_path, ["parallel.pp=2"])
    assert checkpoint.read_meta(checkpoint.resolve(dst / "checkpoints"))["config"]["parallel"]["pp"] == 2
    assert_identical(sd, export(dst))


def test_imported_trunk_features_match_reference(imported_tp2):
    sd, dst = imported_tp2
    step = checkpoint.resolve(dst / "checkpoints")
    cfg = checkpoint.config_from_checkpoint(step, convert.SINGLE_PROCESS)
    try:
        parallel.initialize(cfg)
        (model,) = parallel.build_model(cfg, wrap_ddp=False)
        checkpoint.load(step, cfg, [model])
        ref = ReferenceAIM(cfg.model)
        missing, unexpected = ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")},
                                                  strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing)  # pre-training head only
        images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, blocks = ref.features(images)
        for layers in ([0, 1, 2, 3], [1, 3], [2]):
            expected = torch.stack([blocks[i] for i in layers]).mean(0)
            torch.testing.assert_close(model.block_features(images, layers), expected, rtol=1e-5, atol=1e-5)
        probe, record = load_probe(dst / "probe.pt")
        assert record["layers"] == [0, 1, 2, 3] and record["num_classes"] == 10
    finally:
        parallel.shutdown()


def test_file_of_another_size_names_key_shapes_and_preset():
    wide = official_state_dict(["model.hidden_size=64"], with_probe=False)
    tiny = load_config(None, TINY).model
    with pytest.raises(official.ConvertError) as err:
        official.check_trunk(wide, tiny)
    msg = str(err.value)
    assert "preprocessor.patchifier.proj.weight" in msg and "[64, 3, 4, 4]" in msg and "[32, 3, 4, 4]" in msg
    assert "no preset (width 64, depth 4, patch 4" in msg and "model.hidden_size=64" in msg
    # A released aim-600M file (shapes only) against the tiny config names its preset.
    with torch.device("meta"):
        big = {k: v for k, v in ReferenceAIM(load_config(None, ["model.preset=aim-600M"]).model)
               .state_dict().items() if not k.startswith("head.")}
    with pytest.raises(official.ConvertError, match=r"\[1536, 3, 14, 14\].*preset aim-600M.*model.preset=aim-600M"):
        official.check_trunk(big, tiny)


def test_missing_and_unexpected_keys_are_named():
    tiny = load_config(None, TINY).model
    sd = official_state_dict(with_probe=False)
    del sd["trunk.blocks.2.mlp.fc1.weight"]
    with pytest.raises(official.ConvertError, match=r"1 missing keys, e.g. \['trunk.blocks.2.mlp.fc1.weight'\]"):
        official.check_trunk(sd, tiny)
    deep = official_state_dict(["model.num_layers=6"], with_probe=False)
    with pytest.raises(official.ConvertError, match=r"unexpected keys.*trunk.blocks.4.*width 32, depth 6"):
        official.check_trunk(deep, tiny)
    with pytest.raises(official.ConvertError, match="not AIM v1"):
        official.split_official({**sd, "decoder.weight": torch.zeros(1)})


def test_import_cli_errors(tmp_path, capsys):
    src = tmp_path / "official.pth"
    torch.save(official_state_dict(), src)
    args = ["import", "--src", str(src), "--dst", str(tmp_path / "run"), *TINY]
    assert convert.main([*args, "--probe-out", str(tmp_path / "p.pt"), "--probe-layers", "2,7"]) == 1
    assert "valid 0-based indices are 0..3" in capsys.readouterr().err
    assert convert.main([*args, "--probe-out", str(tmp_path / "p.pt")]) == 1
    assert "needs --probe-layers" in capsys.readouterr().err
    assert convert.main([*args, "model.num_layers=2"]) == 1
    assert "unexpected keys" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000100")
    assert convert.main(args) == 1
    assert "already holds checkpoints" in capsys.readouterr().err


def test_local_checkpoint_loads_into_a_model_with_fp8_metadata(imported_tp2, monkeypatch):
    """Transformer Engine modules carry `_extra_state` (FP8 scales) that a checkpoint written with
    the local spec lacks: loading still works. A missing real tensor stays an error that names it."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from aim_megatron.models.aim import AimLayerNorm

    _, dst = imported_tp2
    step = checkpoint.resolve(dst / "checkpoints")
    cfg = checkpoint.config_from_checkpoint(step, convert.SINGLE_PROCESS)
    monkeypatch.setattr(AimLayerNorm, "get_extra_state", lambda self: {"fp8_scale": 1.0}, raising=False)
    monkeypatch.setattr(AimLayerNorm, "set_extra_state", lambda self, s: None, raising=False)
    try:
        parallel.initialize(cfg)
        (model,) = parallel.build_model(cfg, wrap_ddp=False)
        assert any(k.endswith("_extra_state") for k in model.sharded_state_dict())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        checkpoint.load(step, cfg, [model])
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

        original = checkpoint.model_sharded_state_dict

        def with_unknown_tensor(chunks):
            state = original(chunks)
            state["model"]["trunk.extra.weight"] = ShardedTensor.from_rank_offsets(
                "trunk.extra.weight", torch.zeros(4))
            return state
        monkeypatch.setattr(checkpoint, "model_sharded_state_dict", with_unknown_tensor)
        with pytest.raises(checkpoint.CheckpointError, match="lacks 1 entries.*trunk.extra.weight"):
            checkpoint.load(step, cfg, [model])
    finally:
        parallel.shutdown()
