"""Model size, FLOPs and per-GPU memory arithmetic (aim_megatron/scaling/sizing.py, tools/estimate_memory.py)
checked against published numbers and hand computations."""
import subprocess
import sys

import pytest

from conftest import ROOT
from aim_megatron.scaling import flops
from aim_megatron.scaling import sizing
from aim_megatron.config import load_config

# aim-tiny on 32 px images: 8x8 = 64 patches, so sequence parallel over tp=2 divides.
TINY_LAYOUT = ["model.preset=aim-tiny", "model.image_size=32", "parallel.tp=2", "parallel.pp=2",
               "parallel.sequence_parallel=true", "parallel.use_distributed_optimizer=true",
               "train.params_dtype=bf16", "train.micro_batch_size=4", "train.global_batch_size=16"]


@pytest.mark.parametrize("preset,trunk_b", [("aim-600M", 0.681), ("aim-1B", 1.209),
                                            ("aim-3B", 2.720), ("aim-7B", 6.445)])
def test_preset_trunk_params_match_the_paper(preset, trunk_b):
    m = load_config(overrides=[f"model.preset={preset}"]).model
    assert round(sizing.trunk_params(m) / 1e9, 3) == trunk_b
    assert 0.405e9 < sizing.head_params(m) < 0.415e9   # ~0.41B head, the same for every trunk


def test_tiny_param_and_flop_counts_by_hand():
    m = load_config(overrides=["model.preset=aim-tiny"]).model
    # h=64, L=4, f=256, 7x7=49 patches of 4*4*1=16 values; head H=64, F=256, 2 blocks.
    block = 4 * 64 * 64 + 2 * 64 * 256 + 4 * 64                      # 49,408
    assert sizing.trunk_params(m) == 4 * block + (16 * 64 + 64 + 128) + 128 == 198_976
    assert sizing.head_params(m) == (64 * 64 + 64) + 2 * (256 + 2 * 64 * 256) + 128 + (64 * 16 + 16)
    assert sizing.train_flops_per_image(m, "6ND") == 6 * 198_976 * 49
    # "aim" is the trainer's count (aim_megatron/scaling/flops.py): matmul weights without biases and
    # LayerNorms, attention over the pairs the mask allows, mean over prefix lengths 1..48.
    assert sizing.train_flops_per_image(m, "aim") == flops.train_flops_per_image(m)
    matmuls = 16 * 64 + 4 * (4 * 64 * 64 + 2 * 64 * 256)             # embed + trunk blocks
    head = 64 * 64 + 2 * 2 * 64 * 256 + 64 * 16                        # in_proj, 2 MLPs, out_proj
    pairs = sum(k * k + (49 * 50 - k * (k + 1)) / 2 for k in range(1, 49)) / 48
    attention = 4 * 64 * 4 * pairs                                     # QK^T + AV, 4 layers
    assert sizing.train_flops_per_image(m, "aim") == pytest.approx(
        3 * (2 * 49 * (matmuls + head) + attention), rel=1e-12)
    assert sizing.head_train_flops_per_image(m) == pytest.approx(3 * 2 * 49 * head, rel=1e-12)


@pytest.mark.parametrize("tp,sp,recompute,factor", [
    # Korthikanti et al. 2022, per layer, with dropout, f = 4h: bytes / (s b h)
    (1, False, None, lambda a, s, h, t: 34 + 5 * a * s / h),
    (4, False, None, lambda a, s, h, t: 10 + 24 / t + 5 * a * s / (h * t)),
    (4, True, None, lambda a, s, h, t: (34 + 5 * a * s / h) / t),
    (4, True, "selective", lambda a, s, h, t: 34 / t),
    (1, False, "full", lambda a, s, h, t: 2),
])
def test_layer_activations_follow_the_megatron_formulas(tp, sp, recompute, factor):
    s, b, h, a = 256, 8, 4096, 32
    got = sizing.layer_activation_bytes(s, b, h, a, 4 * h, tp, sp, recompute, dropout=True)
    assert got == pytest.approx(s * b * h * factor(a, s, h, tp), rel=1e-12)


def test_aim_layer_without_dropout_keeps_no_masks():
    s, b, h, a = 256, 8, 1536, 12
    # 34 - 2 (two sbh masks) and 5 - 3 (score mask and dropout output): sbh (32 + 2as/h)
    assert sizing.layer_activation_bytes(s, b, h, a, 4 * h) == s * b * h * (32 + 2 * a * s / h)
    # flash attention keeps fp32 softmax statistics (4 a s b) instead of the scores
    assert sizing.layer_activation_bytes(s, b, h, a, 4 * h, flash_attention=True) == \
        32 * s * b * h + 4 * a * s * b


def test_model_state_bytes_per_param():
    assert sum(sizing.model_state_bytes_per_param("bf16", False, 64)) == 18
    assert sum(sizing.model_state_bytes_per_param("bf16", True, 64)) == 6 + 12 / 64
    assert sum(sizing.model_state_bytes_per_param("fp32", False, 8)) == 16
    assert sum(sizing.model_state_bytes_per_param("fp32", True, 8)) == 8 + 8 / 8


def test_in_flight_microbatches_match_1f1b_and_interleaving():
    assert [sizing.in_flight_microbatches(r, 4, 1, 16) for r in range(4)] == [4, 3, 2, 1]
    assert sizing.in_flight_microbatches(0, 4, 1, 2) == 2            # fewer micro-batches than stages
    # Interleaved rank 0 holds L (1 + (p-1)/(p v)) layers: (2*3 + 1*4 + 1) chunks of L/8
    assert sizing.in_flight_microbatches(0, 4, 2, 16) * (1 / 4) == pytest.approx(1 + 3 / 8)


def test_tiny_layout_memory_by_hand():
    cfg = load_config(overrides=TINY_LAYOUT)
    cfg.validate(8)
    est = sizing.estimate_memory(cfg, 8)   # tp=2, pp=2, dp=2, 2 micro-batches of 4
    first, last = est.stages
    assert (est.dp, est.num_microbatches) == (2, 2)
    # params: 2 layers x ((4*64^2 + 2*64*256)/2 + 4*64) + patch embed 1,216
    assert first.params == 2 * 24_832 + 1_216 == 50_880
    # + post LN 128, in_proj 4,160, out_proj 1,040, final LN 128, 2 head blocks x (2 LNs 256 + 64*256)
    assert last.params == 2 * 24_832 + 128 + 4_160 + 1_040 + 128 + 2 * 16_640 == 88_400
    # bf16 weights 2 B, fp32 grads 4 B, fp32 master + Adam 12 B sharded over dp=2
    assert (first.weights, first.grads, first.optimizer) == (101_760, 203_520, 305_280)
    # one layer, s=64 b=4 h=64 a=4, bf16, SP over t=2: sbh/t (32 + 2as/h) = 8192 * 40
    layer = 327_680
    mask = 4 * 64 * 64                                   # bool prefix-causal mask, 16,384 B
    embed = 2 * 64 * 4 * (16 + 2 * 64)                   # patches, conv out, LN out: 73,728 B
    assert first.activations == 2 * (2 * layer + mask) + 2 * embed == 1_490_944   # 2 in flight
    # head, SP over t=2: LN/proj streams 2*256*(2*64 + 2*64*2 + 2*64 + 16) / 2 = 135,168
    # plus fc1 out / GELU out 2*256*2*256*2 / 2 = 262,144
    head = 135_168 + 262_144
    assert last.activations == (2 * layer + mask) + head == 1_069_056            # 1 in flight
    # totals 2,101,504 vs 2,126,784 B: the head's weights and optimizer make the last stage the peak
    assert (first.total, last.total) == (2_101_504, 2_129_856) and est.peak is last


def test_full_recompute_keeps_layer_inputs_plus_one_recomputed_layer():
    cfg = load_config(overrides=TINY_LAYOUT + ["parallel.recompute_granularity=full"])
    first = sizing.estimate_memory(cfg, 8).stages[0]
    full_layer, layer_input = 327_680, 2 * 64 * 4 * 64 / 2      # input sharded by SP
    assert first.activations == 2 * (2 * layer_input + 4 * 64 * 64) + full_layer + 2 * 73_728 \
        == 573_440


def test_balanced_last_stage_accounts_for_the_head():
    m7 = load_config(overrides=["model.preset=aim-7B"]).model
    m600 = load_config(overrides=["model.preset=aim-600M"]).model
    assert sizing.head_layer_equivalents(m7) == pytest.approx(2.05, abs=0.01)
    # 7B, pp=4: 9+9+9 then 5 + ~2 head-layers beats 8+8+8 and 8 + 2
    assert sizing.balanced_last_stage(m7, 4) == 5
    # 600M: the head costs ~14 trunk layers, so with pp=2 the last stage gets 5 of 24
    assert sizing.balanced_last_stage(m600, 2) == 5


def test_recommended_layouts():
    cfg = sizing.resolve_config(preset="aim-7B")       # recipe: bf16, distopt, batch 4096
    small = sizing.recommend_layout(cfg, 64)
    assert (small.tp, small.pp, small.dp, small.micro_batch_size) == (1, 1, 64, 16)
    assert 55 < small.peak_gib < 65
    big = sizing.recommend_layout(cfg, 4096)
    assert (big.tp, big.pp, big.dp, big.micro_batch_size) == (4, 1, 1024, 4)
    assert "larger global batch" in big.note


def test_estimate_memory_cli():
    tool = [sys.executable, str(ROOT / "tools" / "estimate_memory.py")]
    out = subprocess.run(tool + ["--preset", "aim-7B", "--gpus", "64"], capture_output=True,
                         text=True, check=True).stdout
    assert "dp=64" in out and "peak 59.56 GiB on stage 0: fits" in out
    # 7B in fp32 with a replicated optimizer needs 16 B x 6.86B params: does not fit, --check fails
    bad = subprocess.run(tool + ["--preset", "aim-7B", "--gpus", "8", "--precision", "fp32",
                                 "--no-distopt", "--check"], capture_output=True, text=True)
    assert bad.returncode == 1 and "does NOT fit" in bad.stdout
    table = subprocess.run(tool + ["--table", "--gpus", "8", "4096"], capture_output=True,
                           text=True, check=True).stdout
    assert "| aim-600M | 8 | 1 | 1 | 8 | 16 | 32 | none |" in table
    assert table.count("\n") == 2 + 4 * 2
