"""Grad-CAM heat maps of a trained network (``pytorch_grad_cam``) and their figure.

The layer is derived from the network (``.backbone``, a timm model, and ``.head``), with
no per-model code:

- a ViT-like backbone (``patch_embed`` and ``blocks``): the last block's ``norm1``, its
  tokens less the ``num_prefix_tokens`` reshaped to the patch grid of the input size;
- any other (CNN) backbone: the deepest of its feature stages (timm's ``feature_info``)
  whose map is at least ``MIN_CELLS`` cells on its shorter side at the input size. That is
  the last stage from 128 px up (224 px: 7x7); smaller inputs use an earlier stage, as a
  1x1 map would give a constant heat map.

The score explained is a class's logit (the predicted class unless told); for a per-pixel
network (segmentation), the sum of the class's logits over the pixels predicted as that
class, as ``pytorch_grad_cam``'s ``SemanticSegmentationTarget`` does, the class being the
most frequent predicted non-background class (0) unless told; for a detector (outputs are
per-image ``{boxes, scores, labels}``), the sum of the scores of the class's detections, the
class being that of the highest-scoring detection unless told.

Heat maps are computed in fp32 with gradients on, whatever inference mode or autocast the
caller is in; gradients flow to the input only (parameters frozen or not: no ``.grad`` is
written), and the network's ``requires_grad`` flags, gradients and train/eval modes are
restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.reports.titles import fitted_suptitle

MIN_CELLS = 4  # the smallest map side a CNN's target stage may have (else a shallower one)
BACKGROUND = 0  # segmentation: the class a most-frequent-class target passes over
HEAT_ALPHA = 0.45


@dataclass(frozen=True)
class CamLayer:
    """The layer Grad-CAM reads, and how its output becomes an NCHW map (None: it is one)."""

    name: str
    module: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class HeatMaps:
    """Grad-CAM of a batch: ``maps`` (B, H, W) in 0-1 at the input's size, the network's
    ``outputs`` (fp32, detached, on CPU), the class each map explains and the layer read."""

    maps: np.ndarray
    outputs: Any  # a tensor (B, C[, H, W]); a detector's list of per-image dicts
    classes: list[int]
    layer: str


@dataclass(frozen=True)
class Panel:
    """One figure panel: an HxWx3 image in 0-1, its HxW heat map in 0-1 and a title."""

    image: np.ndarray
    heat: np.ndarray
    title: str


def cam_layer(network: nn.Module, input_shape: Sequence[int]) -> CamLayer:
    """The layer of ``network`` Grad-CAM reads for inputs of ``input_shape`` (C, H, W)."""
    backbone = network.backbone
    _, height, width = (int(v) for v in input_shape)
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks"):
        return token_layer(backbone, height, width)
    return stage_layer(network, backbone, input_shape)


def token_layer(backbone: nn.Module, height: int, width: int) -> CamLayer:
    """A ViT's last block's ``norm1``; its patch tokens reshaped to the patch grid."""
    embed = backbone.patch_embed
    if getattr(backbone, "dynamic_img_size", False):
        grid = tuple(int(v) for v in embed.dynamic_feat_size((height, width)))
    else:
        grid = tuple(int(v) for v in embed.grid_size)
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))

    def to_map(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        if patches.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(
                f"{patches.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} grid "
                f"of a {height}x{width} input"
            )
        return patches.reshape(len(tokens), grid[0], grid[1], -1).permute(0, 3, 1, 2)

    last = len(backbone.blocks) - 1
    return CamLayer(f"backbone.blocks.{last}.norm1", backbone.blocks[last].norm1, to_map)


def stage_layer(network: nn.Module, backbone: nn.Module, input_shape: Sequence[int]) -> CamLayer:
    """The deepest feature stage with a map of at least ``MIN_CELLS`` on its shorter side
    (else the stage with the largest map), sizes measured by one forward pass."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise UserError(
            f"Grad-CAM: model {type(backbone).__name__} lists no feature stages (timm "
            "feature_info); choose a timm CNN or ViT backbone"
        )
    nhwc = str(getattr(backbone, "output_fmt", "NCHW")) == "NHWC"
    stages = [(str(entry["module"]), backbone.get_submodule(entry["module"])) for entry in info]
    sides = stage_map_sides(network, [module for _, module in stages], input_shape, nhwc)
    measured = [(side, i) for i, side in enumerate(sides) if side is not None]
    if not measured:
        raise UserError(
            f"Grad-CAM: no feature stage of model {type(backbone).__name__} gives a spatial map"
        )
    large = [i for side, i in measured if side >= MIN_CELLS]
    index = large[-1] if large else max(measured)[1]
    name, module = stages[index]
    return CamLayer(f"backbone.{name}", module, nhwc_to_nchw if nhwc else None)


def nhwc_to_nchw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def stage_map_sides(
    network: nn.Module, modules: Sequence[nn.Module], input_shape: Sequence[int], nhwc: bool
) -> list[int | None]:
    """The shorter side of each module's output map for one blank input (None: not a map)."""
    sides: list[int | None] = [None] * len(modules)

    def recorder(i: int) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                sides[i] = int(min(output.shape[1:3] if nhwc else output.shape[2:]))

        return record

    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    device = next(network.parameters()).device
    try:
        with torch.no_grad(), inference_state(network):
            network(torch.zeros(1, *(int(v) for v in input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    return sides


class ClassScore:
    """The score Grad-CAM explains for one image: ``index``'s logit (the predicted class's
    when None); per-pixel outputs: ``index``'s logits summed over its predicted pixels."""

    def __init__(self, index: int | None = None) -> None:
        self.index = index

    def __call__(self, output: Any) -> torch.Tensor:
        index = explained_class(output, self.index)
        if isinstance(output, Mapping):  # a detector's: the scores of the class's boxes
            return output["scores"][output["labels"] == index].sum()
        if output.ndim == 1:
            return output[index]
        return (output[index] * (output.argmax(0) == index)).sum()


def explained_class(output: torch.Tensor, index: int | None) -> int:
    """``index``, or the predicted class (per-pixel outputs: the most frequent predicted class
    other than the background, the background if it is all there is)."""
    if index is not None:
        return int(index)
    if isinstance(output, Mapping):  # a detector's: the class of its best box
        scores = output["scores"]
        return int(output["labels"][scores.argmax()]) if len(scores) else BACKGROUND
    if output.ndim == 1:
        return int(output.argmax())
    return most_frequent_class(output.argmax(0), output.shape[0])


def most_frequent_class(labels: torch.Tensor, num_classes: int) -> int:
    """The most frequent class of a label map other than the background (the background if
    it is all there is); labels outside the classes, such as ignored pixels, left out."""
    labels = labels.flatten()
    labels = labels[(labels >= 0) & (labels < num_classes)]
    counts = torch.bincount(labels, minlength=num_classes)
    counts[BACKGROUND] = 0
    return int(counts.argmax()) if int(counts.max()) > 0 else BACKGROUND


@contextlib.contextmanager
def inference_state(network: nn.Module) -> Iterator[None]:
    """Eval mode, every parameter's ``requires_grad`` off; modes, flags and ``.grad`` restored."""
    params = list(network.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [m.training for m in network.modules()]
    try:
        network.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in zip(network.modules(), modes, strict=True):
            module.training = mode


def heat_maps(
    network: nn.Module, images: torch.Tensor, classes: Sequence[int | None] | None = None
) -> HeatMaps:
    """Grad-CAM of normalised ``images`` (B, C, H, W) for ``classes`` (one per image; None:
    the predicted one), in fp32 with gradients to the input only (module docstring)."""
    from pytorch_grad_cam import GradCAM

    wanted = list(classes) if classes is not None else [None] * len(images)
    if len(wanted) != len(images):
        raise ValueError(f"{len(wanted)} classes for {len(images)} images")
    layer = cam_layer(network, images.shape[1:])
    device = next(network.parameters()).device
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False),
        inference_state(network),
    ):
        inputs = images.detach().clone().float().to(device).requires_grad_(True)
        cam = GradCAM(network, [layer.module], reshape_transform=layer.reshape)
        try:
            maps = cam(inputs, [ClassScore(c) for c in wanted])
            outputs = detached(cam.outputs)
        finally:
            cam.activations_and_grads.release()
            cam.outputs = None
    explained = [explained_class(o, c) for o, c in zip(outputs, wanted, strict=True)]
    return HeatMaps(np.asarray(maps, dtype=np.float32), outputs, explained, layer.name)


def detached(outputs: Any) -> Any:
    """A network's outputs detached, fp32 (floats), on CPU: a tensor or a list of dicts."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().cpu()
    return [
        {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
         for k, v in output.items()}
        for output in outputs
    ]  # fmt: skip


def plain_cpu_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` on CPU in fp32, NCHW and uncompiled, for Grad-CAM beside a run
    whose network may be on an accelerator, compiled, or laid out for its runtime."""
    original = getattr(network, "_orig_mod", network)
    plain = copy.deepcopy(original).to("cpu", torch.float32)
    plain.to(memory_format=torch.contiguous_format)
    for module in plain.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return plain


def prediction_title(predicted: str, true: str | None = None, prob: float | None = None) -> str:
    """``true: X / pred: Y`` (a test image) or ``pred: Y (p=0.93)`` (a user's image),
    broken after the slash when long."""
    guess = f"pred: {predicted}" + (f" (p={prob:.2f})" if prob is not None else "")
    if true is None:
        return guess
    joined = f"true: {true} / {guess}"
    return joined if len(joined) <= 26 else f"true: {true} /\n{guess}"


def gradcam_figure(
    groups: Sequence[tuple[str, Sequence[Panel]]],
    title: str = "",
    columns: int = 8,
    dpi: int = 100,
):
    """Panels (image with its heat map overlaid, titled) in rows of ``columns``; each group
    starts a row, labelled with the group's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, Sequence[Panel]]] = []
    for label, panels in groups:
        for start in range(0, len(panels), columns):
            rows.append((label if start == 0 else "", panels[start : start + columns]))
    width = min(columns, max([len(panels) for _, panels in rows] + [1]))
    labelled = any(label for label, _ in rows)
    fig, axes = plt.subplots(
        max(1, len(rows)), width,
        figsize=(1.9 * width + (0.9 if labelled else 0.2), 2.1 * max(1, len(rows)) + 0.5),
        dpi=dpi, squeeze=False,
    )  # fmt: skip
    for axes_row, (label, panels) in zip(axes, rows, strict=False):
        for i, ax in enumerate(axes_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= len(panels):
                ax.axis("off")
                continue
            overlay(ax, panels[i])
        if label:
            axes_row[0].set_ylabel(label, rotation=0, ha="right", va="center")
    for axes_row in axes[len(rows) :]:
        for ax in axes_row:
            ax.axis("off")
    if title:
        fitted_suptitle(fig, title, fontsize=10)
    fig.tight_layout()
    return fig


def overlay(ax: Any, panel: Panel) -> None:
    """``panel``'s image with its heat map over it (jet, half transparent), and its title."""
    ax.imshow(panel.image, interpolation="nearest")
    height, width = panel.heat.shape
    ax.imshow(
        panel.heat, cmap="jet", alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0, interpolation="bilinear",
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
    )  # fmt: skip
    ax.set_title(panel.title, fontsize=7)


def panels_of(images: torch.Tensor, maps: np.ndarray, titles: Sequence[str]) -> list[Panel]:
    """Panels for normalised ``images`` (``for_display``) and their heat maps."""
    from transferlab.reports.confusion import for_display

    return [
        Panel(for_display(image.numpy()), heat, title)
        for image, heat, title in zip(images.detach().cpu(), maps, titles, strict=True)
    ]
