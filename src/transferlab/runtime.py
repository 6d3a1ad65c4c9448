"""How a run uses the hardware: memory format, inference precision and compilation.

Measured on a 2-core AVX-512/AMX CPU (docs/performance.md): the channels_last layout trains
about 1.3x faster than PyTorch's default NCHW, and with bf16 autocast inference (validation,
test, feature extraction) runs 2.6x faster, but training 4-6x slower, so bf16 is used for
inference only. ``auto`` picks bf16 where the hardware computes it natively, fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferlab.errors import UserError

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
EVAL_PRECISIONS = ("auto", "bf16", "32")
# The trainer-group keys read here; the rest of the group goes to pytorch_lightning.Trainer.
RUNTIME_KEYS = ("memory_format", "eval_precision", "compile")


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 in hardware (else autocast would emulate it)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@dataclass(frozen=True)
class Runtime:
    """The memory format of the network and its 4-d inputs, and the precision of inference."""

    memory_format: str = "contiguous"
    eval_precision: str = "32"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.memory_format not in MEMORY_FORMATS:
            raise UserError(
                f"trainer.memory_format={self.memory_format!r} is not one of "
                f"{', '.join(MEMORY_FORMATS)}"
            )
        if str(self.eval_precision) not in EVAL_PRECISIONS:
            raise UserError(
                f"trainer.eval_precision={self.eval_precision!r} is not one of "
                f"{', '.join(EVAL_PRECISIONS)}"
            )
        if not isinstance(self.compile, bool):
            raise UserError(f"trainer.compile={self.compile!r} must be true or false")
        object.__setattr__(self, "eval_precision", str(self.eval_precision))

    @classmethod
    def from_config(cls, trainer: Mapping[str, Any]) -> Runtime:
        """The runtime keys of the ``trainer`` config group (defaults where absent)."""
        return cls(**{key: trainer[key] for key in RUNTIME_KEYS if key in trainer})

    def prepare(self, network: nn.Module) -> nn.Module:
        """Lay ``network``'s weights out in the memory format; compile it in place if asked."""
        network.to(memory_format=MEMORY_FORMATS[self.memory_format])
        if self.compile:
            network.compile()
        return network

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images in the network's memory format (other tensors unchanged)."""
        if x.ndim != 4:
            return x
        return x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])

    def bf16_inference(self, device_type: str) -> bool:
        if self.eval_precision == "auto":
            return native_bf16(device_type)
        return self.eval_precision == "bf16"

    @contextlib.contextmanager
    def inference(self, device_type: str) -> Iterator[None]:
        """Autocast to bf16 for inference where asked; fp32 (no autocast) otherwise."""
        if not self.bf16_inference(device_type):
            yield
            return
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
