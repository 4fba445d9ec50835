"""The ablation switches behind docs/findings.md (plain causal, raw-pixel targets, linear head)."""
import pytest
import torch

from aim_megatron.distributed import parallel
from aim_megatron.models.attention import prefix_causal_allowed
from aim_megatron.config import ConfigError, load_config, validate
from aim_megatron.models.aim import loss_mask, patchify, pixel_targets
from conftest import TINY


def build(overrides=()):
    cfg = load_config(None, [*TINY, "train.micro_batch_size=4", "train.global_batch_size=4", *overrides])
    parallel.initialize(cfg)
    (model,) = parallel.build_model(cfg, wrap_ddp=False)
    return cfg, model


def test_prefix_zero_is_plain_causal_and_every_target_counts():
    cfg = load_config(None, [*TINY, "model.prefix_min=0", "model.prefix_max=0"])
    validate(cfg)
    assert cfg.model.prefix_range == (0, 0)
    with pytest.raises(ConfigError, match=r"\[0, 0\] for plain causal"):
        validate(load_config(None, [*TINY, "model.prefix_min=0", "model.prefix_max=3"]))
    n = cfg.model.num_patches
    assert loss_mask(torch.zeros(2, dtype=torch.long), n).sum() == 2 * (n - 1)
    allowed = prefix_causal_allowed(torch.zeros(1, dtype=torch.long), n)[0, 0]
    assert torch.equal(allowed, torch.ones(n, n).tril().bool())


def test_raw_targets_are_the_input_patches(one_thread):
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(pixel_targets(images, 4, normalize=False), patchify(images, 4))
    norm = pixel_targets(images, 4)
    torch.testing.assert_close(norm.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    cfg, model = build(["model.target_norm=false"])
    torch.manual_seed(0)
    _, ref = build()
    ref.load_state_dict(model.state_dict())
    prefix = torch.full((2,), 3)
    raw_err, norm_err = model(images, prefix), ref(images, prefix)
    pred = ref.head(ref.post_trunk_norm(ref.trunk(ref.embed(images), attention_mask=prefix))).transpose(0, 1)
    want = ((pred[:, :-1] - patchify(images, 4)[:, 1:]) ** 2).mean(-1)
    torch.testing.assert_close(raw_err, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw_err, norm_err)


def test_linear_head_is_one_linear_layer(one_thread):
    cfg, model = build(["model.head_type=linear"])
    m = cfg.model
    assert isinstance(model.head, torch.nn.Linear)
    assert sum(p.numel() for p in model.head.parameters()) == m.hidden_size * m.patch_dim + m.patch_dim
    images = torch.randn(4, 3, 16, 16)
    errors = model(images, torch.full((4,), 2))
    assert errors.shape == (4, m.num_patches - 1) and torch.isfinite(errors).all()
    with pytest.raises(ConfigError, match="head_type"):
        validate(load_config(None, [*TINY, "model.head_type=conv"]))


def test_findings_command_end_to_end(tmp_path):
    """tools/findings.py run + report on tiny shards: it trains, probes and writes the measured
    values into the tables and plots."""
    import json
    import subprocess
    import sys
    from conftest import ROOT
    data = tmp_path / "data"
    for split in ("train", "test"):
        subprocess.run([sys.executable, "tools/make_shards.py", "--fashion-mnist", split, "--limit", "96",
                        "--out", str(data / split), "--quiet"], cwd=ROOT, check=True, capture_output=True)
    out, doc = tmp_path / "runs", tmp_path / "docs" / "findings.md"
    tiny = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.head_hidden_size=32",
            "model.head_ffn_hidden_size=64", "model.head_num_layers=1", "train.micro_batch_size=16",
            "train.global_batch_size=16", "train.eval_iters=1", "data.num_workers=0"]
    cmd = [sys.executable, "tools/findings.py", "all", "--only", "base,raw", "--seeds", "1", "--steps", "2",
           "--checkpoints", "1", "--data", str(data), "--out", str(out), "--doc", str(doc), "--notes", "none",
           "--probe-train", "48", "--probe-test", "32", "--threads", "1", "--jobs", "2", "--set", *tiny,
           "--probe-set", "probe.epochs=1", "probe.batch_size=16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = doc.read_text()
    for variant in ("base", "raw"):
        probe = json.loads((out / variant / "seed0" / "probe" / "step_00000002" / "metrics.json").read_text())
        assert probe["num_train"] == 48 and probe["num_test"] == 32
        assert f"| {variant} | {100 * probe['top1']:.1f}% |" in text  # the measured value, in its row
    assert "## 3. Normalized-pixel vs raw-pixel targets" in text and "1 paired seed(s)" in text
    assert "**Not run**" in text and "causal" in text          # what was not run is said, with the command
    assert (doc.parent / "img" / "findings_ablations.png").stat().st_size > 1000
    # a second run finds everything done and only re-reports
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "$ " not in again.stdout


def test_probe_num_heads_defaults_to_the_trunk_and_round_trips(tmp_path):
    from aim_megatron.evaluation import probe as P
    from aim_megatron.config import ModelConfig
    assert P.probe_config_from_dict({}).num_heads is None
    cfg = P.probe_config_from_dict({"num_heads": 8})
    with pytest.raises(ConfigError, match="num_heads"):
        P.probe_config_from_dict({"num_heads": 0})
    probe = P.build_probe("attentive", 32, cfg.num_heads, 3)
    m = ModelConfig(hidden_size=32, num_heads=4)
    P.save_probe(tmp_path / "p.pt", probe, cfg, [0], m, ["a", "b", "c"])
    loaded, _ = P.load_probe(tmp_path / "p.pt")
    assert loaded.num_heads == 8
    x = torch.randn(5, 7, 32)
    probe.eval()
    torch.testing.assert_close(loaded(x), probe(x))
