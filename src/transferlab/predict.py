"""``transferlab predict run=<run> images=<file | folder>``: a trained classifier's top-k
classes and probabilities for each image, written to a CSV.

Images are preprocessed as the run evaluated its test set (``transferlab.inference``).
Files that cannot be read as images are reported and skipped; the CSV is written to a
temporary file and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

USAGE = """\
usage: transferlab predict run=<run id | run folder | checkpoint> images=<file | folder>
                           [out=predictions.csv] [top_k=5] [batch_size=64] [store_dir=mlruns]

Classify images with a trained classification run's best checkpoint. A folder is searched
recursively for images (.jpg, .png, ...). The CSV has one row per image: file, then
class_1, prob_1, ..., class_k, prob_k, most probable first. Unreadable files are skipped
and counted.
"""
DEFAULTS: dict[str, str | None] = {
    "run": None,
    "images": None,
    "out": "predictions.csv",
    "top_k": "5",
    "batch_size": "64",
    "store_dir": "mlruns",
}
PROGRESS_FROM = 200  # images: fewer finish before a progress bar would help


def main(argv: list[str]) -> int:
    from transferlab.cli import key_value_args
    from transferlab.inference import load_trained

    args = key_value_args(argv, DEFAULTS, USAGE)
    if args is None:
        return 0
    top_k = positive_int(args, "top_k")
    batch_size = positive_int(args, "batch_size")
    files = image_files(Path(args["images"]).expanduser())
    model = load_trained(args["run"], args["store_dir"])
    model.require_task("classification", "predict")
    out = Path(args["out"]).expanduser()
    k = min(top_k, len(model.class_names))
    rows, skipped = predict_rows(model, files, k, batch_size)
    if not rows:
        raise UserError(f"none of the {len(files)} image file(s) could be read")
    header = ["file", *(f"{kind}_{i}" for i in range(1, k + 1) for kind in ("class", "prob"))]
    write_csv_atomically(out, header, rows)
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(f"Predicted {len(rows)} image(s) with {model.checkpoint} into {out}{note}")
    return 0


def positive_int(args: dict[str, str], key: str) -> int:
    try:
        value = int(args[key])
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{key}={args[key]} must be a positive whole number")
    return value


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or the images under the folder ``path`` (recursive, sorted)."""
    from transferlab.data.sources import IMAGE_EXTENSIONS

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"images={path}: no such file or folder")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise UserError(
            f"images={path}: the folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return files


def batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_rows(
    model: Any, files: Sequence[Path], top_k: int, batch_size: int
) -> tuple[list[list[str]], list[Path]]:
    """CSV rows (file, class and probability pairs) for the readable ``files``, and the
    files skipped as unreadable (each reported on stderr as it is met)."""
    import torch
    from tqdm.auto import tqdm

    rows: list[list[str]] = []
    skipped: list[Path] = []
    names = model.class_names
    progress = tqdm(
        total=len(files), desc="predict", unit="img", disable=len(files) < PROGRESS_FROM
    )
    with progress, torch.inference_mode():
        for group in batches(files, batch_size):
            tensors, kept = [], []
            for path in group:
                try:
                    tensors.append(load_image(model, path))
                    kept.append(path)
                except Exception as err:  # any unreadable or corrupt file
                    skipped.append(path)
                    progress.write(f"skipped {path}: {one_line(err)}", file=sys.stderr)
            progress.update(len(group))
            if not tensors:
                continue
            probs = model.network(torch.stack(tensors)).float().softmax(1)
            top = probs.topk(top_k, dim=1)
            for path, values, indices in zip(kept, top.values, top.indices, strict=True):
                pairs = [
                    (names[int(i)], f"{float(v):.6f}") for v, i in zip(values, indices, strict=True)
                ]
                rows.append([str(path), *(item for pair in pairs for item in pair)])
    return rows, skipped


def load_image(model: Any, path: Path) -> Any:
    """``path`` decoded, converted to the run's image mode and transformed."""
    from PIL import Image

    from transferlab.data.datasets import to_mode

    with Image.open(path) as image:
        image.load()
        return model.transform(to_mode(image, model.image_mode))


def one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_csv_atomically(out: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Write to a temporary file next to ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
