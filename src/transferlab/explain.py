"""``transferlab explain run=<run> images=<file | folder>``: Grad-CAM heat maps of a trained
run: where in each image the network found the evidence for its prediction (or a class).

Images are preprocessed as the run evaluated its test set (``transferlab.inference``) and
the heat maps computed as the run's test report computes them (``reports.gradcam``). Files
that cannot be read as images are reported and skipped. Every check (run, images, class)
passes before anything is written, and the overlays are written into a temporary folder
next to ``out`` and moved into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

USAGE = """\
usage: transferlab explain run=<run id | run folder | checkpoint> images=<file | folder>
                           [out=explain] [class=predicted | <class name>] [batch_size=16]
                           [store_dir=mlruns]

Grad-CAM heat maps of a trained run's best checkpoint: where in each image the network
found the evidence for the predicted class, or for class=<class name>. Segmentation runs:
for a class's logits summed over the pixels predicted as it, by default each image's most
frequent predicted class other than the background. A folder is searched recursively for
images (.jpg, .png, ...). Writes <out>/<image name>_gradcam.png for each image (the image
as the network saw it, the heat map over it, the prediction) and <out>/gradcam.png, a grid
of the first 16. Unreadable files are skipped and counted.
"""
DEFAULTS: dict[str, str | None] = {
    "run": None,
    "images": None,
    "out": "explain",
    "class": "predicted",
    "batch_size": "16",
    "store_dir": "mlruns",
}
PREDICTED = "predicted"
GRID_IMAGES = 16
OVERLAY_DPI = 200  # one image per file: about 420 x 520 pixels
GRID_NAME = "gradcam.png"
SUFFIX = "_gradcam.png"
PROGRESS_FROM = 20  # images: Grad-CAM and a figure each take a while longer than predict
LISTED_CLASSES = 20  # class names an unknown class= error lists


def main(argv: list[str]) -> int:
    from transferlab.cli import key_value_args
    from transferlab.inference import load_trained
    from transferlab.predict import image_files, positive_int

    args = key_value_args(argv, DEFAULTS, USAGE)
    if args is None:
        return 0
    batch_size = positive_int(args, "batch_size")
    out = Path(args["out"]).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; pass a folder for the heat maps")
    images = Path(args["images"]).expanduser()
    files = [f for f in image_files(images) if not is_inside(f, out)]
    if not files:
        raise UserError(f"images={images}: the only images are under out={out}")
    model = load_trained(args["run"], args["store_dir"])
    model.require_support("explain_titles", "explain")
    target = class_index(model.class_names, args["class"])
    names = overlay_names(files, images if images.is_dir() else images.parent)
    with staged_folder(out) as folder:
        written, skipped = write_overlays(model, files, names, target, batch_size, folder)
        if not written:
            raise UserError(f"none of the {len(files)} image file(s) could be read")
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    grid = min(written, GRID_IMAGES)
    print(
        f"Wrote Grad-CAM heat maps of {written} image(s) with {model.checkpoint} into {out} "
        f"(<image>{SUFFIX} each, {GRID_NAME}: the first {grid}){note}"
    )
    return 0


def class_index(class_names: Sequence[str], wanted: str) -> int | None:
    """The index of the class ``class=`` names; None for ``predicted``."""
    if wanted == PREDICTED:
        return None
    if wanted in class_names:
        return list(class_names).index(wanted)
    listed = ", ".join(class_names[:LISTED_CLASSES])
    more = f", ... ({len(class_names)} in all)" if len(class_names) > LISTED_CLASSES else ""
    raise UserError(
        f"class={wanted} is not a class of this run: pass class={PREDICTED} or one of "
        f"{listed}{more}"
    )


def is_inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def overlay_names(files: Sequence[Path], root: Path) -> list[str]:
    """A distinct ``<name>_gradcam.png`` per file: its stem where no other file has it, else
    its folders under ``root`` joined in (``a/cat.jpg``: ``a__cat``), then its extension
    (``a__cat_jpg``); compared ignoring case, for case-insensitive file systems."""
    stems = Counter(f.stem.lower() for f in files)
    names = [
        f.stem
        if stems[f.stem.lower()] == 1
        else "__".join(f.relative_to(root).with_suffix("").parts)
        for f in files
    ]
    taken = Counter(name.lower() for name in names)
    names = [
        name if taken[name.lower()] == 1 else f"{name}_{f.suffix.lstrip('.').lower()}"
        for name, f in zip(names, files, strict=True)
    ]
    seen: set[str] = set()
    unique = []
    for name in names:
        candidate, count = name, 1
        while candidate.lower() in seen:
            count += 1
            candidate = f"{name}-{count}"
        seen.add(candidate.lower())
        unique.append(candidate + SUFFIX)
    return unique


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (in its nearest existing parent), moved into place
    as ``out`` when the block succeeds (its files moved into ``out`` if that exists) and
    removed when it fails."""
    parent = next(p for p in out.absolute().parents if p.is_dir())
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        yield folder
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            for path in sorted(folder.iterdir()):
                os.replace(path, out / path.name)
            folder.rmdir()
        else:
            folder.chmod(0o755)
            os.replace(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_overlays(
    model: Any,
    files: Sequence[Path],
    names: Sequence[str],
    target: int | None,
    batch_size: int,
    folder: Path,
) -> tuple[int, list[Path]]:
    """Write each readable file's overlay as ``folder/<its name>`` and the grid of the first
    ``GRID_IMAGES``; the count written and the files skipped (each reported on stderr)."""
    import matplotlib.pyplot as plt
    import torch
    from tqdm.auto import tqdm

    from transferlab.predict import batches, load_image, one_line
    from transferlab.reports.gradcam import gradcam_figure, heat_maps, panels_of

    skipped: list[Path] = []
    grid: list[Any] = []
    layer = ""
    written = 0
    name_of = dict(zip(files, names, strict=True))
    progress = tqdm(
        total=len(files), desc="explain", unit="img", disable=len(files) < PROGRESS_FROM
    )
    with progress:
        for group in batches(files, batch_size):
            tensors, kept = [], []
            for path in group:
                try:
                    tensors.append(load_image(model, path))
                    kept.append(path)
                except Exception as err:  # any unreadable or corrupt file
                    skipped.append(path)
                    progress.write(f"skipped {path}: {one_line(err)}", file=sys.stderr)
            if tensors:
                batch = torch.stack(tensors)
                maps = heat_maps(model.network, batch, [target] * len(batch))
                layer = maps.layer
                titles = model.task.explain_titles(model.class_names, maps.outputs, maps.classes)
                for path, panel in zip(kept, panels_of(batch, maps.maps, titles), strict=True):
                    figure = gradcam_figure([("", [panel])], dpi=OVERLAY_DPI)
                    figure.savefig(folder / name_of[path])
                    plt.close(figure)
                    if len(grid) < GRID_IMAGES:
                        grid.append(panel)
                written += len(kept)
            progress.update(len(group))
    if grid:
        figure = gradcam_figure([("", grid)], title=f"{model.cfg.model.name}: Grad-CAM ({layer})")
        figure.savefig(folder / GRID_NAME)
        plt.close(figure)
    return written, skipped


def class_titles(class_names: Sequence[str], logits: Any, explained: Sequence[int]) -> list[str]:
    """``pred: Y (p=0.93)``, plus the explained class and its probability when another."""
    from transferlab.reports.gradcam import prediction_title

    probs = logits.float().softmax(1)
    titles = []
    for row, cls in zip(probs, explained, strict=True):
        guess = int(row.argmax())
        title = prediction_title(class_names[guess], prob=float(row[guess]))
        if cls != guess:
            title += f"\nGrad-CAM of: {class_names[cls]} (p={float(row[cls]):.2f})"
        titles.append(title)
    return titles


def segment_titles(class_names: Sequence[str], logits: Any, explained: Sequence[int]) -> list[str]:
    """``pred: Y (12% of pixels)``: the explained class and the share predicted as it."""
    predicted = logits.argmax(1)
    return [
        f"pred: {class_names[cls]} ({float((labels == cls).float().mean()):.0%} of pixels)"
        for labels, cls in zip(predicted, explained, strict=True)
    ]


def detect_titles(class_names: Sequence[str], outputs: Any, explained: Sequence[int]) -> list[str]:
    """``pred: Y (score 0.93, 3 boxes)``: the explained class, its best score and how many of
    its boxes score at least the report's threshold."""
    from transferlab.tasks.detection import REPORT_SCORE

    titles = []
    for found, cls in zip(outputs, explained, strict=True):
        scores = found["scores"][found["labels"] == cls]
        if not len(scores):
            titles.append("no detection")
            continue
        boxes = int((scores >= REPORT_SCORE).sum())
        best = float(scores.max())
        titles.append(f"pred: {class_names[cls]} ({best:.2f}; {boxes} boxes >= {REPORT_SCORE})")
    return titles
