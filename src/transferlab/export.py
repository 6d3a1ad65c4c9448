"""``transferlab export run=<run> format=onnx``: a trained run's network as a portable file.

ONNX: the network in eval mode, fp32, contiguous, with a dynamic batch axis, written to a
temporary file and renamed into place once onnxruntime's outputs on a batch match
PyTorch's within :data:`TOLERANCE`. Classification and segmentation runs; a segmentation
network's logits are per pixel, at the input's size.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

USAGE = """\
usage: transferlab export run=<run id | run folder | checkpoint> format=onnx
                          [out=model.onnx] [store_dir=mlruns]

Write a trained run's network (best checkpoint) as ONNX, input "image" (batch, C, H, W,
preprocessed as the run's eval transform does; the batch size is free, H and W are the
run's input size), output "logits": (batch, classes) for a classification run, (batch,
classes, H, W) for a segmentation run (the argmax over classes is the mask; resize the
logits to the original image's size first, as transferlab predict does). Then check it
with onnxruntime against PyTorch.
"""
DEFAULTS: dict[str, str | None] = {
    "run": None,
    "format": None,
    "out": "",  # model.<format>
    "store_dir": "mlruns",
}
FORMATS = ("onnx",)
TOLERANCE = 1e-4  # max abs difference of the logits, onnxruntime against PyTorch
TRACE_BATCH, CHECK_BATCH = 2, 5  # different sizes, so the check exercises the free batch axis


def main(argv: list[str]) -> int:
    from transferlab.cli import key_value_args
    from transferlab.inference import load_trained

    args = key_value_args(argv, DEFAULTS, USAGE)
    if args is None:
        return 0
    if args["format"] not in FORMATS:
        raise UserError(
            f"format={args['format']} is not supported; choose from: {', '.join(FORMATS)}"
        )
    out = Path(args["out"] or f"model.{args['format']}").expanduser()
    model = load_trained(args["run"], args["store_dir"])
    model.require_support("exportable", "export")
    difference = export_onnx(model, out)
    print(
        f"Exported {model.checkpoint} to {out} (ONNX, input image: batch x "
        f"{'x'.join(map(str, model.input_size))}); onnxruntime vs PyTorch on a batch of "
        f"{CHECK_BATCH}: max abs difference {difference:.2e} (tolerance {TOLERANCE:.0e})"
    )
    return 0


def export_onnx(model: Any, out: Path) -> float:
    """Write ``model.network`` to ``out`` as ONNX; the max abs difference found by the check."""
    import torch

    network = model.network.float().eval().to(memory_format=torch.contiguous_format)
    sample = torch.randn(TRACE_BATCH, *model.input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(handle)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Shape checks traced as constants: the batch axis is free, H and W are fixed,
            # and the check below runs another batch size through onnxruntime.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                network,
                (sample,),
                temporary,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        difference = onnx_difference(network, temporary, model.input_size)
        if not difference <= TOLERANCE:
            raise UserError(
                f"the ONNX export differs from PyTorch by {difference:.2e} (more than "
                f"{TOLERANCE:.0e}): not written"
            )
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return difference


def onnx_difference(network: Any, path: str | Path, input_size: tuple[int, ...]) -> float:
    """Max abs difference between onnxruntime's and PyTorch's outputs on a seeded batch."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    onnx.checker.check_model(str(path))
    batch = torch.randn(CHECK_BATCH, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(batch).float().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": batch.numpy()})
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max())
