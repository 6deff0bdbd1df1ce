"""The frozen prefix of a network: find where it ends, compute it once, run the rest from there.

While gradual unfreezing has thawed only the top of a backbone, everything before the first
trainable layer computes the same function of the input at every step. :func:`find_cut` finds the
*cut*: the module whose input is the last point the frozen part and the trainable part share. A
:class:`PrefixCut` then

* ``capture(run, x)``: runs the model up to the cut and returns the cut module's input (the forward
  stops there: the suffix is not computed);
* ``inject(features)``: a context in which the model runs from the cut: the modules of the prefix
  return placeholders instead of computing, and the cut module receives ``features``.

The model's input is a tensor, or a dict of batch-first tensors (an image time series
``{"images": (B, T, C, H, W), "mask": (B, T), "doy": (B, T)}``). Of a dict, the floating-point
tensor with the most elements per sample is the one the prefix consumes (:func:`placeholder_key`):
it becomes a NaN placeholder, and the other entries are *extras*, passed for real while injecting
(the part after the cut -- a temporal head -- reads them). A module may see more rows than samples
(``images.flatten(0, 1)`` runs ``B*T`` images through the backbone): the trace records ``k = rows /
batch`` per module call; a cut whose input has ``k > 1`` rows per sample captures them folded,
``(n, k, ...)``, one row per sample for the table, and ``inject`` unfolds them.

The cut is found by tracing one forward pass (eval mode, no grad, modes restored afterwards): the
first module, in execution order, that owns a trainable parameter or is a BatchNorm/dropout/
drop-path layer in training mode, or else one of its enclosing modules (a residual block whose
first conv is frozen but whose BatchNorm trains is cut at the block's input). Everything that exits
before the cut is entered is the prefix. Models are not all chains: a skip connection that carries
a prefix value past the cut would be lost. So every candidate is verified on a real batch -- the
injected run must equal the full one -- and the placeholders are NaN, so any leak is loud. The
innermost candidate that verifies is the cut; if none does, ``find_cut`` says why.

torch only: no Lightning here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

__all__ = ["Inputs", "PrefixCut", "changes_in_training_mode", "find_cut", "input_rows", "inputs_to", "is_live",
           "placeholder_key"]

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]  # a model input: a tensor or a dict of batch-first tensors


def placeholder_key(x: Inputs) -> str | None:
    """The entry of dict inputs the frozen prefix consumes: the floating-point tensor with the most elements
    per sample (the images of a time series); ``None`` for a tensor input.

    Raises a ``ValueError`` for a dict that is not one of batch-first tensors with a floating-point entry.
    """
    if isinstance(x, torch.Tensor):
        return None
    if not (isinstance(x, Mapping) and x and all(isinstance(v, torch.Tensor) and v.ndim >= 1 for v in x.values())):
        kind = type(x).__name__ + (f" of {', '.join(sorted({type(v).__name__ for v in x.values()}))}"
                                   if isinstance(x, Mapping) and x else "")
        raise ValueError(f"the model's inputs are a {kind}, not a tensor or a dict of batch-first tensors")
    sizes = {k: v.shape[0] for k, v in x.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the tensors of the inputs dict have different batch sizes ({sizes})")
    floats = [k for k, v in x.items() if v.is_floating_point()]
    if not floats:
        raise ValueError(f"the inputs dict ({', '.join(map(str, x))}) has no floating-point tensor for the frozen part to read")
    return max(floats, key=lambda k: x[k][:1].numel())  # the first of equals


def input_rows(x: Inputs) -> int:
    """The number of samples in ``x`` (a tensor, or a dict of batch-first tensors)."""
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else int(next(iter(x.values())).shape[0])


def inputs_to(x: Inputs, device: torch.device | str) -> Inputs:
    """``x`` on ``device`` (every tensor of a dict)."""
    return x.to(device) if isinstance(x, torch.Tensor) else {k: v.to(device) for k, v in x.items()}


def _rows_of(x: Inputs, index: slice) -> Inputs:
    return x[index] if isinstance(x, torch.Tensor) else {k: v[index] for k, v in x.items()}


def changes_in_training_mode(m: nn.Module) -> bool:
    """BatchNorm (with running statistics), dropout and drop-path compute differently in training mode."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return bool(m.track_running_stats)
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    prob = getattr(m, "drop_prob", None)  # timm DropPath / DropBlock
    return isinstance(prob, float) and prob > 0


def is_live(m: nn.Module) -> bool:
    """Does this module's own computation train or change from batch to batch?"""
    if any(p.requires_grad for p in m.parameters(recurse=False)):
        return True
    return m.training and changes_in_training_mode(m)


class _Stop(BaseException):
    """Raised by the capture hook: the forward pass ends at the cut (a BaseException, so that a model's
    own ``except Exception`` cannot swallow it)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


@dataclass
class _Call:
    name: str
    enter: int
    exit: int = -1
    shape: tuple[int, ...] | None = None  # of the output without the leading dim (None: not one float tensor)
    dtype: torch.dtype | None = None
    tensor_input: bool = False  # called with a tensor as its first positional argument
    rows: int | None = None  # the output's leading size (k * batch for k rows per sample)
    in_rows: int | None = None  # the leading size of the first positional argument


def _per_sample(rows: int | None, batch: int) -> int | None:
    """``k``: the rows per sample of a leading size ``rows`` for ``batch`` samples, or ``None``."""
    return rows // batch if rows and rows % batch == 0 else None


def _trace(root: nn.Module, run: Callable[[Inputs], Any], x: Inputs) -> list[_Call]:
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    clock = [0]
    handles = []

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    for name, module in root.named_modules():
        def pre(m: nn.Module, args: Any, name: str = name) -> None:
            tensor_input = bool(args) and isinstance(args[0], torch.Tensor)
            call = _Call(name, tick(), tensor_input=tensor_input,
                         in_rows=args[0].shape[0] if tensor_input and args[0].ndim >= 1 else None)
            calls.append(call)
            open_calls.setdefault(id(m), []).append(call)

        def post(m: nn.Module, args: Any, out: Any) -> None:
            call = open_calls[id(m)].pop()
            call.exit = tick()
            if isinstance(out, torch.Tensor) and out.ndim >= 1 and out.is_floating_point():
                call.shape, call.dtype, call.rows = tuple(out.shape[1:]), out.dtype, out.shape[0]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        run(x)
    finally:
        for h in handles:
            h.remove()
    return calls


@contextlib.contextmanager
def _eval_no_grad(root: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _nan(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # one element, broadcast: a placeholder costs no memory whatever its shape
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


class PrefixCut:
    """A verified cut of ``root``: see the module docstring. Build it with :func:`find_cut`."""

    def __init__(self, root: nn.Module, name: str, skipped: dict[str, tuple[int, tuple[int, ...], torch.dtype]],
                 prefix: list[str], input_shape: tuple[int, ...], input_dtype: torch.dtype, rows: int = 1,
                 input_key: str | None = None, input_keys: tuple[str, ...] = ()) -> None:
        modules = dict(root.named_modules())
        self.name = name  # the cut module: its input is what the table stores
        self.module = modules[name]
        self.skipped = {modules[n]: spec for n, spec in skipped.items()}  # module -> (rows per sample, shape, dtype)
        self.prefix = prefix  # every module that runs before the cut
        self.rows = rows  # rows of the cut module's input per sample (k): captured folded as (n, k, ...)
        # the model's input: its per-sample shape and dtype (of the dict entry ``input_key``; the other
        # entries, ``input_keys`` in order, are extras passed for real)
        self.input_shape, self.input_dtype = input_shape, input_dtype
        self.input_key, self.input_keys = input_key, input_keys
        tensors: dict[int, torch.Tensor] = {}
        for n in prefix:  # recursively: a prefix module's uncalled children may act through it
            tensors.update({id(t): t for t in [*modules[n].parameters(), *modules[n].buffers()]})
        for n in [n for n in modules if n == "" or name.startswith(n + ".")]:
            # direct tensors of enclosing modules (a ViT's pos_embed) may act in the prefix
            tensors.update({id(t): t for t in [*modules[n].parameters(recurse=False), *modules[n].buffers(recurse=False)]})
        self._tensors = list(tensors.values())
        self._made: dict[tuple[int, torch.device], dict[nn.Module, _Constant]] = {}

    def __repr__(self) -> str:
        return f"PrefixCut(before '{self.name}', {len(self.prefix)} modules cached)"

    def state(self) -> tuple[tuple[int, int], ...]:
        """Storage and version counters of the prefix's tensors: changes when a weight is written."""
        return tuple((t.data_ptr(), t._version) for t in self._tensors)

    def capture(self, run: Callable[[Inputs], Any], x: Inputs) -> torch.Tensor:
        """The cut module's input for ``x``, one row per sample (the forward pass stops at the cut).

        ``(n, *rest)``; with ``k = self.rows > 1`` rows per sample the ``n * k`` rows come folded,
        ``(n, k, *rest)``.
        """
        def stop(m: nn.Module, args: tuple[Any, ...]) -> None:
            raise _Stop(args[0])

        handle = self.module.register_forward_pre_hook(stop)
        try:
            run(x)
        except _Stop as s:
            value = s.value.detach()
            return value if self.rows == 1 else value.unflatten(0, (-1, self.rows))
        finally:
            handle.remove()
        raise RuntimeError(f"The forward pass never reached '{self.name}'.")

    def extras(self, x: Inputs) -> dict[str, torch.Tensor]:
        """The entries of dict inputs ``x`` that are passed for real while injecting (``{}`` for a tensor input)."""
        return {} if isinstance(x, torch.Tensor) else {k: v for k, v in x.items() if k != self.input_key}

    def placeholder_input(self, n: int, device: torch.device,
                          extras: Mapping[str, torch.Tensor] | None = None) -> Inputs:
        """What to pass as the model's input while injecting ``n`` rows.

        A tensor input: a NaN placeholder (only its shape is read). Dict inputs: the same dict with a
        NaN placeholder at :attr:`input_key` and the real ``extras`` of those ``n`` samples
        (:meth:`extras`; the part after the cut reads them) at the other keys, in the model's order.
        """
        placeholder = _nan((n, *self.input_shape), self.input_dtype, device)
        if self.input_key is None:
            return placeholder
        extras = extras or {}
        missing = [k for k in self.input_keys if k != self.input_key and k not in extras]
        if missing:
            raise ValueError(f"Running from '{self.name}' needs the real {', '.join(map(repr, missing))} of the inputs "
                             f"(only {self.input_key!r} is a placeholder): pass them as extras.")
        return {k: placeholder if k == self.input_key else extras[k] for k in self.input_keys}

    def _placeholders(self, n: int, device: torch.device) -> dict[nn.Module, _Constant]:
        """The prefix modules' placeholder outputs for ``n`` rows (made once per size and device: they
        are broadcast views of one NaN, read-only by construction)."""
        key = (n, device)
        made = self._made.get(key)
        if made is None:
            with torch.inference_mode(False):  # made during validation, used in training too
                made = {module: _Constant(_nan((k * n, *shape), dtype, device))
                        for module, (k, shape, dtype) in self.skipped.items()}
            self._made = {key: made}  # one size at a time: a training and a last, shorter batch alternate rarely
        return made

    @contextlib.contextmanager
    def inject(self, features: torch.Tensor) -> Iterator[None]:
        """Run the model from the cut: prefix modules return placeholders, the cut module gets ``features``.

        ``features`` are rows as :meth:`capture` returns them, one per sample (folded ``(n, k, ...)``
        rows are unfolded to ``(n * k, ...)`` for the cut module). Instance-level ``forward``
        attributes do it (no hooks to register per step: this runs around every cached training
        step); whatever instance-level ``forward`` a module had is restored.
        """
        placeholders = self._placeholders(features.shape[0], features.device)
        if self.rows != 1:
            features = features.flatten(0, 1)
        cut_forward = self.module.forward

        def from_cut(*args: Any, **kwargs: Any) -> Any:
            return cut_forward(features, *args[1:], **kwargs)

        modules = [*placeholders, self.module]
        saved = [module.__dict__.get("forward") for module in modules]
        try:
            for module, constant in placeholders.items():
                module.__dict__["forward"] = constant
            self.module.__dict__["forward"] = from_cut
            yield
        finally:
            for module, own in zip(modules, saved):  # restore exactly: an instance-level forward set by someone else stays
                if own is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.__dict__["forward"] = own


class _Constant:
    """A forward that returns its placeholder whatever it is called with."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value


def _outputs_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and not bool(torch.isnan(a).any()) and torch.allclose(
            a.float(), b.float(), rtol=1e-4, atol=1e-5)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_outputs_equal(u, v) for u, v in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping) and list(a) == list(b):
        return all(_outputs_equal(a[k], b[k]) for k in a)
    return False


def find_cut(root: nn.Module, run: Callable[[Inputs], Any], x: Inputs) -> tuple[PrefixCut | None, str]:
    """The cut of ``root`` for its current trainable/training state, verified on the batch ``x``.

    ``run(x)`` must run ``root`` (possibly with more around it, a head say). ``x`` is a tensor or a
    dict of batch-first tensors (:func:`placeholder_key` names the entry the prefix consumes; the
    verification runs with NaN there and the real other entries, so a suffix that reads it is
    caught). ``x`` should hold at least 3 samples: the trace runs on all but the last, the
    verification on all, so that a layer whose output is not batch-first is caught. Returns
    ``(cut, "")``, or ``(None, why not)``: nothing in ``root`` trains, the very first computation
    does, no cut reproduces the full forward pass (in eval mode), or the prefix is random in the
    current (training) mode.
    """
    modules = dict(root.named_modules())
    if any(getattr(m, "grad_checkpointing", False) for m in modules.values()):
        return None, "gradient checkpointing is on: it re-runs the forward pass during backward, past any cut"
    try:
        key = placeholder_key(x)
    except ValueError as error:
        return None, str(error)
    live = {n for n, m in modules.items() if is_live(m)}
    if not live:
        return None, "nothing in the model trains"
    if "" in live:
        return None, "the model's own parameters (not a submodule's) train: there is no frozen prefix"
    n = input_rows(x)
    traced = _rows_of(x, slice(None, -1)) if n > 1 else x
    with _eval_no_grad(root):
        calls = _trace(root, run, traced)
        full = run(x)
    called = {c.name for c in calls}
    for name in [n for n in live if n not in called]:
        # a live module that never runs as a module (attention dropout applied functionally, say)
        # acts through its nearest enclosing module that does
        while name and name not in called:
            name = name.rpartition(".")[0]
        if name:
            live.add(name)
    first = min((c for c in calls if c.name in live), key=lambda c: c.enter, default=None)
    if first is None:
        return None, f"the trainable layers ({', '.join(sorted(live)[:3])}, ...) never run in the forward pass"
    main = x if key is None else x[key]
    why = ""
    for cut in _candidates(first, calls):  # innermost first: the longest prefix that verifies wins
        candidate, why = _candidate(root, calls, cut, x, key, input_rows(traced))
        if candidate is None:
            continue
        try:
            with _eval_no_grad(root):
                features = candidate.capture(run, x)
                with candidate.inject(features):
                    again = run(candidate.placeholder_input(n, main.device, candidate.extras(x)))
            same = _outputs_equal(again, full)
        except Exception as error:  # an in-place op on a placeholder, a shape that is not batch-first, ...
            why = f"running from '{cut.name}' with the prefix cached failed ({type(error).__name__}: {error})"
            continue
        if not same:
            reads = f", or the part after it reads the inputs' {key!r}" if key is not None else ""
            why = (f"running from '{cut.name}' with the prefix cached does not reproduce the full forward pass "
                   f"(a value of the prefix reaches past it, a skip connection say{reads})")
            continue
        if not _deterministic(candidate, run, x, main.device):
            why = (f"the frozen layers before '{cut.name}' are random in training mode (dropout or drop-path left "
                   "in training mode): put them in eval mode to cache them")
            continue
        return candidate, ""
    return None, why


def _deterministic(cut: PrefixCut, run: Callable[[Inputs], Any], x: Inputs, device: torch.device) -> bool:
    """Two captures in the model's current modes agree (the random state is restored afterwards)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return torch.equal(cut.capture(run, x), cut.capture(run, x))


def _candidates(first: _Call, calls: list[_Call]) -> list[_Call]:
    """``first`` and its enclosing calls (below the root), innermost first; of calls that share one
    input (a module that starts with its child), the outermost only."""
    chain = [first]
    while chain[-1].name and "." in chain[-1].name:
        inner = chain[-1]
        parent = inner.name.rpartition(".")[0]
        outer = next((c for c in calls if c.name == parent and c.enter < inner.enter and c.exit > inner.exit), None)
        if outer is None:
            break
        chain.append(outer)
    out = []
    for i, c in enumerate(chain):
        outer = chain[i + 1] if i + 1 < len(chain) else None
        inside = outer.name + "." if outer is not None else None
        starts_outer = outer is not None and not any(
            d.name.startswith(inside) and outer.enter < d.enter < c.enter for d in calls)
        if not starts_outer:
            out.append(c)
    return out


def _candidate(root: nn.Module, calls: list[_Call], cut: _Call, x: Inputs, key: str | None,
               batch: int) -> tuple[PrefixCut | None, str]:
    """The cut before ``cut`` as traced on ``batch`` samples (module outputs of ``k * batch`` rows are
    ``k`` rows per sample; one whose rows are not a multiple of the batch is not skipped: it runs)."""
    if not cut.tensor_input:
        return None, f"'{cut.name}', where the trainable part starts, takes no tensor as its first argument"
    if sum(c.name == cut.name for c in calls) != 1:
        return None, f"'{cut.name}', where the trainable part starts, runs more than once per forward pass"
    rows = _per_sample(cut.in_rows, batch)
    if rows is None:
        return None, (f"the input of '{cut.name}', where the trainable part starts, has {cut.in_rows} rows for a batch "
                      f"of {batch} samples, not a whole number per sample: a table of one row per sample cannot hold it")
    before = [c for c in calls if c.exit < cut.enter]
    if not before:
        return None, f"'{cut.name}' is the first layer that runs: nothing before it to cache"
    later = {c.name for c in calls if c.enter > cut.enter}
    once = {n for n in {c.name for c in before} if n not in later and sum(c.name == n for c in calls) == 1}
    prefix = list(dict.fromkeys(c.name for c in before))
    skipped: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
    for c in sorted(before, key=lambda c: c.enter):  # parents first: skip the outermost modules only
        covered = any(c.name.startswith(n + ".") for n in skipped)
        k = _per_sample(c.rows, batch)
        if c.name in once and c.shape is not None and c.dtype is not None and k is not None and not covered:
            skipped[c.name] = (k, c.shape, c.dtype)
    main = x if key is None else x[key]
    keys = () if key is None else tuple(x)
    return PrefixCut(root, cut.name, skipped, prefix, tuple(main.shape[1:]), main.dtype, rows, key, keys), ""
