"""How a run uses the hardware: memory format, inference precision and compilation.

``auto`` picks, for the machine at hand, only what was measured to help on that kind of
machine (docs/performance.md), and says why:

- ``memory_format``: channels_last on x86-64 CPUs with AVX2 or AVX-512 (training 1.1-2.0x
  faster than NCHW on the three kinds measured: Intel AVX-512/AMX, AMD AVX2, AMD AVX-512)
  and on CUDA; PyTorch's default layout elsewhere (not measured).
- ``eval_precision``: bf16 autocast for validation, test and feature extraction where the
  CPU has bf16 instructions (AVX-512 BF16 or AMX: inference 2.6-2.8x faster) or the GPU
  computes bf16; fp32 elsewhere (emulated bf16 was 10x slower on an AVX2 CPU). Training
  stays in the trainer's ``precision`` (fp32 on CPU: bf16 training was 4-6x slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.machine import Cpu, Setting, cpu

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
EVAL_PRECISIONS = ("auto", "bf16", "32")
# The trainer-group keys read here; the rest of the group goes to pytorch_lightning.Trainer.
RUNTIME_KEYS = ("memory_format", "eval_precision", "compile")


def native_bf16(device_type: str, this: Cpu | None = None) -> bool:
    """Whether ``device_type`` computes bf16 in hardware (else autocast would emulate it).

    On CPU this reads the instruction-set flags (AVX-512 BF16, AMX): oneDNN reports bf16
    "supported" on any AVX-512 CPU, where it is emulated.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool((this or cpu()).bf16_flags)
    return False


def channels_last_measured(device_type: str, this: Cpu | None = None) -> bool:
    """Whether channels_last was measured to train faster on this kind of device."""
    if device_type == "cuda":
        return True
    this = this or cpu()
    return device_type == "cpu" and this.x86 and bool({"avx2", "avx512f"} & this.flags)


def device_type_of(accelerator: str) -> str:
    """The torch device type a Lightning ``accelerator`` setting will run on."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


@dataclass(frozen=True)
class Runtime:
    """The memory format of the network and its 4-d inputs, and the precision of inference."""

    memory_format: str = "contiguous"  # or channels_last, or auto
    eval_precision: str = "32"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.memory_format not in (*MEMORY_FORMATS, "auto"):
            raise UserError(
                f"trainer.memory_format={self.memory_format!r} is not one of "
                f"{', '.join(MEMORY_FORMATS)}, auto"
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

    def resolve(
        self, device_type: str, this: Cpu | None = None
    ) -> tuple[Runtime, dict[str, Setting]]:
        """This runtime with ``auto`` settled for ``device_type`` (on CPU ``this``), and why."""
        this = this or cpu()
        settings: dict[str, Setting] = {}
        if self.memory_format == "auto":
            fast = channels_last_measured(device_type, this)
            if device_type == "cuda":
                why = "the layout cuDNN's tensor cores work in (not measured here on a GPU)"
            elif fast:
                why = f"training measured 1.1-2.0x faster on x86 CPUs with {this.vector_isa()}"
            else:
                why = "channels_last was not measured on this kind of device"
            settings["memory_format"] = Setting("channels_last" if fast else "contiguous", why)
        else:
            settings["memory_format"] = Setting(self.memory_format, "trainer.memory_format")
        if self.eval_precision == "auto":
            native = native_bf16(device_type, this)
            if device_type == "cpu":
                flags = ", ".join(this.bf16_flags)
                why = f"the CPU has {flags}" if native else "no bf16 instructions in this CPU"
            else:
                why = f"{device_type} {'computes' if native else 'does not compute'} bf16"
            settings["eval_precision"] = Setting("bf16" if native else "32", why)
        else:
            settings["eval_precision"] = Setting(self.eval_precision, "trainer.eval_precision")
        concrete = replace(
            self,
            memory_format=settings["memory_format"].value,
            eval_precision=settings["eval_precision"].value,
        )
        return concrete, settings

    @property
    def layout(self) -> torch.memory_format:
        name = self.memory_format
        if name == "auto":
            name = "channels_last" if channels_last_measured("cpu") else "contiguous"
        return MEMORY_FORMATS[name]

    def prepare(self, network: nn.Module) -> nn.Module:
        """Lay ``network``'s weights out in the memory format; compile it in place if asked."""
        network.to(memory_format=self.layout)
        if self.compile:
            network.compile()
        return network

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images in the network's memory format (other tensors unchanged)."""
        if x.ndim != 4:
            return x
        return x.contiguous(memory_format=self.layout)

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
