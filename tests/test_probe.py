"""Probes on a frozen AIM trunk: the attentive probe's structure and math, layer sets, top-k and
confusion-matrix arithmetic, learning a separable task, the aim-probe command on real
Fashion-MNIST giving the same probe under TP=2 x DP=2 as in one process, and on a real image
folder with corrupt files under DP=2 as in one process."""
import json

import numpy as np
import pytest
import torch

from aim_megatron.evaluation import labelled_data, probe_cli, probe_train
from aim_megatron.evaluation import probe as P
from aim_megatron.config import ConfigError, ModelConfig
from samples import REAL_JPEGS
from conftest import run_distributed
from test_training import pretrain


pytestmark = pytest.mark.usefixtures("one_thread")

def test_attentive_probe_structure_matches_the_paper():
    probe = P.AttentiveProbe(dim=32, num_heads=4, num_classes=10)
    assert probe.bn.weight is None and probe.bn.bias is None and probe.bn.eps == 1e-6
    params = dict(probe.named_parameters())
    assert sorted(params) == ["cls_token", "k.weight", "linear.weight", "v.weight"]  # no bias (official)
    assert params["cls_token"].shape == (1, 1, 32)  # one query
    assert 0.01 < params["cls_token"].std().item() < 0.04
    # The keys of a released head.* probe, nothing more.
    assert sorted(probe.state_dict()) == sorted(
        ["cls_token", "k.weight", "v.weight", "linear.weight",
         "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"])
    linear = P.LinearProbe(32, 10)
    assert [n for n, _ in linear.named_parameters()] == ["linear.weight", "linear.bias"]


def test_token_batchnorm_equals_torch_batchnorm():
    ours, ref = P.TokenBatchNorm(8), torch.nn.BatchNorm1d(8, eps=1e-6, affine=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = 3 * torch.randn(5, 7, 8, generator=g) + 1
        torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 3
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_attention_pooling_is_per_head_softmax_of_query_against_keys():
    probe = P.AttentiveProbe(dim=8, num_heads=2, num_classes=3).eval()
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    x = probe.bn(tokens)
    q, k, v = probe.cls_token[0, 0], probe.k(x), probe.v(x)
    pooled = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(k[..., s] @ q[s] / 2.0, dim=-1)  # scale 1/sqrt(head_dim=4)
        pooled.append((weights[..., None] * v[..., s]).sum(1))
    torch.testing.assert_close(probe(tokens), probe.linear(torch.cat(pooled, -1)), rtol=1e-5, atol=1e-6)


def test_layer_sets():
    m = lambda **kw: ModelConfig(**kw)
    assert P.resolve_layers("last", m(num_layers=24)) == list(range(18, 24))
    assert P.resolve_layers("best", m(preset="aim-600M", num_layers=24)) == list(range(14, 20))
    assert P.resolve_layers("best", m(preset="aim-1B", num_layers=24)) == list(range(12, 18))
    assert P.resolve_layers("best", m(preset="aim-7B", num_layers=32)) == list(range(14, 20))
    # Other trunks: 6 blocks ending 4 before the last, clamped at block 0.
    assert P.resolve_layers("best", m(num_layers=12)) == [2, 3, 4, 5, 6, 7]
    assert P.resolve_layers("best", m(num_layers=6)) == [0, 1]
    assert P.resolve_layers("best", m(num_layers=4)) == [0]
    assert P.resolve_layers("last", m(num_layers=4)) == [0, 1, 2, 3]
    assert P.resolve_layers([3, 1, 3], m(num_layers=4)) == [1, 3]
    assert P.resolve_layers("1,2", m(num_layers=4)) == [1, 2]
    with pytest.raises(ConfigError, match=r"\[0, 4\]: the trunk has 4 blocks, valid 0-based indices are 0..3"):
        P.resolve_layers([0, 4], m(num_layers=4))
    with pytest.raises(ConfigError, match="'last', 'best' or a list"):
        P.resolve_layers("first", m(num_layers=4))


def test_probe_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("probe:\n  kind: linear\n  layers: [1, 2]\n  lr: 3e-3\n")
    cfg, rest = P.load_probe_config(path, ["probe.epochs=3", "parallel.tp=2", "probe.layers=best"])
    assert (cfg.kind, cfg.layers, cfg.lr, cfg.epochs) == ("linear", "best", 3e-3, 3)
    assert rest == ["parallel.tp=2"]
    with pytest.raises(ConfigError, match="probe.lrate: unknown field"):
        P.load_probe_config(None, ["probe.lrate=1"])
    with pytest.raises(ConfigError, match="probe.kind='mlp'"):
        P.load_probe_config(None, ["probe.kind=mlp"])
    with pytest.raises(ConfigError, match="probe.feature_dtype='fp16': use float32 or bfloat16"):
        P.load_probe_config(None, ["probe.feature_dtype=fp16"])


def test_topk_and_confusion_matrix_on_a_hand_made_example():
    logits = torch.tensor([[0.9, 0.5, 0.1, 0.0, 0.2, 0.3],    # label 0: top-1 hit
                           [0.1, 0.2, 0.9, 0.8, 0.7, 0.6],    # label 5: 4th best -> top-5 only
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],    # label 5: last -> miss
                           [0.0, 0.1, 0.0, 0.0, 0.0, 0.0]])   # label 1: hit
    labels = torch.tensor([0, 5, 5, 1])
    assert probe_train.topk_correct(logits, labels, (1, 2, 5)) == {1: 2, 2: 2, 5: 3}
    assert probe_train.topk_correct(logits[:, :3], torch.tensor([0, 2, 2, 1]), (5,)) == {5: 4}  # k capped at 3 classes
    cm = probe_train.confusion_matrix(logits.argmax(1), labels, 6)
    assert cm[0, 0] == 1 and cm[1, 1] == 1 and cm[5, 2] == 1 and cm[5, 0] == 1 and cm.sum() == 4
    result = probe_train.evaluate(torch.nn.Identity(), logits, labels, 6)
    assert (result["top1"], result["top5"], result["num_samples"]) == (0.5, 0.75, 4)


def separable_tokens(n: int, seed: int, classes: int = 10, tokens: int = 8, dim: int = 32):
    """One token at a random position carries a class prototype; the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, tokens, dim, generator=g)
    where = torch.randint(0, tokens, (n,), generator=g)
    x[torch.arange(n), where] += 2 * protos[labels]
    return x, labels


def test_attentive_probe_learns_a_separable_task():
    x, y = separable_tokens(1500, seed=0)
    xt, yt = separable_tokens(500, seed=1)
    cfg = P.ProbeConfig(epochs=15, batch_size=100, lr=1e-2)
    probe = P.AttentiveProbe(32, 4, 10)
    chance = probe_train.evaluate(probe, xt, yt, 10)["top1"]
    history = probe_train.train_probe(probe, x, y, 0, len(y), cfg)
    result = probe_train.evaluate(probe, xt, yt, 10)
    assert history[-1] < history[0] - 0.5
    assert chance < 0.25 and result["top1"] > 0.9, (chance, result["top1"])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained")
    pretrain(run, ["train.train_iters=20", "train.lr=3e-3", "train.eval_iters=1"])
    return run / "checkpoints"


ARGS = ["--train-samples", "2000", "--test-samples", "500", "probe.epochs=8", "probe.batch_size=100"]


def test_probe_command_tp2_dp2_equals_one_process(tiny_checkpoint, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    assert probe_cli.main(["--checkpoint", str(tiny_checkpoint), "--out", str(one), *ARGS]) == 0
    run_distributed("-m", 4, ["aim_megatron.probe", "--checkpoint", str(tiny_checkpoint), "--out", str(four), *ARGS, "parallel.tp=2"])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, four))
    assert (a["tp"], a["dp"], b["tp"], b["dp"]) == (1, 1, 2, 2)
    assert a["num_test"] == b["num_test"] == 500 and a["num_train"] == 2000
    assert sum(map(sum, a["confusion_matrix"])) == sum(map(sum, b["confusion_matrix"])) == 500
    assert a["layers"] == [0, 1, 2, 3] and a["num_classes"] == 10
    assert abs(a["top1"] - b["top1"]) <= 1 / 500 and abs(a["top5"] - b["top5"]) <= 1 / 500
    for la, lb in zip(a["train_loss_per_epoch"], b["train_loss_per_epoch"]):
        assert abs(la - lb) < 1e-5
    pa, pb = (P.load_probe(d / "probe.safetensors")[1]["state_dict"] for d in (one, four))
    for key in pa:
        torch.testing.assert_close(pa[key].float(), pb[key].float(), rtol=1e-5, atol=1e-5, msg=key)
    # Real images, a briefly trained tiny trunk: well above chance (0.1).
    assert a["top1"] > 0.5 and a["top5"] > 0.9, a
    assert (one / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_command_errors(tiny_checkpoint, capsys):
    assert probe_cli.main(["--checkpoint", str(tiny_checkpoint), "probe.layers=[0,9]"]) == 1
    assert "valid 0-based indices are 0..3" in capsys.readouterr().err
    assert probe_cli.main(["--checkpoint", str(tiny_checkpoint), "parallel.pp=2"]) == 1
    assert "keep parallel.pp=1" in capsys.readouterr().err
    assert probe_cli.main(["--checkpoint", str(tiny_checkpoint.parent / "nothing")]) == 1
    assert "is not a checkpoint" in capsys.readouterr().err


def test_probe_data_npz_fashion_mnist_and_folders(tmp_path):
    from aim_megatron.config import Config
    from samples import make_real_jpeg_folder

    def cfg(channels):
        c = Config()
        c.model.image_size, c.model.in_channels = 16, channels
        return c

    rgb = np.zeros((3, 20, 24, 3), dtype=np.uint8)
    rgb[1] = 255
    np.savez(tmp_path / "d.npz", train_images=rgb, train_labels=np.array([0, 1, 2]),
             test_images=rgb[:2], test_labels=np.array([2, 1]), class_names=np.array(["a", "b", "c"]))
    data = labelled_data.open_labelled(str(tmp_path / "d.npz"), "train", cfg(1), max_samples=2)
    assert len(data) == 2 and data.class_names == ["a", "b", "c"]
    whole = labelled_data.open_labelled(str(tmp_path / "d.npz"), "train", cfg(1))
    x = torch.stack([whole[i][0] for i in range(3)])
    assert x.shape == (3, 1, 16, 16)  # RGB -> gray, centered 20x20 square resized to 16 (validation crop)
    torch.testing.assert_close(x[1], torch.ones(1, 16, 16))    # (1 - 0.5) / 0.5
    torch.testing.assert_close(x[0], -torch.ones(1, 16, 16))
    gray = labelled_data.open_labelled("fashion-mnist", "test", cfg(3), max_samples=10)
    x, label, _ = gray[0]
    assert len(gray) == 10 and x.shape == (3, 16, 16) and 0 <= label < 10  # gray -> RGB, ImageNet mean/std
    torch.testing.assert_close(x[0] * 0.229 + 0.485, x[2] * 0.225 + 0.406)
    np.savez(tmp_path / "only_train.npz", train_images=rgb, train_labels=np.array([0, 1, 2]))
    with pytest.raises(FileNotFoundError, match="has no test_images or test_labels; it holds train_images"):
        labelled_data.open_labelled(str(tmp_path / "only_train.npz"), "test", cfg(1))
    with pytest.raises(FileNotFoundError, match="train_images/train_labels"):
        labelled_data.open_labelled(str(tmp_path / "missing.npz"), "train", cfg(1))

    # An image folder with class sub-folders: labels from the folders, corrupt files -> None.
    files = make_real_jpeg_folder(tmp_path / "imgs")
    folder = labelled_data.open_labelled(str(tmp_path / "imgs"), "train", cfg(3))
    assert len(folder) == len(files["good"]) + len(files["bad"])
    items = [folder[i] for i in range(len(folder))]
    corrupt = sorted(name for x, _, name in items if x is None)
    assert corrupt == sorted(str(f) for f in files["bad"])
    assert all(x.shape == (3, 16, 16) for x, _, _ in items if x is not None)
    assert {folder.class_names[label] for x, label, _ in items if x is not None} == set(P_KINDS)
    # Split directories, explicit sources, and what fails.
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert labelled_data.data_specs(str(tmp_path)) == {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}
    (tmp_path / "test").rmdir()
    (tmp_path / "val").mkdir()
    assert labelled_data.data_specs(str(tmp_path))["test"] == str(tmp_path / "val")
    assert labelled_data.data_specs("fashion-mnist", "a", "b") == {"train": "a", "test": "b"}
    with pytest.raises(FileNotFoundError, match="both --train-data and --test-data"):
        labelled_data.data_specs("fashion-mnist", "a")
    with pytest.raises(FileNotFoundError, match="no train sub-folder"):
        labelled_data.data_specs(str(tmp_path / "imgs"))
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test or val sub-folder"):
        labelled_data.data_specs(str(tmp_path / "only_train"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(files["good"][0].read_bytes())
    with pytest.raises(FileNotFoundError, match="has no labels"):
        labelled_data.open_labelled(str(tmp_path / "flat"), "train", cfg(3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        labelled_data.open_labelled(str(tmp_path / "nowhere"), "train", cfg(3))


P_KINDS = list(REAL_JPEGS)


def test_probe_on_an_image_folder_with_corrupt_files_dp2_equals_one_process(tiny_checkpoint, tmp_path):
    # 16 real JPEGs in 5 classes + 3 corrupt files in a class folder sorted between them: the corrupt
    # files all fall in DP rank 1's half, so the ranks hold 9 and 7 good images; the probe must
    # still see the same 16-image data set, in the same order, as one process.
    from samples import make_real_jpeg_folder
    files = make_real_jpeg_folder(tmp_path / "imgs")
    args = ["--train-data", str(tmp_path / "imgs"), "--test-data", str(tmp_path / "imgs"),
            "probe.epochs=4", "probe.batch_size=8", "probe.feature_batch_size=5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert probe_cli.main(["--checkpoint", str(tiny_checkpoint), "--out", str(one), *args]) == 0
    run_distributed("-m", 2, ["aim_megatron.probe", "--checkpoint", str(tiny_checkpoint), "--out", str(two), *args])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (a["dp"], b["dp"]) == (1, 2)
    n_good = len(files["good"])
    assert a["num_train"] == b["num_train"] == a["num_test"] == b["num_test"] == n_good
    assert a["num_corrupt"] == b["num_corrupt"] == {"train": 3, "test": 3}
    assert a["num_classes"] == 6 and a["class_names"] == sorted(P_KINDS + ["bad"])
    for la, lb in zip(a["train_loss_per_epoch"], b["train_loss_per_epoch"], strict=True):
        assert abs(la - lb) < 1e-5
    pa, pb = (P.load_probe(d / "probe.safetensors")[1]["state_dict"] for d in (one, two))
    for key in pa:
        torch.testing.assert_close(pa[key].float(), pb[key].float(), rtol=1e-5, atol=1e-5, msg=key)
    assert abs(a["top1"] - b["top1"]) <= 1 / n_good
    # Features in memory-mapped files instead of RAM (one per split and rank): the same probe.
    cached = tmp_path / "cached"
    run_distributed("-m", 2, ["aim_megatron.probe", "--checkpoint", str(tiny_checkpoint), "--out", str(cached),
                              *args, f"probe.feature_cache_dir={tmp_path / 'cache'}"])
    d = json.loads((cached / "metrics.json").read_text())
    assert d["train_loss_per_epoch"] == b["train_loss_per_epoch"] and d["top1"] == b["top1"]
    shapes = {f.name: np.load(f, mmap_mode="r").shape for f in (tmp_path / "cache").iterdir()}
    assert sorted(shapes) == [f"{s}-rank{r:05d}.npy" for s in ("test", "train") for r in (0, 1)]
    # each rank's file has a row per item of its shard; rows of corrupt items stay unused
    assert shapes["train-rank00000.npy"][0] + shapes["train-rank00001.npy"][0] == n_good + len(files["bad"])
    # Features cached in bfloat16 (half the memory), here in a memory-mapped file: the probe is
    # trained in fp32 on them and lands close to the fp32-cache run.
    half = tmp_path / "bf16"
    assert probe_cli.main(["--checkpoint", str(tiny_checkpoint), "--out", str(half), *args,
                   "probe.feature_dtype=bfloat16", f"probe.feature_cache_dir={tmp_path / 'cache16'}"]) == 0
    assert np.load(tmp_path / "cache16" / "train-rank00000.npy", mmap_mode="r").dtype == np.uint16  # bf16 bits
    c = json.loads((half / "metrics.json").read_text())
    assert c["probe_config"]["feature_dtype"] == "bfloat16" and c["num_train"] == n_good
    for la, lc in zip(a["train_loss_per_epoch"], c["train_loss_per_epoch"], strict=True):
        assert abs(la - lc) < 0.05 * la, (a["train_loss_per_epoch"], c["train_loss_per_epoch"])
