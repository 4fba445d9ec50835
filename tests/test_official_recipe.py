"""ml-l3m's aim_v1 pre-training recipe, written out from its config (configs/aimv1/001_aim_v1_600M.yaml),
against our scheduler: fvcore CompositeParamScheduler of LinearParamScheduler(1e-6 -> lr) over the
first 2.5% and CosineParamScheduler(lr -> 0) over the rest, both "rescaled", evaluated at
where = step / total_steps before each step."""
import math

import torch

from aim_megatron.config import load_config
from aim_megatron.training.optim import build_scheduler
from conftest import TINY


def official_lr(step: int, total: int, lr: float, warmup_frac: float = 0.025, start: float = 1e-6) -> float:
    where = step / total
    if where < warmup_frac:  # LinearParamScheduler, rescaled to its own [0, 1)
        return start + (where / warmup_frac) * (lr - start)
    local = (where - warmup_frac) / (1 - warmup_frac)  # CosineParamScheduler, end_value 0
    return 0.5 * lr * (1 + math.cos(math.pi * local))


def test_schedule_is_ml_l3m_aim_v1(one_thread):
    total = 400  # warmup 2.5% = 10 steps exactly, as fvcore's fractions
    cfg = load_config(None, [*TINY, f"train.train_iters={total}", "train.lr=1e-3", "train.scale_lr=false",
                             "train.warmup_fraction=0.025", "train.min_lr=0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(cfg, opt)
    for step in range(total):
        ours = opt.param_groups[0]["lr"]
        assert math.isclose(ours, official_lr(step, total, 1e-3), rel_tol=1e-9, abs_tol=1e-12), step
        sched.step(1)
    assert opt.param_groups[0]["lr"] == 0.0 or opt.param_groups[0]["lr"] < 1e-9


class _FixedDraws:
    """Stands in for the generator: a given order and given factors."""

    def __init__(self, order, factors):
        self.order, self.factors = list(order), list(factors)

    def permutation(self, n):
        assert n == 4
        return self.order

    def uniform(self, lo, hi):
        return self.factors.pop(0)


def official_jitter(img, order, b, c, s, h):
    """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) on a PIL image (its documented PIL path):
    fn_idx = randperm(4); adjust_brightness = ImageEnhance.Brightness, adjust_contrast =
    ImageEnhance.Contrast, adjust_saturation = ImageEnhance.Color, adjust_hue = H channel of HSV
    plus np.uint8(hue * 255) (uint8 wrap-around); hue on a greyscale image returns it unchanged."""
    import numpy as np
    from PIL import Image, ImageEnhance
    for fn_id in order:
        if fn_id == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif fn_id == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif fn_id == 2 and img.mode == "RGB":
            img = ImageEnhance.Color(img).enhance(s)
        elif fn_id == 3 and img.mode == "RGB":
            hh, ss, vv = img.convert("HSV").split()
            arr = np.array(hh, dtype=np.uint8)
            with np.errstate(over="ignore"):
                arr += np.int64(h * 255).astype(np.uint8)
            img = Image.merge("HSV", (Image.fromarray(arr, "L"), ss, vv)).convert("RGB")
    return img


def test_color_jitter_is_torchvisions_in_every_order():
    import itertools

    import numpy as np
    from PIL import Image

    from aim_megatron.data.pil import color_jitter
    rgb = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    factors = (1.3, 0.7, 1.15, -0.07)
    results = set()
    for order in itertools.permutations(range(4)):
        ours = np.asarray(color_jitter(rgb, _FixedDraws(order, factors)))
        theirs = np.asarray(official_jitter(rgb, order, *factors))
        np.testing.assert_array_equal(ours, theirs)
        results.add(ours.tobytes())
    assert len(results) > 1  # the order matters, so a fixed order would not be the recipe


def test_eval_transform_is_resize_256_center_crop_224():
    """ml-aim's evaluation transform: Resize(256, bicubic) on the shorter side (torchvision: the long
    side becomes int(256 * long / short)), CenterCrop(224) (offsets int(round((size - 224) / 2))),
    ToTensor, Normalize(mean, std)."""
    import numpy as np
    from PIL import Image

    from aim_megatron.data.pil import augment
    cfg = load_config(None, ["model.image_size=224", "model.patch_size=14", "model.in_channels=3"])
    img = Image.fromarray((np.random.default_rng(1).random((400, 300, 3)) * 255).astype(np.uint8))  # w 300, h 400
    ref = img.resize((256, int(256 * 400 / 300)), Image.Resampling.BICUBIC)          # 256 x 341
    left, top = int(round((256 - 224) / 2.0)), int(round((341 - 224) / 2.0))
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    mean, std = cfg.data.normalization(3)
    ref = torch.from_numpy((ref - np.array(mean, np.float32)) / np.array(std, np.float32)).permute(2, 0, 1)
    ours = augment(img, np.random.default_rng(0), cfg, train=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_eval_resize_is_ceil_of_size_over_0875():
    from aim_megatron.data import eval_resize_size
    for size in (224, 28, 112, 36, 336, 448):  # ml-aim val_transforms: math.ceil(img_size / 0.875)
        assert eval_resize_size(size) == math.ceil(size / 0.875)
