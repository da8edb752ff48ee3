"""Build condense_engine/datasets/embedded/mnist_default.npz from the official MNIST IDX files.

The subset is fixed: the first 500 training images of each class (in file order) form split
"train", the first 200 test images of each class form split "test". The zip is written with
fixed timestamps so the same inputs always give the same bytes (and the same sha256, which
condense_engine.datasets.embedded pins).

    python tools/make_embedded.py [--source ../shared/data/mnist] [--output PATH]
"""
import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from condense_engine.datasets.constants import DIGITS, OFFICIAL_MD5
from condense_engine.datasets.embedded import EMBEDDED_FILE
from condense_engine.datasets.idx import read_idx_dataset

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 500, "test": 200}
SIZE_LIMIT = 2 * 1024 * 1024


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` items of every class, in file order."""
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(len(DIGITS))]
    if any(len(c) < per_class for c in chosen):
        raise SystemExit(f"a class has fewer than {per_class} images")
    return np.sort(np.concatenate(chosen))


def provenance_note() -> str:
    sources = ", ".join(f"{name} (md5 {md5})" for name, md5 in OFFICIAL_MD5["mnist"].items())
    return ("MNIST subset for condense-engine's default data set: the first "
            f"{PER_CLASS['train']} training and first {PER_CLASS['test']} test images of each digit, "
            f"in file order, unmodified. Built by tools/make_embedded.py from the official files {sources}. "
            "MNIST: Y. LeCun, C. Cortes, C.J.C. Burges, http://yann.lecun.com/exdb/mnist/ "
            "(CC BY-SA 3.0 per the Keras/TensorFlow documentation).")


def write_deterministic_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed's layout, but with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue(), compresslevel=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--output", type=Path,
                        default=REPO / "condense_engine" / "datasets" / "embedded" / EMBEDDED_FILE)
    args = parser.parse_args()
    arrays = {}
    for split, per_class in PER_CLASS.items():
        dataset = read_idx_dataset("mnist", args.source, split)
        keep = first_per_class(dataset.labels.numpy(), per_class)
        arrays[f"{split}_images"] = dataset.images.numpy()[keep]
        arrays[f"{split}_labels"] = dataset.labels.numpy()[keep].astype(np.int64)
    arrays["classes"] = np.array(DIGITS)
    arrays["provenance"] = np.array(provenance_note())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_deterministic_npz(args.output, arrays)
    size = args.output.stat().st_size
    if size > SIZE_LIMIT:
        raise SystemExit(f"{args.output} is {size} bytes, over the {SIZE_LIMIT}-byte limit")
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output}: {size} bytes, sha256 {digest}")
    print("set EMBEDDED_SHA256 in condense_engine/datasets/embedded.py to this value")


if __name__ == "__main__":
    main()
