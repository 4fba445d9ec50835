"""FP8 fails at start, not at the first FP8 forward: the GEMM shape rules of Transformer Engine
v2.8 (config.validate, ``_check_fp8_gemm_shapes``) and the GPU's compute capability
(models/aim.py ``select_backend``, called where the run starts). On CPU; the capability is
monkeypatched."""
import pytest

from aim_megatron.config import ConfigError, load_config
from conftest import TINY

FP8 = ["train.params_dtype=bf16", "train.fp8=hybrid"]


def validate(overrides, world=1):
    load_config(None, [*TINY, *FP8, *overrides]).validate(world)


def test_the_issue_example_196_patches_tp2_sequence_parallel():
    """224 / 16 = 14 x 14 = 196 patches over tp=2: 98 tokens per sample per rank, so the
    micro-batch must be a multiple of 4 for 8 | rows."""
    layout = ["model.image_size=224", "model.patch_size=16", "parallel.tp=2",
              "parallel.sequence_parallel=true", "train.global_batch_size=64"]
    with pytest.raises(ConfigError) as err:
        validate([*layout, "train.micro_batch_size=2"], world=2)
    message = str(err.value)
    assert "\n" not in message
    assert "2 x 98 = 196, divisible by 8" in message and "multiple of 4" in message
    assert "train.fp8=null" in message
    validate([*layout, "train.micro_batch_size=4"], world=2)
    # Without sequence parallelism every rank holds all 196 patches: a multiple of 2 will do.
    no_sp = [x for x in layout if "sequence_parallel" not in x]
    validate([*no_sp, "train.micro_batch_size=2"], world=2)
    with pytest.raises(ConfigError, match="1 x 196 = 196.*multiple of 2"):
        validate([*no_sp, "train.micro_batch_size=1", "train.global_batch_size=2"], world=2)


@pytest.mark.parametrize("override,world,fix", [
    (["model.hidden_size=40", "model.num_heads=4"], 1, "model.hidden_size = 40 divisible by 16.*multiple of 16"),
    # 48 is a multiple of 16, but each of tp=2 ranks holds 24 columns of proj's input
    (["model.hidden_size=48", "model.num_heads=4", "parallel.tp=2", "model.head_ffn_hidden_size=64"], 2,
     r"model.hidden_size = 48 / parallel.tp=2 = 24 per rank divisible by 16.*multiple of 32"),
    (["model.mlp_ratio=2.25"], 1, r"MLP width .* = 72 divisible by 16"),
    (["model.head_hidden_size=40"], 1, "model.head_hidden_size = 40 divisible by 16"),
    (["model.head_ffn_hidden_size=48", "parallel.tp=2"], 2,
     r"model.head_ffn_hidden_size = 48 / parallel.tp=2 = 24 per rank .*multiple of 32"),
])
def test_widths_must_give_16_columns_per_rank(override, world, fix):
    with pytest.raises(ConfigError, match=fix) as err:
        validate(override, world)
    assert "\n" not in str(err.value) and "train.fp8=null" in str(err.value)


def test_linear_head_has_no_fp8_blocks_to_check():
    validate(["model.head_type=linear", "model.head_hidden_size=40"])
    with pytest.raises(ConfigError, match="head_hidden_size"):
        validate(["model.head_hidden_size=40"])


def test_without_fp8_nothing_is_asked():
    load_config(None, [*TINY, "model.hidden_size=40", "model.num_heads=4", "model.head_hidden_size=40",
                       "train.micro_batch_size=1", "model.image_size=12"]).validate(1)


def test_presets_pass_the_fp8_rules():
    for preset, mbs in [("aim-600M", 1), ("aim-1B", 1), ("aim-3B", 1), ("aim-7B", 1), ("aim-tiny", 8)]:
        load_config(None, [f"model.preset={preset}", *FP8, f"train.micro_batch_size={mbs}",
                           "train.global_batch_size=64"]).validate(1)


def test_fp8_needs_compute_capability_8_9(monkeypatch):
    import aim_megatron.models.aim as model_mod
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(model_mod, "gpu_compute_capability", lambda: (8, 0))   # A100
    with pytest.raises(RuntimeError) as err:
        model_mod.select_backend("auto", fp8="hybrid")
    message = str(err.value)
    assert "compute capability >= 8.9" in message and "sm80" in message and "train.fp8=null" in message
    assert model_mod.select_backend("auto") == "te"             # bf16 on an A100 is fine
    for capability in [(8, 9), (9, 0), (10, 0)]:                 # L40S/Ada, H100/H200, Blackwell
        monkeypatch.setattr(model_mod, "gpu_compute_capability", lambda c=capability: c)
        assert model_mod.select_backend("te", fp8="e4m3") == "te"


def test_capability_is_refused_where_the_run_starts(monkeypatch):
    """parallel.initialize (the start of every run, before any model is built) turns the refusal
    into a ConfigError, which aim-pretrain prints as one line with exit 1."""
    import aim_megatron.models.aim as model_mod
    from aim_megatron.distributed import parallel
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(model_mod, "gpu_compute_capability", lambda: (8, 6))
    cfg = load_config(None, [*TINY, *FP8, "train.micro_batch_size=2", "train.global_batch_size=2"])
    with pytest.raises(ConfigError, match="compute capability >= 8.9.*sm86"):
        parallel.initialize(cfg)


def test_capability_is_unknown_without_cuda():
    import torch
    import aim_megatron.models.aim as model_mod
    if torch.cuda.is_available():
        assert model_mod.gpu_compute_capability() == tuple(torch.cuda.get_device_capability())
    else:
        assert model_mod.gpu_compute_capability() is None
