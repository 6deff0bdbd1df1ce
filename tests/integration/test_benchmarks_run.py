"""Benchmarks are not tests, but each runs in its quick mode here so it cannot rot.

Each run must exit with status 0 and print no ``FAILED`` line (a benchmark whose arm crashed still
prints its table, and the crashed arm's label, in its failure note: the expected strings alone would
pass), and what it prints is read: where a benchmark claims equality (the two arms of prefix_cache.py
end with the same weights; the 1-process and DDP rows of memory.py keep the same activations) the
numbers are parsed and compared; ratios must be finite and positive, accuracies within [0, 100]%.
The last tests break one arm from the outside (a ``sitecustomize`` on ``PYTHONPATH`` makes one
library function raise in every process) and check that the script says FAILED and exits non-zero.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf")


# unfreezing.py runs every tool and seed in a subprocess of its own: 410 s for its 2-seed case on 2 busy cores
TIMEOUT = {"unfreezing.py": 1200}


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT.get(script, 600), env=env,
    )


def _failed_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "FAILED" in line]


def _assert_clean(script: str, result: subprocess.CompletedProcess) -> str:
    """Status 0 and no FAILED line: every arm ran."""
    failed = _failed_lines(result.stdout)
    assert result.returncode == 0 and not failed, (
        f"{script} exited with {result.returncode}; FAILED lines: {failed}\n"
        + result.stdout[-3000:] + result.stderr[-3000:]
    )
    return result.stdout


# ------------------------------------------------------------------------------------ parsing
def _tables(out: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table printed: (header cells, rows of cells)."""
    lines = out.splitlines()
    found = []
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+\s*", lines[i + 1]):
            rows = []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append(_cells(line))
            found.append((_cells(lines[i]), rows))
    return found


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(out: str, first_column: str, *columns: str, count: int = 1) -> list[list[dict[str, str]]]:
    """The ``count`` tables whose first header cell starts with ``first_column`` and which have a column
    starting with each of ``columns``, rows as {header: cell}."""
    what = (first_column, *columns)
    tables = []
    for head, rows in _tables(out):
        if head[0].startswith(first_column) and all(any(h.startswith(c) for h in head) for c in columns):
            assert rows, f"table {what} has no rows:\n{out[-3000:]}"
            assert all(len(row) == len(head) for row in rows), f"table {what} has rows of the wrong width: {rows}"
            tables.append([dict(zip(head, row)) for row in rows])
    assert len(tables) == count, f"expected {count} table(s) headed {what}, found {len(tables)}:\n{out[-3000:]}"
    return tables


def _column(row: dict[str, str], prefix: str) -> str:
    keys = [k for k in row if k.startswith(prefix)]
    assert len(keys) == 1, f"no single column starting with {prefix!r} in {list(row)}"
    return row[keys[0]]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(text.replace(",", ""))]


def _number(text: str) -> float:
    values = _numbers(text)
    assert values, f"no number in {text!r}"
    return values[0]


def _positive(value: float, what: str) -> None:
    assert math.isfinite(value) and value > 0, f"{what} = {value}: not finite and positive"


def _percent(value: float, what: str) -> None:
    assert 0.0 <= value <= 100.0, f"{what} = {value}: not an accuracy in [0, 100]%"


def _line_number(out: str, pattern: str) -> float:
    match = re.search(pattern, out)
    assert match, f"no line matching {pattern!r}:\n{out[-3000:]}"
    return float(match.group(1))


# ------------------------------------------------------------------------- per-script checks
def check_unfreezing(out: str, tools: list[str], seeds: list[int], failed: tuple[str, ...] = (),
                     forward: bool = True) -> None:
    """The tables of unfreezing.py: ``tools`` ran for ``seeds``, except ``failed`` (absent, or n/a); the no-grad
    forward reference's table unless ``--no-forward`` (``forward=False``) skipped it."""
    ran = [t for t in tools if t not in failed]
    labels = {"ours": "lightning_ft GradualUnfreezing",
              "ours_eval": "lightning_ft GradualUnfreezing, frozen_bn='eval'",
              "ours_train_bn": "lightning_ft GradualUnfreezing, frozen_bn='train'",
              "lightning": "Lightning BackboneFinetuning", "fts": "finetuning-scheduler"}
    assert "phases do not match" not in out, out[-3000:]
    # per phase: every tool in phase 0 and 2, ratios finite and positive, ours' exactly 1;
    # the arms that differ from ours only in frozen_bn train the same parameters in every phase
    (per_phase,) = _table(out, "phase")
    params: dict[tuple[str, str], str] = {}
    for row in per_phase:
        label = row["tool"].split(" (head only")[0]
        params[(row["phase"], label)] = row["trainable params (optimized)"]
        _positive(_number(row["mean train epoch (s)"]), f"per-phase epoch time {row}")
        _positive(_number(row["ratio to ours"]), f"per-phase ratio {row}")
        if label == labels["ours"]:
            assert row["ratio to ours"] == "1.00", row
    assert {label for _, label in params} == {labels[t] for t in ran}, (params, ran)
    for tool in ran:
        for phase in ("0 head", "2 all"):
            assert (phase, labels[tool]) in params, f"no {phase!r} row for {tool}:\n{out[-3000:]}"
        if tool.startswith("ours_"):
            for phase in ("0 head", "1 +upper half", "2 all"):
                assert params[(phase, labels[tool])] == params[(phase, labels["ours"])], (phase, tool, params)
    # whole run (the first seed): one row per tool, accuracy in [0, 100]%
    (whole,) = _table(out, "tool", "fit (s)")
    by_label = {row["tool"]: row for row in whole}
    assert set(by_label) == {labels[t] for t in ran}, (set(by_label), ran)
    for row in whole:
        _positive(_number(row["ratio to ours"]), f"whole-run ratio {row}")
        _percent(_number(row["test accuracy"]), f"test accuracy {row}")
    # the no-grad forward comparison
    if not forward:
        assert "no-grad forward" not in out, "--no-forward still ran the forward reference"
    for row in (_table(out, "measure")[0] if forward else []):
        _positive(_number(row["ratio"]), f"forward ratio {row}")
    # accuracy over seeds: mean, per-seed values, paired difference to ours
    (accuracy,) = _table(out, "tool", "per seed")
    per_seed: dict[str, dict[int, float]] = {}
    for row in accuracy:
        tool = next(t for t, label in labels.items() if label == row["tool"])
        if tool in failed:
            assert list(row.values())[1:] == ["0", "n/a", "n/a", "n/a"], row
            continue
        assert int(row["seeds"]) == len(seeds), row
        values = dict(re.findall(r"(\d+): ([-+\d.]+)", _column(row, "per seed")))
        assert [int(s) for s in values] == seeds, row
        per_seed[tool] = {int(s): float(v) for s, v in values.items()}
        for v in per_seed[tool].values():
            _percent(v, f"{tool} per-seed accuracy")
        mean = _numbers(_column(row, "test accuracy"))
        assert abs(mean[0] - sum(per_seed[tool].values()) / len(seeds)) <= 0.11, row  # each printed to 0.1
        if len(seeds) > 1:
            assert len(mean) == 2 and math.isfinite(mean[1]) and mean[1] >= 0, row  # a standard deviation
        diff = _column(row, "paired difference")
        if tool == "ours":
            assert diff == "baseline", row
        else:  # the mean of the paired differences is the difference of the means
            expected = sum(per_seed[tool][s] - per_seed["ours"][s] for s in seeds) / len(seeds)
            assert abs(_number(diff) - expected) <= 0.16, (row, expected)  # each printed to 0.1
    assert set(per_seed) == set(ran) and len(accuracy) == len(tools), (accuracy, tools)
    # the first seed's whole-run accuracy is the accuracy table's value for that seed
    for tool in ran:
        assert _number(by_label[labels[tool]]["test accuracy"]) == per_seed[tool][seeds[0]], tool


def check_recipes(out: str) -> None:
    (rows,) = _table(out, "recipe")
    assert [r["recipe"] for r in rows] == ["linear probe", "gradual unfreezing", "full fine-tuning", "full + LLRD"], rows
    for row in rows:
        _percent(_number(_column(row, "test accuracy")), f"{row['recipe']} accuracy")
        low, high = _numbers(row["min–max"].replace("–", " "))
        _percent(low, "min")
        _percent(high, "max")
        assert low <= high, row


def check_adaptation(out: str) -> None:
    (rows,) = _table(out, "method")
    assert [r["method"] for r in rows] == ["source only", "DANN"], rows
    for row in rows:
        _percent(_number(_column(row, "target test accuracy")), f"{row['method']} accuracy")
        _percent(_number(row["same checkpoint + AdaBN"]), f"{row['method']} AdaBN accuracy")
    assert rows[0]["vs source only"] == "+0.0 points", rows[0]
    (selection,) = _table(out, "monitor")
    assert {r["monitor"].split(" (")[0] for r in selection} == {"val/label_free", "val/acc", "val/target_im",
                                                                 "val/target_entropy"}, selection
    for row in selection:
        picked = _number(_column(row, "target val acc of the picked"))
        oracle = _number(_column(row, "best epoch"))
        _percent(picked, "picked")
        _percent(oracle, "oracle")
        assert picked <= oracle + 0.05, f"the picked epoch beats the best epoch in hindsight: {row}"
        rho = _number(_column(row, "Spearman"))
        assert math.isnan(rho) or -1.0 <= rho <= 1.0, row


def check_linear_probe(out: str) -> None:
    (rows,) = _table(out, "data")
    assert [r["tool"] for r in rows] == ["ours", "plain"], rows
    for row in rows:
        _positive(_number(_column(row, "2-epoch fit")), f"{row['tool']} fit time")
        _positive(_number(row["/ one forward pass"]), f"{row['tool']} / forward pass")
        acc = _number(row["test acc"])
        assert 0.0 <= acc <= 1.0, row
    _positive(_number(rows[1]["ours is faster by"]), "ours is faster by")
    # the floors are a forward pass plus something: at least one forward pass
    for pattern in (r"hand-written PyTorch head loop .*= ([\d.]+) x forward pass",
                    r"Lightning floor: .*= ([\d.]+) x forward pass"):
        assert _line_number(out, pattern) >= 1.0


def check_overhead(out: str) -> None:
    (rows,) = _table(out, "arm")
    assert [r["arm"] for r in rows] == ["plain", "callbacks"], rows
    for row in rows:
        _positive(_number(row["median step (ms)"]), "step")
        assert int(row["steps timed"]) > 0, row
    _positive(_line_number(out, r"step-time ratio callbacks / plain: ([\d.eE+-]+)"), "step-time ratio")
    _positive(_line_number(out, r"epoch-time ratio: ([\d.eE+-]+)"), "epoch-time ratio")
    (monitor,) = _table(out, "monitor arm")  # UpdateMonitor against the same loop with a logger
    assert [r["monitor arm"] for r in monitor] == ["logged", "monitor", "monitor, every step"], monitor
    for row in monitor:
        _positive(_number(row["median step (ms)"]), "step")
    _positive(_line_number(out, r"per-step cost, monitor / logged: median step ([\d.eE+-]+)"), "monitor ratio")
    _positive(_line_number(out, r"logging step \(logging_interval=1\), monitor / logged: median step ([\d.eE+-]+)"),
              "logging-step ratio")


def check_prefix_cache(out: str) -> None:
    (rows,) = _table(out, "phase")
    assert [r[next(iter(r))] for r in rows] == ["0", "1", "2", "3", "all"], rows
    for row in rows:
        _positive(_number(row["speed-up"]), f"speed-up {row}")
    # same seed, same batches, the cache only skips recomputing the frozen prefix: the same weights
    # (0.00e+00 measured here; float reordering in the suffix could leave ~1e-7)
    diff = _line_number(out, r"largest difference between the two arms' final weights: ([-+\d.eE]+|nan|inf)")
    assert diff <= 1e-5, f"the cached and uncached arms end {diff:.2e} apart"
    assert _line_number(out, r"final weights: .* \((\d+) tensors\)") > 0


def check_memory(out: str) -> None:
    single, ddp = _table(out, "unfrozen groups", count=2)
    for rows in (single, ddp):
        assert [int(r["unfrozen groups"]) for r in rows] == [0, 1], rows
        for row in rows:
            _positive(_number(row["step (ms)"]), f"step {row}")
        assert int(rows[0]["params with grad"]) < int(rows[1]["params with grad"]), rows
        assert _number(rows[0]["activations kept (MiB)"]) <= _number(rows[1]["activations kept (MiB)"]), rows
    # DDP wraps the same module: the same trainable parameters and saved activations per k
    for one, two in zip(single, ddp):
        assert one["params with grad"] == two["params with grad"], (one, two)
        assert _number(one["activations kept (MiB)"]) == _number(two["activations kept (MiB)"]), (one, two)


def check_image_folder(out: str) -> None:
    (rows,) = _table(out, "arm")
    assert [r["arm"] for r in rows] == ["eval, timm + ImageFolder", "eval, ours", "train, timm + ImageFolder",
                                        "train, ours", "eval, ours, 4-band TIFF"], rows
    for row in rows:
        _positive(_number(row["ms per image"]), f"time {row}")
        bands = 4 if "TIFF" in row["arm"] else 3
        assert row["batch shape"] == f"({bands}, 224, 224)", row
        if row["arm"] in ("eval, ours", "train, ours"):
            _positive(_number(row["ours / baseline"]), f"ratio {row}")


def _accuracy_table(out: str, first: str, arms: list[str]) -> None:
    """A table of accuracies in percent (mean ± std, or ± 95% interval), one row per arm, in order."""
    (rows,) = _table(out, first)
    assert [r[first] for r in rows] == arms, rows
    for row in rows:
        cells = [(key, cell) for key, cell in row.items() if key != first and "±" in cell]
        assert cells, f"no accuracy in row {row}"
        for key, cell in cells:
            mean, spread = (_number(part) for part in cell.split("±"))
            _percent(mean, f"{row[first]} {key}")
            assert 0.0 <= spread <= 100.0, row


def check_bands(out: str) -> None:
    _accuracy_table(out, "arm", ["raw pixels: logistic regression", "raw pixels: kNN (k=5)", "raw pixels: random forest",
                                 "match+noise: probe", "match+noise: fine-tune", "match+noise: staged"])


def check_time_series(out: str) -> None:
    _accuracy_table(out, "pooling", ["attention", "last"])


def check_few_shot(out: str) -> None:
    _accuracy_table(out, "shots", ["1", "5", "10"])


# case -> (script, quick-mode arguments, strings its output must hold, check of the numbers it prints)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], Callable[[str], None]]] = {
    "unfreezing": ("unfreezing.py", ["--quick"],
                   ["| 2 all | lightning_ft GradualUnfreezing |", "| 2 all | Lightning BackboneFinetuning |",
                    "| 2 all | finetuning-scheduler |", "no-grad forward"],
                   lambda out: check_unfreezing(out, ["ours", "lightning", "fts"], [0])),
    # the seeds, with the frozen_bn='eval' arm (frozen_bn='train' runs in the crash test below)
    "unfreezing-seeds": ("unfreezing.py", ["--quick", "--no-forward", "--tools", "ours,ours_eval", "--seeds", "0", "1"],
                         ["| 2 all | lightning_ft GradualUnfreezing, frozen_bn='eval' |",
                          "each seed is also a different data split"],
                         lambda out: check_unfreezing(out, ["ours", "ours_eval"], [0, 1], forward=False)),
    "recipes": ("recipes.py", ["--quick"], [f"| {r} |" for r in ("linear probe", "gradual unfreezing",
                                                                  "full fine-tuning", "full + LLRD")], check_recipes),
    "adaptation": ("adaptation.py", ["--quick"], ["| source only |", "vs source only", "| val/label_free |",
                                                  "best epoch (oracle)"], check_adaptation),
    "linear_probe": ("linear_probe.py", ["--quick", "--tools", "ours", "plain"],
                     ["| 1x | ours |", "| 1x | plain |", "one no-grad forward pass", "hand-written PyTorch head loop",
                      "Lightning floor"], check_linear_probe),
    "overhead": ("overhead.py", ["--quick"], ["step-time ratio callbacks / plain"], check_overhead),
    "prefix_cache": ("prefix_cache.py", ["--quick"], ["| 0 | head |", "| 3 | head, blocks.6.0, blocks.5.3, blocks.5.0",
                                                      "final weights"], check_prefix_cache),
    "memory": ("memory.py", ["--quick"], ["1 process", "DDP, 2 CPU ranks", "| 0 |"], check_memory),
    "image_folder": ("image_folder.py", ["--quick"], ["| eval, ours |", "| train, ours |"], check_image_folder),
    "bands": ("bands.py", ["--quick"], ["Statlog Landsat: "], check_bands),
    "time_series": ("time_series.py", ["--quick"], ["crop time series"], check_time_series),
    "few_shot": ("few_shot.py", ["--quick"], ["6-way"], check_few_shot),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=[pytest.mark.ddp] if name == "memory" else []) for name in BENCHMARKS]
)
def test_benchmark_quick_mode_runs(case):
    script, args, expected, check = BENCHMARKS[case]
    out = _assert_clean(script, _run(script, *args))
    missing = [text for text in expected if text not in out]
    assert not missing, f"{script} output lacks {missing}:\n{out[-3000:]}"
    check(out)


def test_every_benchmark_has_a_quick_run():
    scripts = {script for script, *_ in BENCHMARKS.values()}
    assert {p.name for p in (REPO / "benchmarks").glob("*.py")} <= scripts, "add it to BENCHMARKS"


# ------------------------------------------------------------------ a crashing arm is caught
BREAK_ONE_FUNCTION = '''
"""Test helper (a sitecustomize on PYTHONPATH): once {module} is imported, {attr} raises."""
import importlib.abc
import sys

MODULE, ATTR = {module!r}, {attr!r}


class _Breaker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_break(module):
            exec_module(module)
            *owner, last = ATTR.split(".")
            obj = module
            for part in owner:
                obj = getattr(obj, part)

            def broken(*args, **kwargs):
                raise RuntimeError(f"injected failure in {{MODULE}}.{{ATTR}}")

            setattr(obj, last, broken)

        spec.loader.exec_module = exec_and_break
        return spec


sys.meta_path.insert(0, _Breaker())
'''


def _env_breaking(tmp_path: Path, module: str, attr: str) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(BREAK_ONE_FUNCTION.format(module=module, attr=attr))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_overhead_without_callbacks(out: str) -> None:
    (rows,) = _table(out, "arm")
    assert [r["arm"] for r in rows] == ["plain"], rows
    assert "step-time ratio" not in out, "a ratio although an arm failed"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, module, attr, arm, check",
    [
        # an installed tool that crashes in its own subprocess (finetuning-scheduler's setup raises); the
        # other runs, frozen_bn='train' among them, still print their tables
        ("unfreezing.py", ["--quick", "--no-forward", "--tools", "ours_train_bn,fts"], "finetuning_scheduler",
         "FinetuningScheduler.setup",
         "finetuning-scheduler",
         lambda out: check_unfreezing(out, ["ours", "ours_train_bn", "fts"], [0], failed=("fts",), forward=False)),
        # an arm in the script's own process: GradualUnfreezing.setup raises in the callbacks arm of overhead.py
        ("overhead.py", ["--quick"], "lightning_ft.callbacks.unfreezing", "GradualUnfreezing.setup",
         "callbacks", check_overhead_without_callbacks),
    ],
    ids=["unfreezing-fts-subprocess", "overhead-in-process"],
)
def test_a_crashing_arm_fails_the_benchmark(tmp_path, script, args, module, attr, arm, check):
    result = _run(script, *args, env=_env_breaking(tmp_path, module, attr))
    out = result.stdout
    assert result.returncode != 0, f"{script} exited 0 although an arm crashed:\n{out[-3000:]}"
    failed = _failed_lines(out)
    assert any(arm in line and f"injected failure in {module}.{attr}" in line for line in failed), (
        f"no FAILED line naming {arm!r} and the error:\n{out[-3000:]}\n{result.stderr[-2000:]}"
    )
    check(out)  # what the other arms measured is still printed
    with pytest.raises(AssertionError, match="FAILED lines"):  # what the quick-mode test says of this run
        _assert_clean(script, result)
