"""Step time and activation memory by number of unfrozen layer groups, on one process and under 2-rank DDP.

EfficientNet-Lite0 (pretrained asset), 64 px, batch 32, AdamW, the head plus the top ``k`` of its
layer groups trainable (``lightning_ft.layer_groups``: 17 backbone groups + head), frozen BatchNorm in
eval. For each ``k``: the median step time (forward + backward + optimizer step) and the bytes that
autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded: the
activation memory), plus CUDA's peak allocation when a GPU is there. Frozen groups before the first
trainable one keep nothing and compute no gradient: the memory column is the proof, the time column
the payoff. Under DDP (gloo, 2 CPU processes, each its own batch of 32) the module is wrapped anew for
each ``k``, as GradualUnfreezing does at a transition.

    python benchmarks/memory.py                 # k = 0, 1, 2, 4, 8, all on 1 process, then DDP
    python benchmarks/memory.py --ks 0 1 --steps 2 --quick

If a measurement fails (a ``k`` on one process raises, or a DDP rank dies), the rest still runs and
prints, a ``FAILED`` line names what failed and the error, and the exit status is 1. A DDP rank that
dies ends the other one (it would wait in a collective for gloo's 30-minute timeout).
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def build(seed: int = 0) -> nn.Module:
    from lightning_ft import FineTuneModule

    torch.manual_seed(seed)
    return FineTuneModule("tf_efficientnet_lite0", num_classes=10, pretrained="efficientnet_lite0", in_chans=1,
                          img_size=64)


def set_trainable(model: nn.Module, k: int) -> int:
    """Head + top ``k`` backbone groups trainable, the rest frozen (BatchNorm of frozen groups in eval)."""
    from lightning_ft import layer_groups

    groups = layer_groups(model)
    backbone_groups = groups[:-1]
    trainable = {n for g in [groups[-1], *backbone_groups[len(backbone_groups) - k:]] for n in g.param_names} if k else \
        set(groups[-1].param_names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return len(backbone_groups)


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def measure(model: nn.Module, k: int, steps: int, batch: int, rank: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 1, 64, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    act = activation_bytes(inner, x, y)  # the inner module: DDP's reducer is not in the way of the hook
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    with_grad = sum(1 for p in inner.parameters() if p.requires_grad)
    return {"k": k, "step_ms": 1e3 * statistics.median(times), "act_mib": act / 2**20, "params_with_grad": with_grad}


def single(ks: list[int], steps: int, batch: int, failed: list[str]) -> list[dict[str, Any]]:
    """One row per k; a k that raises is reported (FAILED line, traceback on stderr), added to ``failed``, skipped."""

    def report(what: str, err: Exception) -> None:
        traceback.print_exc()
        failed.append(f"1 process, {what}: {type(err).__name__}: {err}")
        print(f"FAILED: 1 process, {what}: {type(err).__name__}: {err}", flush=True)

    try:
        model = build()
    except Exception as err:  # noqa: BLE001 -- reported, counted, and the exit status says so
        report("building the model", err)
        return []
    out = []
    for k in ks:
        try:
            total = set_trainable(model, k)
            out.append(measure(model, min(k, total), steps, batch))
        except Exception as err:  # noqa: BLE001 -- reported, counted, and the exit status says so
            report(f"k={k}", err)
            continue
        if torch.cuda.is_available():
            out[-1]["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _ddp_worker(rank: int, ks: list[int], steps: int, batch: int, port: int, queue: Any) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = build()
    rows = []
    for k in ks:
        total = set_trainable(model, k)
        ddp = nn.parallel.DistributedDataParallel(model)  # a new wrap per trainable set
        rows.append(measure(ddp, min(k, total), steps, batch, rank))
        del ddp
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def ddp(ks: list[int], steps: int, batch: int) -> list[dict[str, Any]]:
    """Rank 0's rows; RuntimeError naming the rank and its exit code if a rank dies (the other is then ended)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_ddp_worker, args=(r, ks, steps, batch, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = None
    try:
        while rows is None:
            try:
                rows = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(", ".join(f"DDP rank {r} exited with status {code}" for r, code in dead)
                                       + " (its traceback is on stderr)") from None
                if all(p.exitcode == 0 for p in procs) and queue.empty():
                    raise RuntimeError("the DDP ranks exited without sending rank 0's rows") from None
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8, 17])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.quick:
        args.ks, args.steps, args.batch = args.ks[:2], 1, 4
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch}; median of {args.steps} steps")
    failed: list[str] = []
    tables = [("1 process", single(args.ks, args.steps, args.batch, failed))]
    if not args.no_ddp:
        title = "DDP, 2 CPU ranks (gloo, 1 thread each), rank 0"
        try:
            tables.append((title, ddp(args.ks, args.steps, args.batch)))
        except Exception as err:  # noqa: BLE001 -- reported, counted, and the exit status says so
            failed.append(f"{title}: {type(err).__name__}: {err}")
            print(f"FAILED: {title}: {type(err).__name__}: {err}", flush=True)
    for title, rows in tables:
        if not rows:
            continue
        base = rows[-1]
        print(f"\n{title}\n")
        print("| unfrozen groups | step (ms) | vs the last row | activations kept (MiB) | params with grad |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            extra = f" (CUDA peak {r['cuda_peak_mib']:.0f} MiB)" if "cuda_peak_mib" in r else ""
            print(f"| {r['k']} | {r['step_ms']:.1f} | {r['step_ms'] / base['step_ms']:.2f} | {r['act_mib']:.1f}{extra} | "
                  f"{r['params_with_grad']} |")
    if failed:
        print(f"\nFAILED: {len(failed)} measurement(s):")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
