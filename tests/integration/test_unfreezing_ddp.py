"""GradualUnfreezing under real 2-process CPU DDP: the ranks stay bitwise identical through every
transition, decide transitions together, and never run backward through the frozen prefix.

Each rank trains on other samples (DistributedSampler), so any parameter whose gradient DDP does
not all-reduce makes the ranks drift; ``test_without_rewrap_ranks_drift`` shows that the same
comparison catches it when the DDP re-wrap at a transition is switched off.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_ddp_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integration" / "scripts" / "ddp_unfreeze.py"

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def run_ddp(out_dir: Path, config: str, no_rewrap: bool = False, timeout: float = 240) -> tuple[dict, dict]:
    return run_ddp_script(SCRIPT, out_dir, [config], env={"LFT_NO_REWRAP": "1" if no_rewrap else "0"},
                          timeout=timeout)


def assert_ranks_identical(r0: dict, r1: dict, epochs: int) -> None:
    """Bitwise-equal weights (and buffers) at every step and epoch end, same phases and transitions."""
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert r0["strategy_model"] == r1["strategy_model"] == "DistributedDataParallel"
    assert [e["epoch"] for e in r0["epochs"]] == [e["epoch"] for e in r1["epochs"]] == list(range(epochs))
    for e0, e1 in zip(r0["epochs"], r1["epochs"]):
        epoch = e0["epoch"]
        assert e0["phase"] == e1["phase"], f"epoch {epoch}: rank phases differ"
        assert e0["transitions"] == e1["transitions"], f"epoch {epoch}: rank transitions differ"
        assert (e0["wait"], e0["best"]) == (e1["wait"], e1["best"]), f"epoch {epoch}: plateau counters differ"
        assert e0["requires_grad"] == e1["requires_grad"], f"epoch {epoch}: trainable sets differ"
        assert e0["param_hash"] == e1["param_hash"], f"epoch {epoch}: parameters differ between ranks"
        assert e0["hash"] == e1["hash"], f"epoch {epoch}: parameters or buffers differ between ranks"
        assert e0["lrs"] == e1["lrs"], f"epoch {epoch}: learning rates differ between ranks"
    assert r0["fit_end"] is not None and r1["fit_end"] is not None
    assert r0["fit_end"]["hash"] == r1["fit_end"]["hash"], "final parameters or buffers differ between ranks"
    assert r0["fit_end"]["transitions"] == r1["fit_end"]["transitions"]
    s0, s1 = r0["steps"], r1["steps"]
    assert [s["global_step"] for s in s0] == [s["global_step"] for s in s1]
    for a, b in zip(s0, s1):
        assert a["phase"] == b["phase"], f"step {a['global_step']}: phases differ"
        assert a["param_hash_after_step"] == b["param_hash_after_step"], (
            f"step {a['global_step']} (epoch {a['epoch']}, phase {a['phase']}): parameters differ between ranks"
        )


def assert_frozen_prefix_untouched(record: dict) -> None:
    """At every step: no grad on frozen params, no autograd graph through the frozen prefix,
    frozen BatchNorm in eval mode; a new DDP wrapper exactly at the first step of each phase."""
    previous_phase = None
    for s in record["steps"]:
        where = f"rank {record['rank']}, step {s['global_step']} (phase {s['phase']})"
        assert s["frozen_with_grad"] == [], f"{where}: frozen parameters got a .grad: {s['frozen_with_grad'][:3]}"
        assert s["trainable_without_grad"] == [], f"{where}: trainable parameters without grad"
        assert s["frozen_prefix_unseen_with_params"] == [], f"{where}: forward hooks did not fire"
        assert s["frozen_prefix_outputs_requiring_grad"] == [], (
            f"{where}: outputs of frozen modules require grad (backward through the frozen prefix): "
            f"{s['frozen_prefix_outputs_requiring_grad']}"
        )
        assert s["first_trainable"] is not None
        assert s["first_trainable_output_requires_grad"] is True, f"{where}: positive control of the hooks"
        assert s["frozen_bn_in_train_mode"] == [], f"{where}: frozen BatchNorm in train mode"
        assert s["new_ddp_wrapper"] == (s["phase"] != previous_phase), (
            f"{where}: DDP should be re-wrapped exactly when the phase changes"
        )
        previous_phase = s["phase"]


def phase_of_steps(record: dict) -> dict[int, tuple[list[str], str]]:
    """phase -> (frozen prefix, first trainable module) at the first step trained in that phase."""
    seen: dict[int, tuple[list[str], str]] = {}
    for s in record["steps"]:
        seen.setdefault(s["phase"], (s["frozen_prefix"], s["first_trainable"]))
    return seen


def test_milestones_finetunemodule_ranks_stay_identical(tmp_path):
    r0, r1 = run_ddp(tmp_path, "milestones")
    assert_ranks_identical(r0, r1, epochs=4)
    for record in (r0, r1):
        # the phases really advanced, at the milestone epochs, on both ranks
        assert [e["phase"] for e in record["epochs"]] == [0, 1, 2, 3]
        transitions = record["fit_end"]["transitions"]
        assert [(t["epoch"], t["step"], t["phase"]) for t in transitions] == [(1, 4, 1), (2, 8, 2), (3, 12, 3)]
        assert [t["groups"] for t in transitions[:2]] == [["layer4.0"], ["layer3.0", "layer2.0"]]
        assert {"stem", "layer1.0"} <= set(transitions[2]["groups"])  # "all"
        trainable = [sum(e["requires_grad"].values()) for e in record["epochs"]]
        assert trainable[0] == 2 and trainable == sorted(set(trainable)), trainable  # head only, then strictly more
        assert all(record["fit_end"]["requires_grad"].values())
        assert_frozen_prefix_untouched(record)
        first = phase_of_steps(record)
        assert sorted(first) == [0, 1, 2, 3], "a step must run right after each transition"
        assert first[0][1] == "head"
        assert (first[1][0][-1], first[1][1]) == ("backbone.layer3", "backbone.layer4")
        assert (first[2][0][-1], first[2][1]) == ("backbone.layer1", "backbone.layer2")
        assert first[3] == ([], "backbone.conv1")
        # layer-decayed named groups kept through the thaws (lrs already compared across ranks)
        names = record["fit_end"]["group_names"]
        assert "head" in names and "layer4.0" in names and "stem" in names


def test_plateau_user_module_with_layer_decay_decides_together(tmp_path):
    """A plain module (own AdamW + OneCycleLR, LayerwiseLRDecay) and a per-rank scripted metric:
    alone rank 0 would thaw at epoch 2 and rank 1 at epoch 1; together both thaw at 1 and 3."""
    r0, r1 = run_ddp(tmp_path, "plateau")
    assert_ranks_identical(r0, r1, epochs=5)
    for record in (r0, r1):
        assert [e["phase"] for e in record["epochs"]] == [0, 1, 1, 2, 2]
        transitions = record["fit_end"]["transitions"]
        assert [(t["epoch"], t["phase"], t["groups"]) for t in transitions] == [
            (1, 1, ["layer4.0", "layer3.0"]), (3, 2, ["layer2.0", "layer1.0"]),
        ]
        assert all("val/scripted did not improve" in t["reason"] for t in transitions)
        assert record["fit_end"]["best"] == pytest.approx(0.75) and record["fit_end"]["wait"] == 0
        assert_frozen_prefix_untouched(record)
        first = phase_of_steps(record)
        assert sorted(first) == [0, 1, 2]
        assert (first[1][0][-1], first[1][1]) == ("backbone.layer2", "backbone.layer3")
        assert (first[2][0][-1], first[2][1]) == ("backbone.maxpool", "backbone.layer1")
        assert record["fit_end"]["group_names"][-2:] == ["head", "head/no_decay"]  # LayerwiseLRDecay's groups


def test_without_rewrap_ranks_drift(tmp_path):
    """Negative control: with rewrap_ddp replaced by a no-op, the comparison above must fail."""
    r0, r1 = run_ddp(tmp_path, "milestones", no_rewrap=True)
    assert [e["phase"] for e in r0["epochs"]] == [e["phase"] for e in r1["epochs"]] == [0, 1, 2, 3]
    assert not any(s["new_ddp_wrapper"] for s in r0["steps"][1:]), "the no-op patch did not take effect"
    # head-only epoch: DDP built with the head trainable syncs it, the ranks agree
    assert r0["epochs"][0]["hash"] == r1["epochs"][0]["hash"]
    # after the first thaw, layer4.0's gradients are not all-reduced: the ranks drift apart
    first_thawed = [s for s in r0["steps"] if s["phase"] == 1][0]["global_step"]
    drifted = [
        a["global_step"] for a, b in zip(r0["steps"], r1["steps"])
        if a["param_hash_after_step"] != b["param_hash_after_step"]
    ]
    assert drifted and drifted[0] == first_thawed, (drifted, first_thawed)
    assert r0["fit_end"]["param_hash"] != r1["fit_end"]["param_hash"]
    with pytest.raises(AssertionError, match="differ"):
        assert_ranks_identical(r0, r1, epochs=4)


def test_temporal_model_in_bf16_ranks_stay_identical_after_each_thaw(tmp_path):
    """A satellite-image-time-series model (every date through the backbone, an attention temporal head)
    under bf16-mixed: the temporal head trains from the start as the head group, and the ranks stay
    bitwise identical through the thaws at epochs 1 (layer4.0) and 2 (all)."""
    r0, r1 = run_ddp(tmp_path, "temporal")
    assert_ranks_identical(r0, r1, epochs=3)
    for record in (r0, r1):
        assert [e["phase"] for e in record["epochs"]] == [0, 1, 2]
        trainable = [sum(record["epochs"][e]["requires_grad"].values()) for e in range(3)]
        assert trainable == sorted(set(trainable)), trainable  # strictly more at each thaw
        first_epoch = record["epochs"][0]["requires_grad"]
        assert all(v for n, v in first_epoch.items() if n.startswith("head.")) and not any(
            v for n, v in first_epoch.items() if n.startswith("backbone."))
        assert all(record["fit_end"]["requires_grad"].values())
        assert_frozen_prefix_untouched(record)
        first = phase_of_steps(record)
        assert sorted(first) == [0, 1, 2] and first[0][1] == "head"
        assert first[1][1] == "backbone.layer4"
