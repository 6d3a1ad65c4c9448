"""``transferlab predict run=<run> images=<file | folder>``: a trained run's predictions for
each image. Classification: the top-k classes and probabilities, into a CSV. Segmentation:
a class-index mask PNG per image at the image's own size, and a CSV of each class's share
of the pixels. Detection: the boxes scoring at least ``min_score``, in the image's own
pixels, into a CSV or a COCO results JSON.

Images are preprocessed as the run evaluated its test set (``transferlab.inference``).
Files that cannot be read as images are reported and skipped. The CSV is written to a
temporary file and renamed into place, so it is either complete or absent; a segmentation
run's masks and CSV are written into a temporary folder moved into place at the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

USAGE = """\
usage: transferlab predict run=<run id | run folder | checkpoint> images=<file | folder>
                           [out=predictions.csv | <folder> | <file>.json] [top_k=5]
                           [min_score=0.5] [batch_size=64] [store_dir=mlruns]

Predict images with a trained run's best checkpoint. A folder is searched recursively for
images (.jpg, .png, ...). Unreadable files are skipped and counted.

Classification runs: out= is a CSV (default predictions.csv) with one row per image: file,
then class_1, prob_1, ..., class_k, prob_k, most probable first (top_k=, default 5).

Segmentation runs: out= is a folder (default predictions), and top_k= does not apply (an
error). For each image, <out>/<image name>_mask.png: the predicted class of each pixel at
the image's own size, a palette PNG whose pixel values are class indices (0 = the run's
first class, in the order of the share_ columns; the PNG's text chunk "classes" lists the
names too), coloured as the run's report. And <out>/predictions.csv, one row per image:
file, mask (its PNG), then share_<class> for each class, the share of the image's pixels
predicted as it (they sum to 1). All are written into a temporary folder and moved into
out= at the end; an existing out= folder keeps its other files.

Detection runs: the boxes scoring at least min_score= (default 0.5; the detector's own floor
is task.options.score_thresh, 0.05), in pixels of each image's own size, highest score first.
out= is a CSV (default detections.csv), one row per box: file, class, score, x1, y1, x2, y2
(corners; an image without boxes gets one row with only its file), or, when out= ends in
.json, a COCO results list: {"image_id", "file_name", "category_id", "category_name",
"bbox": [x, y, width, height], "score"} per box, image_id numbering the files from 1 in
the order found, category_id the class's index in the run's classes (0 is the background).
"""
DEFAULTS: dict[str, str | None] = {
    "run": None,
    "images": None,
    "out": "",  # predictions.csv (classification), predictions (segmentation)
    "top_k": "",  # TOP_K (classification)
    "min_score": "",  # MIN_SCORE (detection)
    "batch_size": "64",
    "store_dir": "mlruns",
}
TOP_K = 5
CSV_OUT = "predictions.csv"
MASKS_OUT = "predictions"  # the folder a segmentation run writes into
MASK_SUFFIX = "_mask.png"
BOXES_OUT = "detections.csv"
MIN_SCORE = 0.5  # as the run's report draws its predicted boxes
# What a run of a task that ranks no classes per image gives instead (top_k= is refused).
NOT_RANKED = {
    "segmentation": "predicts a class per pixel (a mask and each class's share of it)",
    "detection": "finds boxes (min_score= keeps the confident ones)",
}
PROGRESS_FROM = 200  # images: fewer finish before a progress bar would help


def main(argv: list[str]) -> int:
    from transferlab.cli import key_value_args
    from transferlab.inference import load_trained

    args = key_value_args(argv, DEFAULTS, USAGE)
    if args is None:
        return 0
    top_k = positive_int(args, "top_k") if args["top_k"] else None
    min_score = score(args["min_score"]) if args["min_score"] else None
    batch_size = positive_int(args, "batch_size")
    images = Path(args["images"]).expanduser()
    files = image_files(images)
    model = load_trained(args["run"], args["store_dir"])
    model.require_support("predict", "predict")
    if min_score is not None and model.task.name != "detection":
        raise UserError(
            f"min_score={args['min_score']} filters a detector's boxes; this is a "
            f"task={model.task.name} run: drop min_score="
        )
    if top_k is not None and model.task.name in NOT_RANKED:
        raise UserError(
            f"top_k={top_k} ranks the classes of a whole image; a task={model.task.name} run "
            f"{NOT_RANKED[model.task.name]}: drop top_k="
        )
    out = Path(args["out"]).expanduser() if args["out"] else None
    request = Request(images, files, out, top_k, min_score, batch_size)
    model.task.predict(model, request)
    return 0


@dataclass(frozen=True)
class Request:
    """What ``transferlab predict`` was asked: the images (as given, and the files found
    there), ``out`` (None: the task's default), ``top_k``, ``min_score`` and the batch size."""

    images: Path
    files: list[Path]
    out: Path | None
    top_k: int | None
    min_score: float | None
    batch: int


def classify(model: Any, request: Request) -> None:
    """The top-k classes of each image into the CSV ``out``."""
    files, out, top_k, batch = request.files, request.out, request.top_k, request.batch
    out = out or Path(CSV_OUT)
    k = min(top_k or TOP_K, len(model.class_names))
    rows, skipped = predict_rows(model, files, k, batch)
    if not rows:
        raise UserError(f"none of the {len(files)} image file(s) could be read")
    header = ["file", *(f"{kind}_{i}" for i in range(1, k + 1) for kind in ("class", "prob"))]
    write_csv_atomically(out, header, rows)
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(f"Predicted {len(rows)} image(s) with {model.checkpoint} into {out}{note}")


def segment(model: Any, request: Request) -> None:
    """A mask PNG per image and the CSV of class shares into the folder ``out``."""
    from transferlab.explain import is_inside, staged_folder
    from transferlab.inference import SHARE_PREFIX

    images, files, out, batch = request.images, request.files, request.out, request.batch

    out = out or Path(MASKS_OUT)
    if out.suffix.lower() == ".csv" or (out.exists() and not out.is_dir()):
        raise UserError(
            f"out={out}: a task=segmentation run writes a folder (a mask PNG per image and "
            f"{CSV_OUT}); pass a folder, e.g. out={MASKS_OUT}"
        )
    files = [f for f in files if not is_inside(f, out)]
    if not files:
        raise UserError(f"images={images}: the only images are under out={out}")
    names = mask_names(files, images if images.is_dir() else images.parent)
    with staged_folder(out) as folder:
        rows, skipped = predict_masks(model, files, names, batch, folder, out)
        if not rows:
            raise UserError(f"none of the {len(files)} image file(s) could be read")
        header = ["file", "mask", *(SHARE_PREFIX + name for name in model.class_names)]
        write_csv_atomically(folder / CSV_OUT, header, rows)
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(
        f"Segmented {len(rows)} image(s) with {model.checkpoint} into {out} "
        f"(<image>{MASK_SUFFIX} each, {CSV_OUT}){note}"
    )


def detect(model: Any, request: Request) -> None:
    """The boxes of each image scoring at least ``min_score`` into the CSV or COCO results
    JSON ``out``."""
    from transferlab.inference import kept_detections

    files, out, min_score, batch = request.files, request.out, request.min_score, request.batch
    out = out or Path(BOXES_OUT)
    if out.is_dir():
        raise UserError(f"out={out} is a folder: a task=detection run writes a .csv or a .json")
    threshold = MIN_SCORE if min_score is None else min_score
    found, skipped = predict_boxes(model, files, batch)
    if not found:
        raise UserError(f"none of the {len(files)} image file(s) could be read")
    kept = [(path, kept_detections(image, model.class_names, threshold)) for path, image in found]
    index = {name: i for i, name in enumerate(model.class_names)}
    if out.suffix.lower() == ".json":
        results = [
            {
                "image_id": number,
                "file_name": str(path),
                "category_id": index[box["class"]],
                "category_name": box["class"],
                "bbox": [round(v, 2) for v in xywh(box["box"])],
                "score": round(box["score"], 5),
            }
            for number, (path, boxes) in enumerate(kept, start=1)
            for box in boxes
        ]
        write_atomically(out, json.dumps(results) + "\n")
    else:
        rows = []
        for path, boxes in kept:
            rows += [
                [str(path), box["class"], f"{box['score']:.5f}", *(f"{v:.2f}" for v in box["box"])]
                for box in boxes
            ] or [[str(path), "", "", "", "", "", ""]]
        write_csv_atomically(out, ["file", "class", "score", "x1", "y1", "x2", "y2"], rows)
    boxes = sum(len(found_boxes) for _, found_boxes in kept)
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(
        f"Detected {boxes} box(es) scoring >= {threshold} in {len(found)} image(s) with "
        f"{model.checkpoint} into {out}{note}"
    )


def xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def predict_boxes(
    model: Any, files: Sequence[Path], batch_size: int
) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """Each readable file's detections in its own pixels, and the files skipped (each
    reported on stderr)."""

    from transferlab.inference import predicted_boxes

    found: list[tuple[Path, dict[str, Any]]] = []
    skipped: list[Path] = []
    for paths, batch, sizes in loaded_batches(model, files, batch_size, skipped):
        images = predicted_boxes(model.network, batch, sizes)
        found += list(zip(paths, images, strict=True))
    return found, skipped


def score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise UserError(f"min_score={text} must be a score between 0 and 1")
    return value


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

    rows: list[list[str]] = []
    skipped: list[Path] = []
    names = model.class_names
    for paths, batch, _ in loaded_batches(model, files, batch_size, skipped):
        top = model.network(batch).float().softmax(1).topk(top_k, dim=1)
        for path, values, indices in zip(paths, top.values, top.indices, strict=True):
            pairs = [
                (names[int(i)], f"{float(v):.6f}") for v, i in zip(values, indices, strict=True)
            ]
            rows.append([str(path), *(item for pair in pairs for item in pair)])
    return rows, skipped


def predict_masks(
    model: Any,
    files: Sequence[Path],
    names: Sequence[str],
    batch_size: int,
    folder: Path,
    out: Path,
) -> tuple[list[list[str]], list[Path]]:
    """Write each readable file's mask PNG as ``folder/<its name>``; the CSV rows (file, its
    mask under ``out``, class shares) and the files skipped (each reported on stderr)."""

    from transferlab.inference import class_shares, mask_png, predicted_masks

    rows: list[list[str]] = []
    skipped: list[Path] = []
    name_of = dict(zip(files, names, strict=True))
    classes = model.class_names
    for paths, batch, sizes in loaded_batches(model, files, batch_size, skipped):
        for path, mask in zip(paths, predicted_masks(model.network, batch, sizes), strict=True):
            (folder / name_of[path]).write_bytes(mask_png(mask, classes))
            shares = class_shares(mask, len(classes))
            rows.append([str(path), str(out / name_of[path]), *(f"{s:.6f}" for s in shares)])
    return rows, skipped


def mask_names(files: Sequence[Path], root: Path) -> list[str]:
    """A distinct ``<name>_mask.png`` per file, named as ``transferlab explain`` names its
    overlays."""
    from transferlab.explain import SUFFIX, overlay_names

    return [name.removesuffix(SUFFIX) + MASK_SUFFIX for name in overlay_names(files, root)]


def progress_bar(files: Sequence[Path]) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=len(files), desc="predict", unit="img", disable=len(files) < PROGRESS_FROM)


def loaded_batches(
    model: Any, files: Sequence[Path], batch_size: int, skipped: list[Path]
) -> Iterator[tuple[list[Path], Any, list[tuple[int, int]]]]:
    """(files, their preprocessed batch, each image's (H, W)) per batch of the readable
    ``files``, under inference mode with a progress bar; unreadable ones go to ``skipped``."""
    import torch

    with progress_bar(files) as progress, torch.inference_mode():
        for group in batches(files, batch_size):
            loaded = load_group(model, group, skipped, progress)
            if loaded:
                batch = torch.stack([tensor for _, _, tensor in loaded])
                yield [path for path, _, _ in loaded], batch, [size for _, size, _ in loaded]


def load_group(
    model: Any, group: Sequence[Path], skipped: list[Path], progress: Any
) -> list[tuple[Path, tuple[int, int], Any]]:
    """(file, its image's (H, W), its preprocessed tensor) for each readable file of
    ``group``; the others are appended to ``skipped`` and reported on stderr."""
    loaded = []
    for path in group:
        try:
            image = read_image(model, path)
            loaded.append((path, (image.height, image.width), model.transform(image)))
        except Exception as err:  # any unreadable or corrupt file
            skipped.append(path)
            progress.write(f"skipped {path}: {one_line(err)}", file=sys.stderr)
    progress.update(len(group))
    return loaded


def read_image(model: Any, path: Path) -> Any:
    """``path`` decoded and converted to the run's image mode."""
    from PIL import Image

    from transferlab.data.datasets import to_mode

    with Image.open(path) as image:
        image.load()
        return to_mode(image, model.image_mode)


def load_image(model: Any, path: Path) -> Any:
    """``path`` decoded, converted to the run's image mode and transformed."""
    return model.transform(read_image(model, path))


def one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_csv_atomically(out: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The CSV ``out``, written as ``write_atomically`` writes."""
    stream = io.StringIO(newline="")
    writer = csv.writer(stream)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(out, stream.getvalue())


def write_atomically(out: Path, text: str) -> None:
    """Write to a temporary file next to ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
