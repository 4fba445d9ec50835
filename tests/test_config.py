"""Configs load from YAML with command-line overrides, and bad input fails with the fix named."""
import pytest

from aim_megatron.config import ConfigError, load_config


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: aim-600M\n  num_layers: 12\nparallel:\n  tp: 2\n"
                    "train:\n  global_batch_size: 4096\n  adam_eps: 1e-8\n")
    cfg = load_config(path, ["parallel.pp=2", "train.lr=2e-3", "data.train_sources=[a.tar, b.tar]"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (1536, 12, 12)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.train.lr == 2e-3 and cfg.train.adam_eps == 1e-8
    assert cfg.train.effective_lr == pytest.approx(2e-3)  # batch 4096: no scaling
    assert cfg.data.train_sources == ["a.tar", "b.tar"]
    assert cfg.model.num_patches == 256 and cfg.model.prefix_range == (1, 255)
    cfg.validate(world_size=8)


@pytest.mark.parametrize("overrides,world,fix", [
    (["parallel.tp=5"], 5, "num_heads=4 is not divisible by parallel.tp=5"),
    (["parallel.pp=3"], 3, "num_layers=4 is not divisible by pp\\*vp"),
    (["parallel.pp=2", "parallel.vp=4"], 2, "not divisible by pp\\*vp = 2\\*4"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by tp\\*pp"),
    (["model.image_size=30"], 1, "not a multiple of model.patch_size"),
    (["parallel.sequence_parallel=true"], 1, "needs parallel.tp > 1"),
    (["parallel.vp=2"], 1, "needs parallel.pp > 1"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "use a multiple of 4"),
    (["model.prefix_max=16"], 1, "must lie within \\[1, 15\\]"),
    (["parallel.pp=2", "parallel.trunk_layers_in_last_stage=2"], 2, None),
    (["parallel.pp=3", "parallel.trunk_layers_in_last_stage=1"], 3, "do not divide evenly"),
    (["data.train_sources=[a, b]", "data.train_weights=[1.0]"], 1, "one positive weight per source"),
    (["model.attention_kernel=flash"], 1, "use 'auto', 'varlen', 'flex' or 'masked'"),
    (["train.params_dtype=bf16", "train.fp8=hybrid", "train.fp8_amax_reduction=dp"], 1, "use 'tp_dp' or 'tp'"),
])
def test_invalid_layouts_name_the_fix(overrides, world, fix, tiny_overrides):
    base = tiny_overrides + ["model.in_channels=1", "train.micro_batch_size=1", "train.global_batch_size=8"]
    cfg = load_config(None, base + overrides)
    if fix is None:
        cfg.validate(world)  # a valid uneven split
        return
    with pytest.raises(ConfigError, match=fix):
        cfg.validate(world)


@pytest.mark.parametrize("overrides,msg", [
    (["model.hidden_sise=3"], "unknown field"),
    (["model.num_layers=two"], "expected an integer"),
    (["parallel.sequence_parallel=maybe"], "expected true/false"),
    (["modle.num_layers=2"], "section.field"),
    (["model.num_layers"], "section.key=value"),
    (["model.preset=aim-9B"], "unknown preset"),
])
def test_bad_overrides(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(bad)


@pytest.mark.parametrize("overrides,msg", [
    (["model.num_heads=0"], "model.num_heads=0: must be >= 1"),          # was a ZeroDivisionError
    (["train.global_batch_size=0"], "train.global_batch_size=0: must be >= 1"),  # ditto, later
    (["model.patch_size=0"], "model.patch_size=0: must be >= 1"),
    (["model.image_size=-16"], "model.image_size=-16: must be >= 1"),
    (["train.lr=.nan"], "train.lr=nan: must be a finite number"),
    (["train.fp8_recipe=mxfp8"], "train.fp8_recipe='mxfp8': use 'delayed' or 'tensorwise'"),
    (["data.mean=[0.5, 0.5, 0.5]"], "data.mean and data.std go together"),
])
def test_fields_are_checked_before_combinations(overrides, msg, tiny_overrides):
    cfg = load_config(None, tiny_overrides + overrides)
    with pytest.raises(ConfigError) as info:
        cfg.validate(1)
    assert msg in str(info.value)


@pytest.mark.parametrize("content,overrides,msg", [
    ("train: 5\n", [], "config section 'train' must be a mapping"),  # was "dictionary update sequence"
    ("- a\n", [], "must hold a mapping of sections"),
    ("model:\n  a: 1\n b: 2\n", [], "is not valid YAML (line 3, column 2"),
    ("1: x\n", [], "unknown config section(s) 1"),
    ("", ["train.lr=[1"], "the value is not valid YAML"),
    ("", ["model.num_layers=.inf"], "model.num_layers: expected an integer"),
    ("", ["model.preset=[a]"], "model.preset: expected a string"),
])
def test_yaml_shapes_and_values_are_config_errors(content, overrides, msg, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert msg in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cuda,cuda_bf16,cpu_bf16,expected", [
    (False, False, True, "bf16"),    # CPU with AVX512-BF16/AMX: bf16 trains ~2x faster
    (False, False, False, "fp32"),   # older CPU: bf16 would be emulated, slower than fp32
    (False, False, None, "fp32"),    # torch without oneDNN's bf16 probe
    (True, True, False, "bf16"),     # Ampere or newer GPU decides, whatever the host CPU
    (True, False, True, "fp32"),     # pre-Ampere GPU
])
def test_params_dtype_auto_picks_the_fast_dtype(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    if cpu_bf16 is None:
        monkeypatch.delattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", raising=False)
        monkeypatch.setattr(type(torch.ops.mkldnn), "__getattr__",
                            lambda self, name: (_ for _ in ()).throw(AttributeError(name)))
    else:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    from aim_megatron.config import resolve_params_dtype
    cfg = load_config(None, ["train.params_dtype=auto"])
    assert cfg.train.params_dtype == "auto"           # kept until the run starts (sweeps write it on)
    cfg.validate()
    resolve_params_dtype(cfg)
    assert cfg.train.params_dtype == expected         # resolved once, so checkpoints record it
    fixed = load_config(None, ["train.params_dtype=fp32"])
    resolve_params_dtype(fixed)
    assert fixed.train.params_dtype == "fp32"
    cfg.validate()


def test_every_shipped_config_loads_and_validates():
    from conftest import ROOT
    paths = sorted((ROOT / "examples").rglob("configs/*.yaml"))
    assert len(paths) >= 6, paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.train.params_dtype in ("fp32", "bf16", "auto"), path
        cfg.validate(world_size=cfg.parallel.tp * cfg.parallel.pp)


def test_unsettled_auto_dtype_cannot_build_a_model():
    from aim_megatron.config import torch_params_dtype
    with pytest.raises(ConfigError, match="call resolve_params_dtype"):
        torch_params_dtype("auto")
