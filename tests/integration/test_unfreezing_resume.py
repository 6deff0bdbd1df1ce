"""A fit with GradualUnfreezing killed mid-run (``os._exit``) and resumed from ``last.ckpt`` ends
bitwise identical to the uninterrupted fit: weights, optimizer state, lrs at every step, and the
callback's phase / patience counter / best score / transitions.

Single CPU device, ``deterministic=True``, no shuffling; layer-decayed param groups with a warm-up +
cosine (FineTuneModule) or OneCycle (a user module + LayerwiseLRDecay) schedule, so optimizer and
scheduler state matter. Plateau sequence (patience 2): phase 0 -> 1 at epoch 3, 1 -> 2 at epoch 6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integration" / "scripts" / "resume_unfreeze.py"
STEPS_PER_EPOCH = 4  # 32 samples, batch 8
EPOCHS = 8
# callback state in last.ckpt of epoch k-1 when the run is killed at the start of epoch k
STATE_AT_KILL = {
    3: {"phase": 0, "wait": 1, "best": 0.8},  # before the first transition, mid-patience
    4: {"phase": 1, "wait": 0, "best": None},  # right after the first transition
    6: {"phase": 1, "wait": 1, "best": 0.7},  # after the first transition, mid-patience
}

pytestmark = pytest.mark.slow


def run(out_dir: Path, *args: str, env: dict[str, str] | None = None, expect_rc: int = 0) -> None:
    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == expect_rc, (
        f"{' '.join(args)} exited with {proc.returncode}, expected {expect_rc}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    )


def load_final(out_dir: Path) -> dict:
    result = torch.load(out_dir / "final.pt", map_location="cpu", weights_only=False)
    result.update(json.loads((out_dir / "final.json").read_text()))
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of a configuration, computed once per module."""
    cache: dict[tuple[str, ...], dict] = {}

    def get(*args: str) -> dict:
        if args not in cache:
            out = tmp_path_factory.mktemp("uninterrupted")
            run(out, *args)
            cache[args] = load_final(out)
        return cache[args]

    return get


def kill_and_resume(out: Path, kill_epoch: int, *args: str, env: dict[str, str] | None = None) -> dict:
    run(out, *args, "--kill-epoch", str(kill_epoch), expect_rc=1)
    assert not (out / "final.pt").exists(), "the killed run must not reach the end of fit"
    last = out / "ckpt" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == kill_epoch - 1
    assert ckpt["global_step"] == kill_epoch * STEPS_PER_EPOCH
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("GradualUnfreezing")]
    assert len(states) == 1, list(ckpt["callbacks"])
    expected = STATE_AT_KILL[kill_epoch]
    state = states[0]
    assert {k: state[k] for k in expected} == pytest.approx(expected), "the case does not kill where it claims"
    run(out, *args, "--resume", "--weights-only", "1", env=env)
    return load_final(out)


def assert_same_run(reference: dict, resumed: dict, kill_epoch: int) -> None:
    # the resumed process really continued from the checkpoint (a rerun from scratch would also match)
    assert resumed["resumed_from"] is not None
    assert [s for s, _ in resumed["lrs"]] == list(range(kill_epoch * STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH))
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"])
    # the callback ends where the uninterrupted one did
    for key in ("phase", "wait", "best", "transitions", "requires_grad"):
        assert resumed[key] == reference[key], f"GradualUnfreezing {key}: resumed {resumed[key]!r} != {reference[key]!r}"
    # every lr the optimizer used after the restart (warm-up, cosine/OneCycle, layer decay, thaw ramps)
    ref_lrs = dict((step, lrs) for step, lrs in reference["lrs"])
    bad_lrs = [step for step, lrs in resumed["lrs"] if ref_lrs[step] != lrs]
    assert not bad_lrs, f"learning rates differ after resuming at steps {bad_lrs[:8]}"
    # weights: bitwise
    ref_model, model = reference["model"], resumed["model"]
    assert list(model) == list(ref_model)
    different = [k for k in ref_model if not torch.equal(ref_model[k], model[k])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:4]}"
    # optimizer state: bitwise
    ref_opt, opt = reference["optimizer"], resumed["optimizer"]
    assert sorted(opt["state"]) == sorted(ref_opt["state"])
    for pid, ref_state in ref_opt["state"].items():
        for key, value in ref_state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt["state"][pid][key])), (pid, key)
    assert [g["lr"] for g in opt["param_groups"]] == [g["lr"] for g in ref_opt["param_groups"]]


def test_reference_run_unfreezes_twice(reference):
    """The uninterrupted runs the resume cases are compared with do go through both plateaus."""
    for config in ("ftm", "user"):
        ref = reference("--config", config)
        assert [(t["epoch"], t["step"], t["phase"]) for t in ref["transitions"]] == [(3, 16, 1), (6, 28, 2)]
        assert (ref["phase"], ref["wait"], ref["best"]) == (2, 0, pytest.approx(0.74))
        assert [t["groups"] for t in ref["transitions"]] == [["layer4.0"], ["layer3.0"]]


@pytest.mark.parametrize(
    ("config", "kill_epoch"),
    [
        pytest.param("ftm", 3, id="finetunemodule-killed-before-first-transition"),
        pytest.param("ftm", 4, id="finetunemodule-killed-right-after-first-transition"),
        pytest.param("user", 3, id="user-llrd-killed-before-first-transition"),
        pytest.param("user", 6, id="user-llrd-killed-after-first-transition-mid-patience"),
    ],
)
def test_killed_and_resumed_run_matches_uninterrupted(reference, tmp_path, config, kill_epoch):
    ref = reference("--config", config)
    resumed = kill_and_resume(tmp_path, kill_epoch, "--config", config)
    assert_same_run(ref, resumed, kill_epoch)


def test_resume_without_patience_state_diverges(reference, tmp_path):
    """Negative control: resuming with the patience counter and best score reset (as if they were
    not checkpointed) misses the epoch-6 plateau, and the comparison above catches it."""
    ref = reference("--config", "user")
    resumed = kill_and_resume(tmp_path, 6, "--config", "user", env={"LFT_FORGET_STATE": "wait,best"})
    assert resumed["phase"] == 1 and ref["phase"] == 2
    with pytest.raises(AssertionError, match="phase|differ"):
        assert_same_run(ref, resumed, 6)


def test_resume_during_thaw_warmup_matches_uninterrupted(reference, tmp_path):
    """Killed 0 steps into the 6-step lr ramp of the group thawed at epoch 3: the ramp must go on
    after the restart (it failed, lrs differing at steps 16-21, while the ramp was not checkpointed)."""
    ref = reference("--config", "ftm", "--warmup-steps", "6")
    resumed = kill_and_resume(tmp_path, 4, "--config", "ftm", "--warmup-steps", "6")
    assert_same_run(ref, resumed, 4)
