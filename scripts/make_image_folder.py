"""Write scikit-learn's digits as an image folder (``root/train/<class>/``, ``root/test/<class>/``, no ``val/``).

    python scripts/make_image_folder.py data/digits                 # grayscale PNG
    python scripts/make_image_folder.py data/digits_rgb --fmt jpeg  # RGB JPEG
    python scripts/make_image_folder.py data/digits_4band --fmt tif --bands 4

Offline: the digits ship inside scikit-learn. See lightning_ft.data.write_digits_folder.
"""

from __future__ import annotations

import argparse

from lightning_ft.data import write_digits_folder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write")
    parser.add_argument("--fmt", choices=["png", "jpeg", "npy", "tif"], default="png")
    parser.add_argument("--bands", type=int, default=None, help="bands of npy/tif files (default 4)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per_class", type=int, default=None, help="at most this many images per class and split")
    args = parser.parse_args()
    root = write_digits_folder(args.root, fmt=args.fmt, bands=args.bands, size=args.size, per_class=args.per_class)
    print(f"wrote {sum(1 for p in root.rglob('*') if p.is_file())} files under {root}")
