"""``transferlab embed`` and ``transferlab verify``: a trained ``task=embedding`` run's
embeddings for a user's images, and whether two images show the same identity.

Images are preprocessed as the run evaluated its test set (``transferlab.inference``); the
embeddings are L2-normalised, so the dot product of two is their cosine similarity.
``verify`` accepts a pair whose similarity reaches the threshold the run chose on its
validation identities for ``task.far`` (``verification.json`` in the run folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferlab.errors import UserError

EMBED_USAGE = """\
usage: transferlab embed run=<run id | run folder | checkpoint> images=<file | folder>
                         [out=embeddings] [batch_size=64] [store_dir=mlruns]

Embed images with a trained task=embedding run's best checkpoint. A folder is searched
recursively for images (.jpg, .png, ...); unreadable files are skipped and counted. Writes
<out>/embeddings.npy (one L2-normalised float32 row per image; the dot product of two rows
is their cosine similarity) and <out>/index.csv (row, file), in the order of the rows.
"""
EMBED_DEFAULTS: dict[str, str | None] = {
    "run": None,
    "images": None,
    "out": "embeddings",
    "batch_size": "64",
    "store_dir": "mlruns",
}
VERIFY_USAGE = """\
usage: transferlab verify run=<run id | run folder | checkpoint> <image a> <image b>
                          [store_dir=mlruns]

Whether two images show the same identity, for a trained task=embedding run: prints the
cosine similarity of their embeddings, the run's threshold (chosen on its validation
identities for a false accept rate of task.far) and the decision.
"""
VERIFY_DEFAULTS: dict[str, str | None] = {"run": None, "store_dir": "mlruns"}


def embed_main(argv: list[str]) -> int:
    import numpy as np

    from transferlab.cli import key_value_args
    from transferlab.predict import image_files, positive_int, write_csv_atomically

    args = key_value_args(argv, EMBED_DEFAULTS, EMBED_USAGE)
    if args is None:
        return 0
    batch_size = positive_int(args, "batch_size")
    files = image_files(Path(args["images"]).expanduser())
    model = trained_embedder(args["run"], args["store_dir"], "embed")
    embedded, vectors, skipped = embeddings_of(model, files, batch_size)
    if not embedded:
        raise UserError(f"none of the {len(files)} image file(s) could be read")
    out = Path(args["out"]).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file: embed writes a folder (embeddings.npy, index.csv)")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", vectors)
    write_csv_atomically(
        out / "index.csv", ["row", "file"], [[str(i), str(f)] for i, f in enumerate(embedded)]
    )
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(
        f"Embedded {len(embedded)} image(s) ({vectors.shape[1]} dimensions) with "
        f"{model.checkpoint} into {out}/embeddings.npy and {out}/index.csv{note}"
    )
    return 0


def verify_main(argv: list[str]) -> int:
    from transferlab.cli import key_value_args
    from transferlab.tasks.embedding import verification_threshold

    if any(arg in ("-h", "--help") for arg in argv):
        print(VERIFY_USAGE, end="")
        return 0
    images = [Path(arg).expanduser() for arg in argv if "=" not in arg]
    args = key_value_args([arg for arg in argv if "=" in arg], VERIFY_DEFAULTS, VERIFY_USAGE)
    if len(images) != 2:
        raise UserError(f"verify compares two images, {len(images)} given; see --help")
    for path in images:
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
    model = trained_embedder(args["run"], args["store_dir"], "verify")
    chosen = verification_threshold(model.folder)
    similarity = cosine_similarity(model, images)
    same = similarity >= chosen["threshold"]
    print(
        f"cosine similarity {similarity:.4f}, threshold {chosen['threshold']:.4f} (false "
        f"accept rate {chosen['far']:g} on {chosen['chosen_on']}): "
        f"{'same identity' if same else 'different identities'}"
    )
    return 0


def cosine_similarity(model: Any, images: list[Path]) -> float:
    """The cosine similarity of two images' embeddings; an unreadable image is one line."""
    import torch

    from transferlab.predict import load_image

    try:
        batch = torch.stack([load_image(model, path) for path in images])
    except Exception as err:  # an unreadable or corrupt image
        raise UserError(f"cannot read the images: {str(err).splitlines()[0]}") from None
    with torch.inference_mode():
        first, second = model.network(batch).double()
    return float(first @ second)


def trained_embedder(run: str, store_dir: str, command: str) -> Any:
    """The run ``run`` names, checked to be one that embeds images."""
    from transferlab.inference import load_trained

    model = load_trained(run, store_dir)
    model.require_support("embeds", command)
    return model


def embeddings_of(
    model: Any, files: list[Path], batch_size: int
) -> tuple[list[Path], Any, list[Path]]:
    """The readable files, their embeddings (float32, one row each) and the files skipped
    as unreadable (each reported on stderr)."""
    import numpy as np

    from transferlab.predict import loaded_batches

    embedded: list[Path] = []
    rows = []
    skipped: list[Path] = []
    for paths, batch, _ in loaded_batches(model, files, batch_size, skipped):
        rows.append(model.network(batch).float().numpy())
        embedded += paths
    vectors = np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32)
    return embedded, vectors, skipped
