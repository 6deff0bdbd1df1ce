"""Spectral bands: adapt an RGB-pretrained input layer to the bands of the data, by wavelength.

Imports torch, numpy and timm only (no Lightning).

timm's ``adapt_input_conv`` (``in_chans=13``) tiles the red, green and blue kernels over the new
bands in order and scales them by ``3 / C``: Sentinel-2's B05 gets the blue kernel and every band
a fraction of its pretrained scale. Here every band is named and has a centre wavelength, so a
band the pretrained model has seen keeps its kernel, and the others are built from their spectral
neighbours.

* :data:`SENSORS`: centre wavelengths (nm) of the bands of ``rgb`` (the ImageNet bands),
  ``sentinel2``, ``landsat8``/``landsat9`` (OLI) and ``landsat_mss``.
* :func:`resolve_bands` turns a band spec (a sensor name, a list of names or ``(name, wavelength)``
  pairs, a dict) into a list of :class:`Band`.
* :func:`adapt_band_weights` builds the kernel of the new bands from a pretrained kernel
  (``match``, ``interpolation``, ``averaging``, ``random``, ``tile``) and says, per band, where it
  came from (:class:`BandSource`).
* :func:`find_input_layer` and :func:`adapt_input_bands` do it in place on a model's stem (a timm
  CNN's ``conv_stem``/``conv1``, a ViT's ``patch_embed.proj``, or any ``layer=`` of a plain module).
* :func:`set_patch_size` changes a timm ViT's patch size (FlexiViT resampling of the patch kernel,
  position embeddings resampled to the new grid).
* :func:`band_statistics` computes per-band mean and std over a dataloader (exact, float64);
  :func:`imagenet_stats_for` gives ImageNet's statistics for red, green and blue only.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "IMAGENET_BANDS",
    "METHODS",
    "SENSORS",
    "Band",
    "BandSource",
    "BandSpec",
    "Method",
    "adapt_band_weights",
    "adapt_input_bands",
    "band_statistics",
    "find_input_layer",
    "imagenet_stats_for",
    "resolve_bands",
    "set_patch_size",
]

_LOGGER = logging.getLogger("lightning_ft.bands")

# --------------------------------------------------------------------------------------------
# The band table
# --------------------------------------------------------------------------------------------

_LANDSAT_OLI = {
    "B1": 443.0,  # coastal aerosol
    "B2": 482.0,  # blue
    "B3": 562.0,  # green
    "B4": 655.0,  # red
    "B5": 865.0,  # near infrared
    "B6": 1609.0,  # SWIR 1
    "B7": 2201.0,  # SWIR 2
    "B9": 1373.0,  # cirrus
}

SENSORS: dict[str, dict[str, float]] = {
    "rgb": {"red": 665.0, "green": 560.0, "blue": 490.0},
    "sentinel2": {
        "B01": 443.0,
        "B02": 490.0,
        "B03": 560.0,
        "B04": 665.0,
        "B05": 705.0,
        "B06": 740.0,
        "B07": 783.0,
        "B08": 842.0,
        "B8A": 865.0,
        "B09": 945.0,
        "B10": 1375.0,
        "B11": 1610.0,
        "B12": 2190.0,
    },
    "landsat8": dict(_LANDSAT_OLI),
    "landsat9": dict(_LANDSAT_OLI),
    "landsat_mss": {"green": 550.0, "red": 650.0, "nir1": 750.0, "nir2": 950.0},
}
"""Centre wavelengths in nm of each sensor's bands, in the order a sensor name resolves to.

* ``rgb``: the bands of ImageNet-pretrained weights, given Sentinel-2's centres (red 665, green 560,
  blue 490). The order is the model's input order: red, green, blue.
* ``sentinel2``: MSI, all 13 bands (B01..B12 with B8A after B08, the order of the L1C product).
* ``landsat8`` / ``landsat9``: the 8 multispectral 30 m bands of OLI / OLI-2, B1..B7 and B9 (cirrus).
  The 15 m panchromatic B8 (500-680 nm) and the thermal TIRS bands B10/B11 (10.9 and 12.0 um) are
  left out (other resolutions, rarely stacked); give them as pairs, e.g. ``("B8", 590)``.
* ``landsat_mss``: Landsat 1-5 MSS bands 4/5/6/7 (0.5-0.6, 0.6-0.7, 0.7-0.8, 0.8-1.1 um) as
  ``green``, ``red``, ``nir1``, ``nir2``.
"""

IMAGENET_BANDS = ("red", "green", "blue")
"""The bands of ImageNet-pretrained weights, in their input order (``SENSORS["rgb"]``)."""

Method = Literal["match", "interpolation", "averaging", "random", "tile"]
METHODS: tuple[str, ...] = ("match", "interpolation", "averaging", "random", "tile")
"""The ways :func:`adapt_band_weights` builds the kernels of the new bands."""


@dataclass(frozen=True)
class Band:
    """A spectral band: its name and centre wavelength in nm."""

    name: str
    wavelength: float

    def __str__(self) -> str:
        return f"{self.name} ({self.wavelength:g} nm)"


BandSpec = Union[str, Sequence[Union[str, Band, tuple[str, float]]], Mapping[str, float]]
"""A sensor name, a list of band names / ``(name, wavelength_nm)`` pairs / :class:`Band`, or ``{name: wavelength_nm}``."""


def _check_wavelength(name: str, wavelength: Any) -> float:
    if isinstance(wavelength, bool) or not isinstance(wavelength, (int, float, np.integer, np.floating)):
        raise ValueError(
            f"Band '{name}' has wavelength {wavelength!r}; give its centre wavelength in nm as a number, e.g. ('{name}', 842)."
        )
    value = float(wavelength)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Band '{name}' has wavelength {value:g} nm; a centre wavelength is a positive number of nm.")
    return value


def _check_sensor(sensor: str) -> str:
    key = sensor.lower()
    if key not in SENSORS:
        raise ValueError(
            f"Unknown sensor '{sensor}'. Known sensors: {', '.join(SENSORS)}. "
            "Give bands not in the table as (name, wavelength_nm) pairs."
        )
    return key


def _in_sensor(sensor: str, name: str) -> Band | None:
    for band, wavelength in SENSORS[sensor].items():
        if band.lower() == name.lower():
            return Band(band, wavelength)
    return None


def _lookup(name: str, sensor: str | None) -> Band:
    if ":" in name:
        prefix, bare = name.split(":", 1)
        key = _check_sensor(prefix)
        band = _in_sensor(key, bare)
        if band is None:
            raise ValueError(f"Sensor '{key}' has no band '{bare}'. Its bands: {', '.join(SENSORS[key])}.")
        return band
    if sensor is not None:
        key = _check_sensor(sensor)
        band = _in_sensor(key, name)
        if band is None:
            elsewhere = [f"{s}:{b.name}" for s in SENSORS if (b := _in_sensor(s, name)) is not None]
            hint = f" It is a band of: {', '.join(elsewhere)} (prefix it to use it)." if elsewhere else ""
            raise ValueError(f"Sensor '{key}' has no band '{name}'. Its bands: {', '.join(SENSORS[key])}.{hint}")
        return band
    found = {s: b for s in SENSORS if (b := _in_sensor(s, name)) is not None}
    if not found:
        every = sorted({b for bands in SENSORS.values() for b in bands})
        close = difflib.get_close_matches(name, every, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown band '{name}': no sensor of the table has it.{hint} Bands of the table: "
            + "; ".join(f"{s}: {', '.join(bands)}" for s, bands in SENSORS.items())
            + f". For a band not in the table give its centre wavelength: ('{name}', <nm>)."
        )
    if len({b.wavelength for b in found.values()}) > 1:
        options = ", ".join(f"{s}:{b.name} ({b.wavelength:g} nm)" for s, b in found.items())
        first = next(iter(found))
        raise ValueError(
            f"Band '{name}' is ambiguous: {options}. Prefix it with its sensor ('{first}:{name}'), "
            f"pass sensor='{first}', or give its wavelength: ('{name}', <nm>)."
        )
    return next(iter(found.values()))


def resolve_bands(spec: BandSpec | Sequence[Band], sensor: str | None = None) -> list[Band]:
    """The bands a spec names, in its order.

    Args:
        spec: one of

            * a sensor name of :data:`SENSORS` (``"sentinel2"``: all its bands, in table order);
            * a list whose items are band names (``["B04", "B03", "B02"]``), sensor-prefixed names
              (``"sentinel2:B04"``), ``(name, wavelength_nm)`` pairs or :class:`Band`;
            * a dict ``{name: wavelength_nm}`` (bands not in the table).

            Names are matched case-insensitively and returned as the table spells them.
        sensor: the sensor bare names are looked up in. Without it, a bare name must be in the
            table with one wavelength (``B1`` of ``landsat8`` and ``landsat9`` is one band;
            ``red`` of ``rgb`` (665 nm) and ``landsat_mss`` (650 nm) is ambiguous).

    Returns:
        The bands, one per entry of ``spec``.

    Raises:
        ValueError: for an unknown sensor or name, an ambiguous name, a bad wavelength, a band given
            twice or an empty spec; the message lists the candidates and how to fix it.
    """
    if isinstance(spec, str):
        if spec.lower() in SENSORS:
            return [Band(name, wavelength) for name, wavelength in SENSORS[spec.lower()].items()]
        if ":" in spec or any(_in_sensor(s, spec) for s in SENSORS):
            raise ValueError(f"Bands spec '{spec}' names one band, not a sensor: give a list, e.g. ['{spec}'].")
        _check_sensor(spec)
    if isinstance(spec, Mapping):
        bands = [Band(str(name), _check_wavelength(str(name), wavelength)) for name, wavelength in spec.items()]
    elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        bands = []
        for item in spec:
            if isinstance(item, Band):
                bands.append(Band(item.name, _check_wavelength(item.name, item.wavelength)))
            elif isinstance(item, str):
                bands.append(_lookup(item, sensor))
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                bands.append(Band(item[0], _check_wavelength(item[0], item[1])))
            else:
                raise ValueError(
                    f"Band {item!r} is neither a name ('B04', 'sentinel2:B04') nor a (name, wavelength_nm) pair "
                    "('B08', 842). Each entry of a band list is one of these."
                )
    else:
        raise ValueError(
            f"Bands spec {spec!r} is not understood: give a sensor name ({', '.join(SENSORS)}), a list of band names "
            "or (name, wavelength_nm) pairs, or a dict {name: wavelength_nm}."
        )
    if not bands:
        raise ValueError("The bands spec is empty: name at least one band.")
    seen: dict[str, Band] = {}
    for band in bands:
        if band.name.lower() in seen:
            raise ValueError(
                f"Band '{band.name}' is given twice in {[b.name for b in bands]}: each band is one input channel, name it once."
            )
        seen[band.name.lower()] = band
    return bands


# --------------------------------------------------------------------------------------------
# Adapting a kernel along the band axis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandSource:
    """Where the kernel of one new band came from.

    The kernel is ``sum(c * pretrained[:, source] for source, c in zip(sources, coefficients))``,
    plus Gaussian noise of std ``noise`` when it is not 0 (``random`` kernels have no sources).
    ``str()`` gives one readable line, e.g. ``B8A (865 nm) <- interpolated 1.00 x red (665 nm)``.
    """

    target: Band
    how: Literal["copied", "interpolated", "averaged", "random", "tiled"]
    sources: tuple[Band, ...] = ()
    coefficients: tuple[float, ...] = ()
    noise: float = 0.0
    note: str = field(default="", compare=False)

    def __str__(self) -> str:
        if self.how == "copied" and len(self.sources) == 1 and self.coefficients == (1.0,):
            text = f"{self.target} <- copied {self.sources[0]}"
        elif self.how == "random":
            text = f"{self.target} <- random"
        else:
            terms = " + ".join(f"{c:.2f} x {band}" for band, c in zip(self.sources, self.coefficients))
            text = f"{self.target} <- {self.how} {terms}"
        if self.noise:
            text += f" + noise (std {self.noise:.3g})"
        if self.note:
            text += f" [{self.note}]"
        return text


def _bracket(wavelength: float, source: Sequence[Band]) -> list[tuple[int, float]]:
    """Linear interpolation weights ``[(source index, weight)]`` of ``wavelength`` between the two
    source bands that bracket it; outside the source range, the nearest edge band (weight 1); on a
    source wavelength, that band."""
    order = sorted(range(len(source)), key=lambda i: source[i].wavelength)
    below = [i for i in order if source[i].wavelength <= wavelength]
    above = [i for i in order if source[i].wavelength >= wavelength]
    if not below:
        return [(above[0], 1.0)]
    if not above:
        return [(below[-1], 1.0)]
    lo, hi = below[-1], above[0]
    w_lo, w_hi = source[lo].wavelength, source[hi].wavelength
    if w_lo == w_hi:
        return [(lo, 1.0)]
    t = (wavelength - w_lo) / (w_hi - w_lo)
    return [(lo, 1.0 - t), (hi, t)]


def _nearest(wavelength: float, bands: Sequence[Band]) -> int:
    """Index of the band nearest ``wavelength`` (the first of equals: the shorter wavelength when sorted)."""
    return min(range(len(bands)), key=lambda i: (abs(bands[i].wavelength - wavelength), bands[i].wavelength, i))


def _combine(work: torch.Tensor, terms: Sequence[tuple[int, float]]) -> torch.Tensor:
    out = torch.zeros_like(work[:, 0])
    for i, c in terms:
        out = out + c * work[:, i]
    return out


def _tile_weights(weight: torch.Tensor, c_dst: int) -> torch.Tensor:
    """timm's ``adapt_input_conv`` on any ``(O, C, *kernel)`` weight (it takes 4-D ones)."""
    from timm.models import adapt_input_conv

    o, c = weight.shape[:2]
    if weight.ndim == 4:
        return adapt_input_conv(c_dst, weight.detach().clone(), base_chans=c)
    kernel = weight.shape[2:]
    flat = weight.detach().reshape(o, c, -1, 1).clone()
    return adapt_input_conv(c_dst, flat, base_chans=c).reshape(o, c_dst, *kernel)


def adapt_band_weights(
    weight: torch.Tensor,
    source: Sequence[Band],
    target: Sequence[Band],
    method: Method = "match",
    *,
    tolerance: float = 25.0,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[BandSource]]:
    """The kernel of an input layer for the ``target`` bands, from a kernel pretrained on ``source``.

    The methods:

    * ``match``: a target band within ``tolerance`` nm of a source band gets that band's kernel,
      copied bit for bit. Any other band is interpolated linearly by wavelength between the two
      source bands that bracket it (outside the source range: the nearest edge band), and the result
      is rescaled to the Frobenius norm interpolated the same way between its two neighbours
      (averaging two different kernels shrinks the norm): the activation scale per band is kept.
      The response to a spectrally flat input is not (every new band adds to it).
    * ``interpolation``: every target band is interpolated the same way (a wavelength that
      coincides with a source band takes that band alone), without the rescale; then the
      interpolation matrix is made to conserve each source kernel: every source band's kernel is
      spread over the target bands with weights that sum to 1 (a source band no target band
      brackets goes whole to the target band nearest it). The sum of the new kernels over the bands
      is the sum of the pretrained ones, so the response to a spectrally flat input (every band the
      same value) is kept exactly, per output channel. When every source band is used equally this
      is the scalar ``C_src / C_dst``; a scalar alone would not keep it when, as for RGB to
      Sentinel-2, most new bands lie beyond red. Target bands that coincide with a source band and
      share it with no other keep its kernel exactly.
    * ``averaging``: with at least as many target bands as source bands, the mean source kernel
      times ``C_src / C_dst`` for every band (flat response kept). With fewer, grouped: each source
      band goes to the target band nearest in wavelength (ties to the shorter target wavelength),
      and a target band gets the *sum* of its group's kernels (a pixel whose group bands are equal
      sees what the pretrained layer saw, so the flat response is kept); a target band whose group
      is empty gets a copy of the source band nearest to it (then the flat response is not kept).
    * ``random``: fresh kernels, kaiming-uniform as ``nn.Conv2d.reset_parameters`` draws them, from
      ``generator``, rescaled to the std of the pretrained kernel (the baseline: nothing pretrained).
    * ``tile``: timm's ``adapt_input_conv`` (red, green, blue, red, ... times ``C_src / C_dst``),
      to compare with; it ignores wavelengths.

    Args:
        weight: the pretrained kernel ``(O, C_src, *kernel)``: a conv kernel ``(O, C, kh, kw)`` or a
            linear weight ``(O, C)``.
        source: the ``C_src`` bands of ``weight``'s input axis (:func:`resolve_bands`).
        target: the ``C_dst`` bands of the new kernel.
        method: one of :data:`METHODS` (see above).
        tolerance: ``match`` only: a target band this close (nm) to a source band copies its kernel.
        noise: for ``match``, ``interpolation`` and ``averaging``: Gaussian noise of std
            ``noise * weight.std()`` added to every band that is not a copy. Kernels made from three
            RGB kernels span at most three directions; noise keeps the new bands distinguishable.
        generator: the random generator of ``noise`` and ``random`` (seeded: deterministic).

    Returns:
        ``(new_weight, report)``: the kernel ``(O, C_dst, *kernel)`` in ``weight``'s dtype and device,
        and one :class:`BandSource` per target band.

    Raises:
        ValueError: for an unknown method, a weight whose input axis does not match ``source``, an
            empty ``target``, a negative tolerance or noise, or noise with ``random``/``tile``.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown band adaptation method '{method}'. Methods: {', '.join(METHODS)}.")
    if weight.ndim < 2:
        raise ValueError(f"The weight has shape {tuple(weight.shape)}; expected (out, bands, *kernel) with the bands on axis 1.")
    source, target = list(source), list(target)
    c_src, c_dst = weight.shape[1], len(target)
    if len(source) != c_src:
        raise ValueError(
            f"The weight takes {c_src} bands (shape {tuple(weight.shape)}) but source names {len(source)}: "
            f"{', '.join(b.name for b in source)}. Name one source band per input channel."
        )
    if not target:
        raise ValueError("No target bands: name at least one band of the data.")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} nm is negative; use 0 to copy only exact wavelength matches.")
    if noise < 0:
        raise ValueError(f"noise={noise} is negative; it is the noise std as a fraction of the kernel's std (0: none).")
    if noise and method in ("random", "tile"):
        raise ValueError(f"noise= applies to match, interpolation and averaging; method '{method}' does not use it. Leave noise=0.")

    weight = weight.detach()
    work = weight.to(torch.float32 if weight.device.type == "mps" else torch.float64)
    new = torch.empty((weight.shape[0], c_dst, *weight.shape[2:]), dtype=work.dtype, device=work.device)
    report: list[BandSource] = []
    copies: dict[int, int] = {}  # target band -> the source band it is a bitwise copy of

    def source_entry(j: int, how: str, terms: Sequence[tuple[int, float]], note: str = "") -> BandSource:
        sources, coefficients = tuple(source[i] for i, _ in terms), tuple(float(c) for _, c in terms)
        return BandSource(target[j], how, sources, coefficients, note=note)  # type: ignore[arg-type]

    if method == "match":
        norms = [float(work[:, i].norm()) for i in range(c_src)]
        for j, band in enumerate(target):
            near = _nearest(band.wavelength, source)
            if abs(source[near].wavelength - band.wavelength) <= tolerance:
                copies[j] = near
                report.append(source_entry(j, "copied", [(near, 1.0)]))
                continue
            terms = _bracket(band.wavelength, source)
            kernel = _combine(work, terms)
            goal = sum(c * norms[i] for i, c in terms)
            size = float(kernel.norm())
            scale = goal / size if size > 0 else 1.0
            new[:, j] = kernel * scale
            note = "outside the source bands: the nearest edge band" if len(terms) == 1 else "rescaled to the interpolated norm"
            report.append(source_entry(j, "interpolated", [(i, c * scale) for i, c in terms], note))
    elif method == "interpolation":
        matrix = torch.zeros(c_dst, c_src, dtype=torch.float64)
        for j, band in enumerate(target):
            for i, c in _bracket(band.wavelength, source):
                matrix[j, i] += c
        for i in range(c_src):
            if matrix[:, i].sum() == 0:  # no target band uses this source band: give it to the nearest one
                matrix[_nearest(source[i].wavelength, target), i] = 1.0
        matrix = matrix / matrix.sum(0, keepdim=True)
        for j, band in enumerate(target):
            terms = [(i, float(matrix[j, i])) for i in sorted(range(c_src), key=lambda i: source[i].wavelength) if matrix[j, i] != 0]
            exact = len(terms) == 1 and terms[0][1] == 1.0 and source[terms[0][0]].wavelength == band.wavelength
            if exact:
                copies[j] = terms[0][0]
                report.append(source_entry(j, "copied", terms))
            else:
                new[:, j] = _combine(work, terms)
                report.append(source_entry(j, "interpolated", terms))
    elif method == "averaging":
        if c_dst >= c_src:
            mean = work.mean(1) * (c_src / c_dst)
            for j in range(c_dst):
                new[:, j] = mean
                report.append(source_entry(j, "averaged", [(i, 1.0 / c_dst) for i in range(c_src)]))
        else:
            order = sorted(range(c_src), key=lambda i: source[i].wavelength)
            groups: list[list[int]] = [[] for _ in range(c_dst)]
            for i in order:
                groups[_nearest(source[i].wavelength, target)].append(i)
            for j, group in enumerate(groups):
                if group:
                    new[:, j] = _combine(work, [(i, 1.0) for i in group])
                    report.append(source_entry(j, "averaged", [(i, 1.0) for i in group], "sum of the source bands nearest to it"))
                else:
                    near = _nearest(target[j].wavelength, source)
                    copies[j] = near
                    report.append(source_entry(j, "averaged", [(near, 1.0)], "no source band is nearest to it: the nearest source band"))
    elif method == "random":
        fresh = torch.empty(new.shape, dtype=torch.float32)  # drawn on the CPU: the generator's stream, any device
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        fresh = fresh.to(work.dtype)
        new = (fresh * (float(work.std()) / float(fresh.std()))).to(work.device)
        report = [BandSource(band, "random", note=f"kaiming-uniform, std {float(work.std()):.3g}") for band in target]
    else:  # tile
        tiled = _tile_weights(weight, c_dst)
        for j in range(c_dst):
            if c_dst == 1:
                terms = [(i, 1.0) for i in range(c_src)]
            elif c_dst == c_src:
                terms = [(j, 1.0)]
            else:
                terms = [(j % c_src, c_src / c_dst)]
            report.append(source_entry(j, "tiled", terms))
        return tiled.to(dtype=weight.dtype, device=weight.device), report

    if noise:
        std = noise * float(work.std())
        draw_device = generator.device if generator is not None else torch.device("cpu")
        for j in range(c_dst):
            if j in copies:
                continue
            extra = torch.randn(new[:, j].shape, generator=generator, dtype=torch.float32, device=draw_device)
            new[:, j] = new[:, j] + std * extra.to(device=new.device, dtype=new.dtype)
            entry = report[j]
            report[j] = BandSource(entry.target, entry.how, entry.sources, entry.coefficients, std, entry.note)

    out = new.to(weight.dtype)
    for j, i in copies.items():  # bit for bit: never through the float64 round trip
        out[:, j] = weight[:, i]
    return out, report


# --------------------------------------------------------------------------------------------
# Adapting a model's input layer in place
# --------------------------------------------------------------------------------------------


def _input_layers(model: nn.Module, limit: int = 5) -> list[str]:
    names = [
        f"{name} ({type(m).__name__}{_layer_width(m)})"
        for name, m in model.named_modules()
        if name and isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    return names[:limit]


def _layer_width(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f" {module.in_channels}->{module.out_channels}"
    if isinstance(module, nn.Linear):
        return f" {module.in_features}->{module.out_features}"
    return ""


def _suggest(model: nn.Module) -> str:
    found = _input_layers(model)
    return f" Conv2d/Linear layers of the model: {', '.join(found)}." if found else " The model has no Conv2d or Linear layer."


def find_input_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """The layer that sees the input bands, and its dotted name.

    Args:
        model: a timm model (its ``pretrained_cfg["first_conv"]`` names the layer: ``conv_stem``,
            ``conv1``, ``conv1.0``, ``patch_embed.proj``) or any ``nn.Module`` (then ``layer`` is needed).
        layer: the dotted name of the layer (``"0"``, ``"stem.conv"``); overrides timm's.

    Returns:
        ``(name, module)``: an ``nn.Conv2d`` (or ``nn.Linear``).

    Raises:
        ValueError: when no layer is named (the message lists the first Conv2d/Linear layers), the
            name is not a submodule, or the layer is not a Conv2d or Linear.
    """
    if layer is None:
        cfg = getattr(model, "pretrained_cfg", None)
        first = cfg.get("first_conv") if isinstance(cfg, Mapping) else None
        if isinstance(first, (list, tuple)):
            if len(first) != 1:
                raise ValueError(
                    f"The timm model's first_conv names {len(first)} layers ({', '.join(first)}); adapt one at a time with layer=."
                )
            first = first[0]
        if not first:
            kind = (
                "This timm model's pretrained_cfg names no first_conv"
                if isinstance(cfg, Mapping)
                else f"`{type(model).__name__}` is not a timm model"
            )
            raise ValueError(f"{kind}: say which layer sees the bands with layer='<dotted name>'.{_suggest(model)}")
        layer = str(first)
    if not layer:
        raise ValueError(f"layer='' is the model itself; name the submodule that sees the bands.{_suggest(model)}")
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"The model has no layer '{layer}'.{_suggest(model)} Give its dotted name with layer=.") from None
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise ValueError(
            f"Layer '{layer}' is a {type(module).__name__}, not an nn.Conv2d or nn.Linear: its input kernel cannot be "
            f"adapted.{_suggest(model)} Name the first convolution with layer=."
        )
    return layer, module


def _in_width(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def adapt_input_bands(
    model: nn.Module,
    pretrained_bands: BandSpec | Sequence[Band],
    data_bands: BandSpec | Sequence[Band],
    method: Method = "match",
    *,
    layer: str | None = None,
    tolerance: float = 25.0,
    noise: float = 0.0,
    seed: int = 0,
    logger: logging.Logger | None = None,
) -> list[BandSource]:
    """Make ``model`` take ``data_bands``: its input layer is replaced by one adapted by :func:`adapt_band_weights`.

    The new layer is a copy of the old one (same class, stride, padding, dilation, bias: timm's
    ``Conv2dSame`` stays one) with ``len(data_bands)`` input channels and the adapted kernel. On a
    timm model ``model.in_chans`` (and timm's recorded model args) follow, as after
    ``timm.create_model(..., in_chans=C)``; ``pretrained_cfg`` is left as it is: like timm, it
    describes the pretrained checkpoint (its mean/std are RGB ones, and no statistics are made up
    for the new bands: compute them with :func:`band_statistics`).

    Args:
        model: a timm model (CNN stem or ViT patch embedding) or any ``nn.Module`` with ``layer``.
        pretrained_bands: the bands the pretrained layer takes, in order (``"rgb"`` for ImageNet weights).
        data_bands: the bands of the data, in order (``"sentinel2"``, ``["B04", "B03", "B02", "B08"]``).
        method: see :func:`adapt_band_weights`.
        layer: dotted name of the input layer (needed for a module that is not a timm model).
        tolerance: ``match``: a data band this close (nm) to a pretrained band copies its kernel.
        noise: noise std added to non-copied bands, as a fraction of the kernel's std.
        seed: seed of the random draws (``noise``, ``random``).
        logger: where the one line per band goes (default: the ``lightning_ft.bands`` logger, INFO).

    Returns:
        One :class:`BandSource` per data band.

    Raises:
        ValueError: when the layer cannot be found, is grouped, or does not take as many channels as
            ``pretrained_bands`` names; and for the errors of :func:`resolve_bands` and
            :func:`adapt_band_weights`.
    """
    source = resolve_bands(pretrained_bands)
    target = resolve_bands(data_bands)
    name, old = find_input_layer(model, layer)
    width = _in_width(old)
    if width != len(source):
        raise ValueError(
            f"The stem `{name}` takes {width} bands but pretrained_bands names {len(source)} "
            f"({', '.join(b.name for b in source)}). Name the {width} bands the pretrained weights were trained on, in order "
            "(e.g. 'rgb' for ImageNet weights)."
        )
    if isinstance(old, nn.Conv2d) and old.groups != 1:
        raise ValueError(
            f"The stem `{name}` is a grouped convolution (groups={old.groups}): its kernel does not see every band, so "
            "bands cannot be added to it. Adapt a layer with groups=1 (layer=)."
        )
    generator = torch.Generator().manual_seed(seed)
    weight, report = adapt_band_weights(old.weight, source, target, method, tolerance=tolerance, noise=noise, generator=generator)
    new = copy.deepcopy(old)
    new.weight = nn.Parameter(weight, requires_grad=old.weight.requires_grad)
    if isinstance(new, nn.Conv2d):
        new.in_channels = len(target)
    else:
        new.in_features = len(target)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    for owner in {id(m): m for m in (model, parent)}.values():
        if isinstance(getattr(owner, "in_chans", None), int) and owner.in_chans == len(source):
            owner.in_chans = len(target)
    if isinstance(getattr(model, "_model_args", None), dict):  # timm's reconstruction args (get_model_args)
        model._model_args = {**model._model_args, "in_chans": len(target)}
    log = logger or _LOGGER
    for entry in report:
        log.info("%s: %s", name, entry)
    return report


# --------------------------------------------------------------------------------------------
# ViT patch size
# --------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{what}={value!r}: give a positive int or a (height, width) pair of positive ints.")
    return pair  # type: ignore[return-value]


def set_patch_size(model: nn.Module, patch_size: int | Sequence[int], img_size: int | Sequence[int] | None = None) -> None:
    """Give a timm ViT a new patch size (and image size), in place, with timm's ``set_input_size``.

    The patch kernel is resampled as FlexiViT does (timm's ``resample_patch_embed``: a patch resized
    to the new size gets the same embedding as the original patch had, exactly when the patch grows);
    the absolute position embeddings are resampled to the new grid (``resample_abs_pos_embed``,
    prefix tokens kept); ``patch_embed.patch_size``, ``grid_size``, ``num_patches``, ``img_size`` and
    ``proj`` (stride = kernel = patch) follow.

    Args:
        model: a timm vision transformer (a ``patch_embed`` of timm's ``PatchEmbed`` and a
            ``set_input_size(img_size=, patch_size=)`` method).
        patch_size: the new patch size, an int or ``(height, width)``.
        img_size: the new image size (default: the current one); a multiple of ``patch_size``.

    Raises:
        ValueError: for a model that is not such a ViT, or an image size that is not a multiple of the
            patch size (the message gives the nearest sizes that are).
    """
    from timm.layers import PatchEmbed

    embed = getattr(model, "patch_embed", None)
    setter = getattr(model, "set_input_size", None)
    takes_patch = callable(setter) and "patch_size" in inspect.signature(setter).parameters
    if not isinstance(embed, PatchEmbed) or not takes_patch:
        raise ValueError(
            f"set_patch_size works on timm vision transformers (a patch_embed of timm's PatchEmbed and "
            f"set_input_size(patch_size=)); `{type(model).__name__}` is not one. A CNN's stem stride is fixed: change "
            "the image size instead."
        )
    patch = _pair(patch_size, "patch_size")
    if img_size is None:
        if embed.img_size is None:
            raise ValueError("The model has no fixed image size (patch_embed.img_size is None): pass img_size=.")
        size = tuple(embed.img_size)
    else:
        size = _pair(img_size, "img_size")
    for s, p in zip(size, patch):
        if s % p:
            lower, upper = (s // p) * p, (s // p + 1) * p
            options = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"img_size {size} is not a multiple of patch_size {patch}: the patches would not tile the image. "
                f"Use an image size of {options} (img_size=), or another patch size."
            )
    model.set_input_size(img_size=size, patch_size=patch)


# --------------------------------------------------------------------------------------------
# Per-band statistics
# --------------------------------------------------------------------------------------------


def _inputs_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch, with invalid dates of a time series left out."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("An empty batch: expected x, (x, y) or {'inputs': x, ...}.")
        batch = batch[0]
    if isinstance(batch, Mapping) and "inputs" in batch:
        batch = batch["inputs"]
    if isinstance(batch, Mapping):
        key = next((k for k in ("images", "image") if k in batch), None)
        if key is None:
            raise ValueError(
                f"A batch dict with keys {sorted(batch)}: expected {{'inputs': x, ...}} or a time series "
                "{'images': (B, T, C, H, W), 'mask': (B, T)}."
            )
        images, mask = batch[key], batch.get("mask")
        if mask is not None:
            if not isinstance(images, torch.Tensor) or tuple(mask.shape) != tuple(images.shape[:2]):
                raise ValueError(f"The time-series mask has shape {tuple(mask.shape)}; expected (B, T) of images {tuple(images.shape)}.")
            images = images[mask.bool()]  # (valid dates, C, H, W)
        batch = images
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"A batch holds {type(batch).__name__}; expected a tensor x, (x, y) or {{'inputs': x, ...}}.")
    return batch


def band_statistics(
    data: Any,
    max_batches: int | None = None,
    band_axis: int = -3,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std over every pixel of the data: the ``mean=``/``std=`` of the data's bands.

    Exact: float64 counts, sums and squared deviations merged batch by batch (Chan et al.), not a mean
    of batch means. The std is the population std (ddof 0), as normalisation statistics are.

    Args:
        data: a DataLoader or any iterable of batches (``x``, ``(x, y, ...)``, ``{"inputs": x, ...}``;
            a time series ``{"images": (B, T, C, H, W), "mask": (B, T)}`` counts the dates the mask keeps),
            or a datamodule (anything with ``setup`` and ``train_dataloader``: ``setup("fit")`` is called
            and the training dataloader used).
        max_batches: stop after this many batches (default: all).
        band_axis: the axis of the bands in ``x``. The default ``-3`` serves images ``(B, C, H, W)`` and
            time series ``(B, T, C, H, W)``; ``-1`` serves channels-last ``(B, H, W, C)``.

    Returns:
        ``(mean, std)``: one float per band each.

    Raises:
        ValueError: for no data, batches whose band count changes, a band that is constant (std 0,
            named by index) or has non-finite values.
    """
    if callable(getattr(data, "train_dataloader", None)) and callable(getattr(data, "setup", None)):
        data.setup("fit")
        data = data.train_dataloader()
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches}: give a positive number of batches, or None for all.")
    count = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    for n, batch in enumerate(data):
        if max_batches is not None and n >= max_batches:
            break
        x = _inputs_of(batch)
        if x.ndim < 2 or not -x.ndim <= band_axis < x.ndim:
            raise ValueError(f"Inputs of shape {tuple(x.shape)} have no band axis {band_axis}.")
        x = x.detach().to(torch.float64).movedim(band_axis, -1).reshape(-1, x.shape[band_axis])
        if x.shape[0] == 0:
            continue
        if mean is not None and x.shape[1] != mean.numel():
            raise ValueError(f"Batch {n} has {x.shape[1]} bands, the batches before it {mean.numel()}: every batch needs the same bands.")
        k = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        if mean is None or m2 is None:
            count, mean, m2 = k, batch_mean, batch_m2
            continue
        delta = batch_mean - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + batch_m2 + delta**2 * (count * k / total)
        count = total
    if mean is None or m2 is None:
        raise ValueError("No pixels: the data yielded no batch (or only empty ones).")
    std = (m2 / count).sqrt()
    for i in range(mean.numel()):
        if not (math.isfinite(float(mean[i])) and math.isfinite(float(std[i]))):
            raise ValueError(f"Band {i} has non-finite values (NaN or inf): fill or mask no-data pixels before computing statistics.")
        if float(std[i]) == 0:
            raise ValueError(
                f"Band {i} is constant ({float(mean[i]):g} everywhere): its std is 0 and normalising by it would divide by "
                "zero. Drop the band, or check that it was read correctly."
            )
    return tuple(float(v) for v in mean.cpu()), tuple(float(v) for v in std.cpu())


def imagenet_stats_for(bands: BandSpec | Sequence[Band], tolerance: float = 25.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std (timm's ``IMAGENET_DEFAULT_MEAN``/``STD``) for red, green and blue bands, in order.

    Args:
        bands: a band spec (:func:`resolve_bands`), e.g. ``["B04", "B03", "B02"]``.
        tolerance: a band within this many nm of ImageNet's red (665), green (560) or blue (490) counts as it.

    Returns:
        ``(mean, std)``, one float per band.

    Raises:
        ValueError: for any band that is not red, green or blue.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rgb = resolve_bands("rgb")
    mean, std = [], []
    for band in resolve_bands(bands):
        i = _nearest(band.wavelength, rgb)
        if abs(rgb[i].wavelength - band.wavelength) > tolerance:
            raise ValueError(
                f"ImageNet statistics describe red, green and blue only; {band} is none of them: compute per-band "
                "statistics with band_statistics(datamodule) and pass mean=/std=."
            )
        k = IMAGENET_BANDS.index(rgb[i].name)
        mean.append(float(IMAGENET_DEFAULT_MEAN[k]))
        std.append(float(IMAGENET_DEFAULT_STD[k]))
    return tuple(mean), tuple(std)
