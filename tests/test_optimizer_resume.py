"""Resume with optimizer state under every Adam class megatron-core 0.16 may pick
(aim_megatron/checkpoint/checkpointer.py, ``_place_adam_step``).

megatron-core's ``megatron/core/optimizer/__init__.py`` (lines 12-34 of 0.16.1) imports
Transformer Engine's FusedAdam as its Adam when TE is installed (the NGC image), apex's next, and
torch's AdamW only when neither is. torch AdamW keeps the step count per parameter; FusedAdam
keeps it per param group and refuses per-parameter keys it does not know. Without TE on this
machine, ``FusedAdamLayout`` below stands in for TE's class: its state_dict()/load_state_dict()
follow TransformerEngine v2.8 (tag v2.8, commit 40c69e751a47ec87786283e125c5eb264101270f),
``transformer_engine/pytorch/optimizers/fused_adam.py``, line numbers as cited, written out by
hand with fp32 states only (the configuration megatron builds without the precision-aware
optimizer)."""
import math

import pytest
import torch

from conftest import TINY

BASE = TINY + ["model.in_channels=1", "train.micro_batch_size=2", "train.global_batch_size=8",
               "train.lr=2e-3", "train.scale_lr=false", "train.log_interval=1",
               "train.tensorboard=false", "train.eval_iters=2"]


class FusedAdamLayout(torch.optim.Optimizer):
    """TE v2.8 FusedAdam's state layout and load/save contract, fp32 states, on CPU."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, bias_correction=True, adam_w_mode=True, **_):
        # fused_adam.py 157-165: group defaults hold no step; adam_w_mode is an instance flag.
        defaults = {"lr": lr, "bias_correction": bias_correction, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        # fused_adam.py 191-195: the only per-parameter state names it knows.
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                                  "master_param": torch.float32}

    def get_unscaled_state(self, param, state_name):
        # fused_adam.py 294-325: the dtype lookup (303) raises KeyError for any other name.
        dtype = self.name_to_dtype_map[state_name]
        assert self.state[param][state_name].dtype == dtype
        return self.state[param][state_name]

    def set_scaled_state(self, param, state_name, unscaled_state):
        # fused_adam.py 327-359: a state absent from self.state[param] is created through
        # _initialize_state (361-399), whose dtype lookup (373) raises KeyError for other names.
        assert unscaled_state.dtype == torch.float32
        state = self.state[param]
        if state_name not in state:
            state[state_name] = torch.empty_like(param, dtype=self.name_to_dtype_map[state_name])
        state[state_name].copy_(unscaled_state)

    def state_dict(self):
        # fused_adam.py 420-442: torch's state dict, every per-parameter entry mapped by name
        # through get_unscaled_state (438-439).
        state_dict = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(ids, params))
        for k, v in state_dict["state"].items():
            if k in by_id:
                state_dict["state"][k] = {name: self.get_unscaled_state(by_id[k], name) for name in v}
        return state_dict

    def load_state_dict(self, state_dict):
        # fused_adam.py 444-473: torch's load (groups keep their saved keys, "step" included),
        # then each parameter's state rebuilt name by name through set_scaled_state (461-473).
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(ids, params))
        for k, v in state_dict["state"].items():
            if k in by_id:
                param = by_id[k]
                self.state[param] = {}
                for name in v:
                    if v[name] is None:
                        continue
                    self.set_scaled_state(param, name, v[name].float())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            # fused_adam.py 497-503: one step count per group, an int (not capturable).
            group["step"] = group["step"] + 1 if "step" in group else 1
            beta1, beta2 = group["betas"]
            bc1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            bc2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:  # fused_adam.py 543-544 -> initialize_state (401-418)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if p.grad is None:
                    continue
                # The multi_tensor_adam kernel, transformer_engine/common/multi_tensor/adam.cu
                # 125-141 (v2.8): mode 0 adds L2 decay to the gradient, mode 1 decouples it.
                g, m, v = p.grad.float(), state["exp_avg"], state["exp_avg_sq"]
                if not self.adam_w_mode:
                    g = g + group["weight_decay"] * p
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                if self.adam_w_mode:
                    update = update + group["weight_decay"] * p
                p.sub_(group["lr"] * update)
        return loss


def _patch_fused(mp):
    """megatron-core as it is built with Transformer Engine installed, with FusedAdamLayout
    as TE's FusedAdam: the Adam class get_megatron_optimizer builds, and the distributed
    optimizer's Adam and the flags that route the step through param groups
    (megatron/core/optimizer/distrib_optimizer.py 21-36)."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer
    mp.setattr(mcore_optimizer, "Adam", FusedAdamLayout)
    mp.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    mp.setattr(distrib_optimizer, "Adam", FusedAdamLayout)
    mp.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    mp.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)


def _patch_torch_adamw(mp):
    """megatron-core as it is built without TE and apex (this CPU machine): torch AdamW, also
    on a GPU machine whose image has TE."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer
    mp.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", True)
    mp.setattr(distrib_optimizer, "Adam", torch.optim.Adam)
    mp.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)
    mp.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", False)
    mp.setattr(distrib_optimizer, "USING_APEX_OPTIMIZER", False)


@pytest.fixture
def fused_adam(monkeypatch):
    _patch_fused(monkeypatch)
    return monkeypatch


@pytest.fixture
def torch_adamw(monkeypatch):
    _patch_torch_adamw(monkeypatch)
    return monkeypatch


def trainer_for(out, overrides=()):
    from aim_megatron.config import load_config
    from aim_megatron.distributed import parallel
    from aim_megatron.training.trainer import Trainer
    cfg = load_config(None, [*BASE, f"train.output_dir={out}", *overrides])
    return Trainer(cfg, parallel.initialize(cfg))


def torch_optimizers(trainer):
    from aim_megatron.checkpoint.checkpointer import _inner_optimizers
    return [opt.optimizer for opt in _inner_optimizers(trainer.optimizer)]


def params_of(trainer):
    return torch.cat([p.detach().flatten().clone() for c in trainer.model for p in c.parameters()])


def run_steps(trainer, n):
    return [trainer.train_step()["loss"] for _ in range(n)]


def train_and_resume(tmp_path, layout, steps=6, split=3):
    """Losses and weights of an uninterrupted run, and of one saved after ``split`` steps and
    resumed in a new Trainer (new model and optimizer, as a restarted job builds them)."""
    full = trainer_for(tmp_path / "full", layout)
    full_losses, full_params = run_steps(full, steps), params_of(full)
    full.close()
    first = trainer_for(tmp_path / "split", layout)
    split_losses = run_steps(first, split)
    first.save()
    first.close()
    second = trainer_for(tmp_path / "split", layout)
    assert second.resume("auto") and second.step == split
    split_losses += run_steps(second, steps - split)
    return full_losses, split_losses, full_params, params_of(second), second


LAYOUTS = {
    "fp32": [],                                                   # FP32Optimizer
    "bf16": ["train.params_dtype=bf16"],                          # Float16OptimizerWithFloat16Params
    "distopt": ["parallel.use_distributed_optimizer=true"],       # DistributedOptimizer (DP=1)
}


def test_the_stand_in_is_as_strict_as_te_fused_adam():
    """What broke the first resume under TE: a per-parameter 'step' in a FusedAdam load."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = FusedAdamLayout([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["step"] == 1 and set(saved["state"][0]) == {"exp_avg", "exp_avg_sq"}
    saved["state"][0]["step"] = torch.tensor(1.0)
    with pytest.raises(KeyError, match="step"):
        FusedAdamLayout([torch.nn.Parameter(torch.ones(4))]).load_state_dict(saved)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_under_fused_adam_is_exact(tmp_path, layout, fused_adam, one_thread):
    from aim_megatron.checkpoint.checkpointer import keeps_step_per_parameter
    full_losses, split_losses, full_params, split_params, resumed = train_and_resume(tmp_path, LAYOUTS[layout])
    (opt,) = torch_optimizers(resumed)
    assert isinstance(opt, FusedAdamLayout) and not keeps_step_per_parameter(opt)
    assert all("step" not in state for state in opt.state.values())
    assert {g["step"] for g in opt.param_groups if g["params"]} == {6}
    assert full_losses == split_losses
    assert torch.equal(full_params, split_params)
    resumed.close()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_under_the_installed_optimizer_is_exact(tmp_path, layout, one_thread):
    """Whatever Adam megatron picked on this machine: torch AdamW here, TE's own FusedAdam in
    the NGC image (make gpu-check runs this file there)."""
    full_losses, split_losses, full_params, split_params, resumed = train_and_resume(tmp_path, LAYOUTS[layout])
    assert full_losses == split_losses
    assert torch.equal(full_params, split_params)
    resumed.close()


@pytest.mark.parametrize("layout", ["fp32", "bf16"])
def test_resume_under_torch_adamw_is_exact(tmp_path, layout, torch_adamw, one_thread):
    """The fallback without TE or apex (this machine): the step stays per parameter, one tensor each."""
    from aim_megatron.checkpoint.checkpointer import keeps_step_per_parameter
    full_losses, split_losses, full_params, split_params, resumed = train_and_resume(tmp_path, LAYOUTS[layout])
    (opt,) = torch_optimizers(resumed)
    assert isinstance(opt, torch.optim.AdamW) and keeps_step_per_parameter(opt)
    steps = [state["step"] for state in opt.state.values()]
    assert {float(s) for s in steps} == {6.0} and len({id(s) for s in steps}) == len(steps)
    assert full_losses == split_losses
    assert torch.equal(full_params, split_params)
    resumed.close()


def test_checkpoint_saved_at_step_0_resumes_under_both_classes(tmp_path, torch_adamw, one_thread):
    """megatron drops a zero step from the checkpoint (``if step:``): torch AdamW needs one per
    parameter back, FusedAdam must get none. Zero Adam moments and no step are what a save
    right after loading an import holds (megatron's init_state_fn fills the moments on load)."""
    from aim_megatron.checkpoint.checkpointer import _inner_optimizers
    first = trainer_for(tmp_path, [])
    for opt in _inner_optimizers(first.optimizer):
        opt.init_state_fn(opt.optimizer, opt.config)
    first.save()
    first.close()
    with pytest.MonkeyPatch.context() as mp:
        _patch_fused(mp)
        resumed = trainer_for(tmp_path, [])
        assert resumed.resume("auto") and resumed.step == 0
        assert all(math.isfinite(loss) for loss in run_steps(resumed, 2))
        assert {g["step"] for g in torch_optimizers(resumed)[0].param_groups if g["params"]} == {2}
        resumed.close()
    resumed = trainer_for(tmp_path, [])
    assert resumed.resume("auto")
    run_steps(resumed, 2)
    assert {float(s["step"]) for s in torch_optimizers(resumed)[0].state.values()} == {2.0}
    resumed.close()


def test_step_count_crosses_between_optimizer_classes(tmp_path, torch_adamw, one_thread):
    """A checkpoint written under torch AdamW (a CPU run) resumes under FusedAdam (the NGC image)
    with its step count in the param groups, and the other way round per parameter."""
    torch_run = trainer_for(tmp_path / "torch", [])
    run_steps(torch_run, 3)
    torch_run.save()
    torch_run.close()
    with pytest.MonkeyPatch.context() as mp:
        _patch_fused(mp)
        fused = trainer_for(tmp_path / "torch", [])
        assert fused.resume("auto")
        opt = torch_optimizers(fused)[0]
        assert {g["step"] for g in opt.param_groups if g["params"]} == {3}
        assert all("step" not in s for s in opt.state.values())
        run_steps(fused, 2)
        fused.save()
        fused.close()
    back = trainer_for(tmp_path / "torch", [])
    assert back.resume("auto") and back.step == 5
    assert {float(s["step"]) for s in torch_optimizers(back)[0].state.values()} == {5.0}
    run_steps(back, 1)
    assert {float(s["step"]) for s in torch_optimizers(back)[0].state.values()} == {6.0}
    back.close()
