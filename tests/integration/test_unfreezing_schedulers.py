"""Unfreezing never bends a learning-rate curve; LayerwiseLRDecay == FineTuneModule(layer_decay=...).

Each group's lr at every step of a run with GradualUnfreezing must equal the lr the same scheduler
gives that group in a run where every group trains from the start.
"""

from functools import partial

import lightning as L
import pytest
import torch
from torch.optim import lr_scheduler as S

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import GradualUnfreezing, LayerwiseLRDecay
from tests.conftest import fast_trainer, random_loader
from tests.helpers import LrRecorder, ScriptedModule, TimmUserModule, vector_loader

DECAY = 0.6
EPOCHS = 4
SCORES = [1.0, 0.9, 0.9, 0.9, 0.9]  # drives ReduceLROnPlateau identically in both runs


def _total(trainer):
    return int(trainer.estimated_stepping_batches)


SCHEDULERS = {
    "linear_warmup_then_cosine": lambda opt, tr: {
        "scheduler": S.SequentialLR(
            opt, [S.LinearLR(opt, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(opt, T_max=_total(tr) - 3)],
            milestones=[3],
        ),
        "interval": "step",
    },
    "one_cycle": lambda opt, tr: {"scheduler": S.OneCycleLR(opt, max_lr=0.02, total_steps=_total(tr)), "interval": "step"},
    "lambda": lambda opt, tr: {"scheduler": S.LambdaLR(opt, lambda s: 0.9**s), "interval": "step"},
    "warm_restarts": lambda opt, tr: {"scheduler": S.CosineAnnealingWarmRestarts(opt, T_0=3), "interval": "step"},
    "step_per_epoch": lambda opt, tr: {"scheduler": S.StepLR(opt, step_size=1, gamma=0.5), "interval": "epoch"},
    "cosine_per_epoch": lambda opt, tr: {"scheduler": S.CosineAnnealingLR(opt, T_max=EPOCHS), "interval": "epoch"},
    "plateau": lambda opt, tr: {
        "scheduler": S.ReduceLROnPlateau(opt, factor=0.5, patience=0), "interval": "epoch", "monitor": "val/score",
    },
}


def _run(scheduler, unfreeze, order="gu_first"):
    torch.manual_seed(0)
    module = ScriptedModule(SCORES, scheduler=scheduler)
    recorder = LrRecorder()
    callbacks = [LayerwiseLRDecay(DECAY, verbose=False), recorder]
    if unfreeze:
        gu = GradualUnfreezing(monitor=None, milestones={1: ["body.2"], 2: ["body.1"], 3: "all"}, verbose=False)
        callbacks = [gu, *callbacks] if order == "gu_first" else [*callbacks, gu]
    trainer = fast_trainer(max_epochs=EPOCHS, callbacks=callbacks)
    trainer.fit(module, vector_loader(), vector_loader(n=8))
    return recorder.steps, module


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_unfreezing_keeps_every_groups_curve(name):
    reference, _ = _run(SCHEDULERS[name], unfreeze=False)
    got, module = _run(SCHEDULERS[name], unfreeze=True)
    assert len(got) == len(reference) == EPOCHS * 4
    assert got == reference  # same names, same lrs, bitwise, at every step
    names = [n for n, _ in got[0]]
    layers = ["body.0", "body.1", "body.2", "head"]
    assert names == [f"{layer}{suffix}" for layer in layers for suffix in ("", "/no_decay")]  # biases: no decay
    for step in got:
        lrs = dict(step)
        for k, layer in enumerate(reversed(layers)):
            assert lrs[layer] == lrs[f"{layer}/no_decay"] == pytest.approx(lrs["head"] * DECAY**k, rel=1e-9)
    assert len({dict(s)["head"] for s in got}) > 1  # the scheduler moved
    assert all(p.requires_grad for p in module.parameters())  # the run did thaw everything


@pytest.mark.parametrize("name", ["one_cycle", "linear_warmup_then_cosine"])
def test_callbacks_compose_in_either_order(name):
    a, _ = _run(SCHEDULERS[name], unfreeze=True, order="gu_first")
    b, _ = _run(SCHEDULERS[name], unfreeze=True, order="decay_first")
    assert a == b


def test_layerwise_lr_decay_on_a_users_module_equals_finetunemodule():
    def steps(model, callbacks):
        recorder = LrRecorder()
        fast_trainer(max_epochs=2, callbacks=[*callbacks, recorder]).fit(model, random_loader())
        return recorder.steps

    torch.manual_seed(0)
    ours = FineTuneModule("test_resnet", num_classes=3, lr=0.01, weight_decay=0.05, layer_decay=DECAY,
                          lr_scheduler=partial(S.OneCycleLR, max_lr=0.01))
    user = TimmUserModule(lambda opt, tr: {"scheduler": S.OneCycleLR(opt, max_lr=0.01, total_steps=_total(tr)),
                                           "interval": "step"})
    a = steps(ours, [])
    b = steps(user, [LayerwiseLRDecay(DECAY, verbose=False)])
    assert [[n for n, _ in s] for s in a] == [[n for n, _ in s] for s in b]
    for sa, sb in zip(a, b):
        assert [lr for _, lr in sa] == pytest.approx([lr for _, lr in sb], rel=1e-12)


def test_warmup_ramps_only_the_newly_thawed_groups_inside_the_step():
    effective = []

    class Probe(LrRecorder):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]

            def hook(optimizer, args, kwargs):  # runs after GradualUnfreezing's pre-hook
                effective.append({g["name"]: g["lr"] for g in optimizer.param_groups})

            self.handle = opt.register_step_pre_hook(hook)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass  # Lightning calls this inside optimizer.step (after the pre-hooks): read lrs at batch start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.steps.append([(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups])

    gu = GradualUnfreezing(monitor=None, milestones={1: ["body.2"]}, warmup_steps=3, verbose=False)
    probe = Probe()
    module = ScriptedModule(scheduler=None)
    fast_trainer(max_epochs=2, callbacks=[gu, LayerwiseLRDecay(DECAY, verbose=False), probe]).fit(
        module, vector_loader(), vector_loader(n=8))
    scheduled = [dict(s) for s in probe.steps]
    # steps 4, 5, 6 (the first three after thawing body.2 at epoch 1) ramp 1/4, 2/4, 3/4; then full
    for i, factor in zip(range(4, 8), [0.25, 0.5, 0.75, 1.0]):
        assert effective[i]["body.2"] == pytest.approx(scheduled[i]["body.2"] * factor)
        assert effective[i]["head"] == scheduled[i]["head"]  # groups already training: untouched
    assert all(s["body.2"] == scheduled[0]["body.2"] for s in scheduled)  # the optimizer keeps its lr


def test_bf16_mixed_runs_through_all_phases():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, layer_decay=0.7)
    cb = GradualUnfreezing(monitor="val/loss", patience=0, groups_per_step=2, verbose=False)
    trainer = fast_trainer(max_epochs=4, precision="bf16-mixed", callbacks=[cb])
    trainer.fit(model, random_loader(), random_loader(n=8))
    assert cb.phase == cb.num_phases - 1 == 3
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


TRAINABLE_ONLY_SCHEDULERS = {
    "one_cycle": SCHEDULERS["one_cycle"],
    "lambda": SCHEDULERS["lambda"],
    "cosine": lambda opt, tr: {"scheduler": S.CosineAnnealingLR(opt, T_max=_total(tr)), "interval": "step"},
}


@pytest.mark.parametrize("name", sorted(TRAINABLE_ONLY_SCHEDULERS))
def test_optimizer_over_trainable_params_only_keeps_its_curve_and_thaws_at_the_heads_lr(name):
    """``AdamW(p for p in self.parameters() if p.requires_grad)``: one group, which takes in what will thaw."""
    scheduler = TRAINABLE_ONLY_SCHEDULERS[name]

    def run(only_trainable, unfreeze):
        torch.manual_seed(0)
        module = ScriptedModule(SCORES, scheduler=scheduler, only_trainable=only_trainable)
        recorder, owner = LrRecorder(), {}

        class Owner(L.Callback):  # the lr each parameter was stepped with, per step
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            owner.setdefault(trainer.global_step, {})[id(p)] = group["lr"]

        callbacks = [recorder, Owner()]
        if unfreeze:
            callbacks.append(GradualUnfreezing(milestones={1: ["body.2"], 2: "all"}, verbose=False))
        trainer = fast_trainer(max_epochs=EPOCHS, callbacks=callbacks)
        trainer.fit(module, vector_loader(), vector_loader(n=8))
        return module, trainer, recorder.steps, owner

    module, trainer, steps, owner = run(only_trainable=True, unfreeze=True)
    _, _, reference, _ = run(only_trainable=False, unfreeze=False)
    assert len(trainer.optimizers[0].param_groups) == 1
    assert [lr for ((_, lr),) in steps] == [lr for ((_, lr),) in reference]  # the curve as configured, bitwise
    head, body0, body2 = (id(module.head.weight), id(module.body[0].weight), id(module.body[2].weight))
    for step, lrs in owner.items():
        epoch = step // 4
        assert (body2 in lrs) == (epoch >= 1) and (body0 in lrs) == (epoch >= 2), step
        assert all(lr == lrs[head] for lr in lrs.values())  # thawed params step at the head's lr
    state = trainer.optimizers[0].state
    assert int(state[module.body[0].weight]["step"]) == (EPOCHS - 2) * 4


FT_MILESTONES = {1: ["layer4.0"], 2: ["layer3.0", "layer2.0"], 3: "all"}
FT_LEVELS = ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]  # test_resnet, stem first
FT_SCHEDULERS = {  # FineTuneModule(lr_scheduler=...): a callable taking the optimizer (lengths and max_lr filled in)
    "default_warmup_cosine": None,
    "one_cycle": partial(S.OneCycleLR, max_lr=0.02),
    "cosine": partial(S.CosineAnnealingLR),
    "linear": partial(S.LinearLR, start_factor=0.1, total_iters=6),
    "cyclic": partial(S.CyclicLR, base_lr=1e-4, max_lr=0.02, step_size_up=3, cycle_momentum=False),
}


def _ft_run(name, unfreeze):
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, lr=0.02, layer_decay=DECAY, warmup=0.25,
                           lr_scheduler=FT_SCHEDULERS[name])
    recorder, stepped = LrRecorder(), []

    class Stepped(L.Callback):  # the groups whose parameters got a gradient, per step
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            stepped.append({g["name"].removesuffix("/no_decay") for g in optimizer.param_groups
                            if any(p.grad is not None for p in g["params"])})

    callbacks = [recorder, Stepped()]
    if unfreeze:
        callbacks.insert(0, GradualUnfreezing(milestones=FT_MILESTONES, verbose=False))
    trainer = fast_trainer(max_epochs=EPOCHS, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, random_loader(n=32, batch=8, size=16))
    return recorder.steps, stepped, model


@pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
@pytest.mark.parametrize("name", sorted(FT_SCHEDULERS))
def test_finetunemodule_layer_decay_with_gradual_unfreezing_keeps_every_groups_curve(name):
    """FineTuneModule(layer_decay=..., lr_scheduler=...) + GradualUnfreezing(milestones=...): each group's lr at
    every step equals the lr it has in the same run with every group training from the start."""
    reference, stepped_ref, _ = _ft_run(name, unfreeze=False)
    got, stepped, model = _ft_run(name, unfreeze=True)
    assert len(got) == len(reference) == EPOCHS * 4
    assert got == reference  # same names, same lrs, bitwise, at every step
    for step in got:  # and the curve is layer-decayed: head * DECAY**k, k counted from the architecture
        lrs = dict(step)
        for k, level in enumerate(reversed(FT_LEVELS)):
            assert lrs[level] == pytest.approx(lrs["head"] * DECAY**k, rel=1e-9), level
    assert len({dict(s)["head"] for s in got}) > 1  # the scheduler moved
    # the run did thaw on the milestones: head, then layer4.0, then layer3.0 + layer2.0, then everything
    phases = [{"head"}, {"head", "layer4.0"}, {"head", "layer4.0", "layer3.0", "layer2.0"}, set(FT_LEVELS)]
    assert stepped == [phases[step // 4] for step in range(EPOCHS * 4)]
    assert all(s == set(FT_LEVELS) for s in stepped_ref)
    assert all(p.requires_grad for p in model.parameters())
