"""The smallest images an architecture accepts, known without building it (no torch, no timm).

Most timm backbones pool adaptively and run on any size; a few downsample so far without
padding that small images leave nothing to convolve. timm's ``pretrained_cfg`` gives the
native input size but rarely a minimum (none for inception_v3), so the minimums are
measured (a forward pass at each size) and kept here; tests/test_bad_inputs.py measures
them again for every config in conf/model/.
"""

from __future__ import annotations

# timm architecture (a trailing * matches a family) -> smallest data.image_size, in pixels.
MIN_IMAGE_SIZE: dict[str, int] = {
    "inception_v3": 75,
    "inception_v4": 75,
    "inception_resnet_v2": 75,
    "vgg*": 32,  # five 2x2 max-pools
}


def min_image_size(model_name: str) -> int:
    """The smallest square input ``model_name`` runs on (1: no known limit)."""
    arch = model_name.split(".", 1)[0]  # without a pretrained tag such as .tv_in1k
    for pattern, size in MIN_IMAGE_SIZE.items():
        if arch == pattern or (pattern.endswith("*") and arch.startswith(pattern[:-1])):
            return size
    return 1
