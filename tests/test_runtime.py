"""Memory format and inference precision: applied where configured, checked, and accurate."""

from __future__ import annotations

import functools

import pytest
import torch

from transferlab.errors import UserError
from transferlab.finetune.cache import extract_features
from transferlab.machine import Cpu, cpu
from transferlab.models import build_classifier
from transferlab.module import TransferModule
from transferlab.runtime import Runtime

MODEL = {"name": "resnet18", "pretrained": False}


def images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"memory_format": "nhwc"}, "trainer.memory_format"),
        ({"eval_precision": "fp16"}, "trainer.eval_precision"),
        ({"compile": "yes"}, "trainer.compile"),
    ],
)
def test_bad_values_are_user_errors(options: dict, key: str) -> None:
    with pytest.raises(UserError, match=key):
        Runtime(**options)


def test_from_config_reads_only_the_runtime_keys() -> None:
    runtime = Runtime.from_config({"max_epochs": 3, "memory_format": "channels_last"})
    assert runtime == Runtime(memory_format="channels_last", eval_precision="32")


def test_channels_last_lays_out_weights_and_inputs() -> None:
    runtime = Runtime(memory_format="channels_last")
    network = runtime.prepare(build_classifier(MODEL, num_classes=3))
    conv = network.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert runtime.inputs(images()).is_contiguous(memory_format=torch.channels_last)
    features = torch.randn(4, 512)
    assert runtime.inputs(features) is features


def module(runtime: Runtime) -> TransferModule:
    torch.manual_seed(0)
    network = build_classifier(MODEL, num_classes=5)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    return TransferModule(network, 5, optimizer=optimizer, runtime=runtime).eval()


def test_bf16_inference_gives_fp32_logits_close_to_fp32() -> None:
    x = images()
    with torch.no_grad():
        reference = module(Runtime()).infer({"image": x})
        fast = module(Runtime("channels_last", "bf16")).infer({"image": x})
        with Runtime(eval_precision="bf16").inference("cpu"):
            assert torch.nn.Linear(4, 2)(torch.randn(1, 4)).dtype == torch.bfloat16
    assert reference.dtype == fast.dtype == torch.float32
    assert not torch.equal(reference, fast)  # bf16 really computed them
    torch.testing.assert_close(fast, reference, rtol=0.05, atol=0.05)
    assert torch.equal(fast.argmax(1), reference.argmax(1))


def test_auto_precision_follows_the_cpu_flags() -> None:
    assert Runtime(eval_precision="auto").bf16_inference("cpu") == bool(cpu().bf16_flags)
    assert not Runtime(eval_precision="32").bf16_inference("cpu")


# The CPU kinds the auto settings were measured on (docs/performance.md), and one that was not.
INTEL_AMX = Cpu("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), "x86_64")
AMD_AVX2 = Cpu("AMD EPYC", frozenset({"avx", "avx2"}), "x86_64")
AMD_AVX512 = Cpu("AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}), "x86_64")
INTEL_AVX512_NO_BF16 = Cpu("Intel Xeon", frozenset({"avx2", "avx512f", "avx512bw"}), "x86_64")
ARM = Cpu("Neoverse", frozenset({"asimd"}), "aarch64")


@pytest.mark.parametrize(
    ("machine", "layout", "precision"),
    [
        (INTEL_AMX, "channels_last", "bf16"),
        (AMD_AVX512, "channels_last", "bf16"),
        (AMD_AVX2, "channels_last", "32"),  # emulated bf16 measured 10x slower there
        (INTEL_AVX512_NO_BF16, "channels_last", "32"),  # oneDNN would emulate bf16
        (ARM, "contiguous", "32"),  # nothing measured: PyTorch's defaults
    ],
)
def test_auto_settles_each_cpu_kind_and_says_why(machine: Cpu, layout: str, precision: str) -> None:
    runtime, settings = Runtime("auto", "auto").resolve("cpu", machine)
    assert (runtime.memory_format, runtime.eval_precision) == (layout, precision)
    assert settings["memory_format"].value == layout and settings["memory_format"].why
    assert settings["eval_precision"].value == precision
    if precision == "bf16":
        assert "bf16" in settings["eval_precision"].why
    else:
        assert settings["eval_precision"].why == "no bf16 instructions in this CPU"


def test_explicit_settings_are_kept_and_attributed_to_the_config() -> None:
    runtime, settings = Runtime("contiguous", "bf16").resolve("cpu", AMD_AVX2)
    assert runtime == Runtime("contiguous", "bf16")
    assert settings["memory_format"].why == "trainer.memory_format"
    assert settings["eval_precision"].why == "trainer.eval_precision"


def test_cached_features_under_bf16_stay_close_to_fp32() -> None:
    dataset = [{"image": x, "label": i % 5} for i, x in enumerate(images(16))]
    backbone = build_classifier(MODEL, num_classes=5).backbone
    cpu = torch.device("cpu")
    exact = extract_features(backbone, dataset, 8, cpu, "fp32")
    fast = extract_features(
        backbone, dataset, 8, cpu, "bf16", runtime=Runtime("channels_last", "bf16")
    )
    assert exact.features.dtype == fast.features.dtype == torch.float32
    assert torch.equal(exact.labels, fast.labels)
    assert not torch.equal(exact.features, fast.features)
    torch.testing.assert_close(fast.features, exact.features, rtol=0.05, atol=0.05)
