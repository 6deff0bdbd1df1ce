#!/usr/bin/env python3
"""Install the Statlog Landsat satellite data (6,435 3x3 patches, 4 Landsat MSS bands, 6 classes).

Debian's ``r-cran-mlbench`` package ships it as ``mlbench/data/Satellite.rda`` (a data frame of 36
columns ``x.1`` ... ``x.36`` and a factor ``classes``). This script gets that file, reads it with
the ``rdata`` package and writes ``statlog_landsat.npz`` into the data directory
(``$LIGHTNING_FT_DATA_DIR``, else ``$XDG_CACHE_HOME/lightning_ft/data``, else
``~/.cache/lightning_ft/data``) with:

* ``images``: uint8 ``(6435, 4, 3, 3)``, band-first, MSS bands in the order green, red, near-infrared 1,
  near-infrared 2; ``images[:, :, 1, 1]`` is the centre pixel, the one the label is for;
* ``labels``: int64 ``(6435,)``, indices into ``classes``;
* ``classes``: the 6 class names in label order.

Where the Satellite.rda comes from, first found: ``--rda PATH``; an installed ``r-cran-mlbench``
(``/usr/lib/R/site-library/mlbench/data/Satellite.rda``); ``apt-get download r-cran-mlbench`` into a
temporary folder (no root needed), unpacked with ``dpkg-deb -x`` (or, without dpkg-deb, by reading
the .deb's ``ar`` archive and its ``data.tar.*`` in Python).

Idempotent: when the npz is there and its contents have the known checksum, nothing is done. It does
not import torch or lightning_ft, so it is quick. Exit status 0 on success, 1 when the data could not
be installed (the message says how to install it by hand).

Usage: ``python scripts/fetch_statlog_landsat.py [--rda PATH] [--force]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

FILENAME = "statlog_landsat.npz"
CLASSES = ("red soil", "cotton crop", "grey soil", "damp grey soil", "vegetation stubble", "very damp grey soil")
"""mlbench's factor levels, i.e. UCI classes 1, 2, 3, 4, 5 and 7 (there is no class 6, "mixture")."""
CLASS_COUNTS = (1533, 703, 1358, 626, 707, 1508)
CONTENT_SHA256 = "6a121ec094192f567e20f3eaf980c9d497957885ad4f20c44f4a341217de0aee"  # content_sha256 of mlbench 2.1-3
SYSTEM_RDA = Path("/usr/lib/R/site-library/mlbench/data/Satellite.rda")
RDA_MEMBER = "mlbench/data/Satellite.rda"
MANUAL = (
    "Install r-cran-mlbench's Satellite.rda manually: download the Debian package r-cran-mlbench "
    "(https://packages.debian.org/r-cran-mlbench) and unpack it with `dpkg-deb -x r-cran-mlbench_*.deb out`, or "
    "`apt-get install r-cran-mlbench` (it lands in /usr/lib/R/site-library/mlbench/data/Satellite.rda), or take "
    "data/Satellite.rda from CRAN's mlbench source tarball; then run "
    "`python scripts/fetch_statlog_landsat.py --rda path/to/Satellite.rda`."
)


class FetchError(RuntimeError):
    """The data could not be installed; the message says why and how to install it by hand."""


def data_dir() -> Path:
    """Where lightning_ft keeps data sets: ``$LIGHTNING_FT_DATA_DIR``, else ``data/`` in lightning_ft's cache
    folder (``$XDG_CACHE_HOME/lightning_ft/data`` or ``~/.cache/lightning_ft/data``). Kept identical to
    ``lightning_ft.satellite.data_dir`` (a test checks it); copied because this script must not import torch."""
    root = os.environ.get("LIGHTNING_FT_DATA_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_ft" / "data"


def content_sha256(images: np.ndarray, labels: np.ndarray, classes: list[str] | tuple[str, ...]) -> str:
    """SHA-256 of the arrays' contents (not of the npz file, whose bytes depend on the zip writer)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    digest.update("\n".join(classes).encode())
    return digest.hexdigest()


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"], [str(c) for c in data["classes"]]


def is_installed(path: Path) -> bool:
    """Whether ``path`` holds the converted data with the expected contents."""
    if not path.is_file():
        return False
    try:
        return content_sha256(*read_npz(path)) == CONTENT_SHA256
    except Exception:  # a truncated or foreign file: convert again
        return False


# ------------------------------------------------------------------ getting Satellite.rda
def _ar_members(deb: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (a .deb): 8-byte magic, then 60-byte headers, data padded to even."""
    if not deb.startswith(b"!<arch>\n"):
        raise FetchError("The downloaded file is not a .deb (no ar archive magic).")
    members, pos = {}, 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def extract_rda_from_deb(deb: Path, out: Path) -> Path:
    """``mlbench/data/Satellite.rda`` from a r-cran-mlbench .deb: ``dpkg-deb -x``, else ar + tarfile in Python."""
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True, capture_output=True)
        found = sorted(out.rglob("Satellite.rda"))
        if found:
            return found[0]
        raise FetchError(f"{deb.name} has no {RDA_MEMBER}.")
    members = _ar_members(deb.read_bytes())
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise FetchError(f"{deb.name} has no data.tar.* member (members: {', '.join(members)}).")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.ReadError as err:  # e.g. data.tar.zst before Python 3.14
        raise FetchError(f"Cannot read {deb.name}'s data archive without dpkg-deb ({err}). Install dpkg.") from None
    with tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(RDA_MEMBER)), None)
        if member is None:
            raise FetchError(f"{deb.name} has no {RDA_MEMBER}.")
        target = out / "Satellite.rda"
        source = tar.extractfile(member)
        assert source is not None
        target.write_bytes(source.read())
        return target


def download_rda(workdir: Path) -> Path:
    """``apt-get download r-cran-mlbench`` into ``workdir`` and unpack its Satellite.rda there."""
    if not shutil.which("apt-get"):
        raise FetchError(f"apt-get is not available to download r-cran-mlbench. {MANUAL}")
    print("fetch_statlog_landsat: apt-get download r-cran-mlbench", flush=True)
    result = subprocess.run(["apt-get", "download", "r-cran-mlbench"], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob("r-cran-mlbench_*.deb"))
    if (result.returncode != 0 or not debs) and hasattr(os, "geteuid") and os.geteuid() == 0:
        # a fresh machine may have empty package lists: as root, refresh them once and try again
        print("fetch_statlog_landsat: apt-get update (package lists), then download again", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = subprocess.run(["apt-get", "download", "r-cran-mlbench"], cwd=workdir, capture_output=True,
                                text=True)
        debs = sorted(workdir.glob("r-cran-mlbench_*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise FetchError(
            f"`apt-get download r-cran-mlbench` failed ({detail[-1] if detail else f'exit {result.returncode}'}); "
            f"`apt-get update` may be needed. {MANUAL}"
        )
    out = workdir / "deb"
    out.mkdir()
    return extract_rda_from_deb(debs[0], out)


# ------------------------------------------------------------------ converting
def convert_rda(rda: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read mlbench's ``Satellite`` data frame into ``(images (N, 4, 3, 3) uint8, labels int64, classes)``.

    The 36 columns are the 3x3 neighbourhood read left to right, top to bottom, 4 spectral values per
    pixel (UCI's description; columns 17-20 are the centre pixel), so a row reshapes to
    ``(row, column, band)`` and is transposed band-first.
    """
    try:
        import rdata
    except ImportError:
        raise FetchError("Reading Satellite.rda needs the `rdata` package: `pip install rdata` "
                         "(or `pip install -e '.[satellite]'`).") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII."
        frame = rdata.read_rda(str(rda))["Satellite"]
    columns = [f"x.{i}" for i in range(1, 37)]
    if [str(c) for c in frame.columns] != columns + ["classes"]:
        raise FetchError(f"{rda} does not hold mlbench's Satellite data frame (columns {list(frame.columns)[:5]}...).")
    values = frame[columns].to_numpy()
    if not (np.all(values == np.round(values)) and values.min() >= 0 and values.max() <= 255):
        raise FetchError(f"{rda}: pixel values are not integers in 0..255.")
    images = values.astype(np.uint8).reshape(-1, 3, 3, 4).transpose(0, 3, 1, 2).copy()
    classes = [str(c) for c in frame["classes"].cat.categories]
    labels = frame["classes"].cat.codes.to_numpy().astype(np.int64)
    counts = tuple(int(c) for c in np.bincount(labels, minlength=len(classes)))
    if tuple(classes) != CLASSES or counts != CLASS_COUNTS:
        raise FetchError(f"{rda}: classes {classes} with counts {counts}, expected {list(CLASSES)} with {CLASS_COUNTS}.")
    return images, labels, classes


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".statlog_landsat.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, images=images, labels=labels, classes=np.array(classes))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch(rda: str | Path | None = None, force: bool = False, dest: str | Path | None = None) -> Path:
    """Make sure the converted npz exists and is right; return its path. Raises :class:`FetchError`."""
    target = Path(dest) if dest is not None else data_dir() / FILENAME
    if not force and is_installed(target):
        print(f"fetch_statlog_landsat: {target} is up to date, nothing to do.")
        return target
    with tempfile.TemporaryDirectory(prefix="lightning_ft_mlbench_") as tmp:
        if rda is not None:
            source = Path(rda).expanduser()
            if not source.is_file():
                raise FetchError(f"--rda {source} does not exist. {MANUAL}")
        elif SYSTEM_RDA.is_file():
            source = SYSTEM_RDA
        else:
            source = download_rda(Path(tmp))
        images, labels, classes = convert_rda(source)
        digest = content_sha256(images, labels, classes)
        if digest != CONTENT_SHA256:
            raise FetchError(f"{source} converts to contents with SHA-256 {digest}, expected {CONTENT_SHA256}: "
                             f"not the r-cran-mlbench 2.1-3 Satellite data. {MANUAL}")
        write_npz(target, images, labels, classes)
    print(f"fetch_statlog_landsat: wrote {target} ({len(labels)} patches, {len(classes)} classes) from {source.name}.")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rda", help="convert this Satellite.rda instead of finding or downloading one")
    parser.add_argument("--force", action="store_true", help="convert again even when the npz is up to date")
    args = parser.parse_args(argv)
    try:
        fetch(args.rda, args.force)
    except (FetchError, subprocess.CalledProcessError, OSError) as err:
        print(f"fetch_statlog_landsat: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
