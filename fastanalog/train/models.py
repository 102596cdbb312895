"""Models for the training CLI: the small CNN and MLP of the experiments, or any timm model."""

from __future__ import annotations

import torch
from torch import nn

BUILTIN_MODELS = ("cnn", "mlp")
# Side of the input images of the built-in models where the dataset does not fix one (image folders), pixels.
BUILTIN_DEFAULT_IMAGE_SIZE = 32
# Input side of a timm model without a pretrained configuration, pixels.
TIMM_DEFAULT_IMAGE_SIZE = 224

# timm families whose constructors take ``img_size`` (patch-embedding models sized to the input).
_IMG_SIZE_PREFIXES = ("vit", "deit")


class SmallCNN(nn.Module):
    """Two-conv CNN: conv5x5(16)-ReLU-maxpool2 -> conv5x5(32)-ReLU-maxpool2 -> FC128-ReLU -> FC(num_classes).

    Both convolutions use ``padding=2`` (size-preserving), so each pooling halves the side
    (floor): a 28x28 input reaches the classifier as 32x7x7, an 8x8 input as 32x2x2.

    Args:
        in_channels: input channels (1 for grey-scale images).
        num_classes: output logits.
        image_size: side of the square input images, pixels (>= 4).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"SmallCNN needs image_size >= 4 (two 2x2 max-pools), got {image_size}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 2 // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, in_channels, image_size, image_size)`` to logits ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected network ``in_features-256-128-num_classes`` with ReLU; flattens its input.

    Args:
        in_features: inputs per sample after flattening, ``C * H * W`` (784 for 28x28 grey-scale).
        num_classes: output logits.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features} and {num_classes}")
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs ``(N, ...)`` with ``in_features`` values per sample to logits ``(N, num_classes)``."""
        return self.net(x)


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is ``cnn``, ``mlp`` or a name in ``timm.list_models()``."""
    if name in BUILTIN_MODELS:
        return
    import timm

    if name not in timm.list_models():
        raise ValueError(
            f"unknown model {name!r}: choose cnn, mlp or any name in timm.list_models() (e.g. resnet18, vit_tiny_patch16_224)"
        )


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """Build a model by name: ``cnn`` (SmallCNN), ``mlp`` (MLP) or any timm model name.

    timm models are created untrained (``pretrained=False``) with ``in_chans=in_channels``;
    ViT/DeiT models also get ``img_size=image_size``.

    Args:
        name: ``cnn``, ``mlp`` or a name from ``timm.list_models()``.
        in_channels: input channels.
        num_classes: output logits.
        image_size: side of the square input images, pixels.

    Raises:
        ValueError: unknown name.
    """
    if name == "cnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if name == "mlp":
        return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes)
    check_model_name(name)
    import timm

    kwargs: dict[str, object] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    if name.startswith(_IMG_SIZE_PREFIXES):
        kwargs["img_size"] = image_size
    return timm.create_model(name, **kwargs)


def model_input(name: str, channels: int, image_size: int | None) -> tuple[int, int]:
    """Channels and side of the images that model ``name`` is built for, given the dataset's.

    The built-in models take the dataset's images as they are (``BUILTIN_DEFAULT_IMAGE_SIZE``
    where their size varies). timm models take 3 channels, as their configurations assume
    (grey images are repeated); they keep the dataset's size unless their pretrained
    configuration fixes the input size (ViT, DeiT, ...: its ``input_size``), or sets a
    ``min_input_size`` above it; where the dataset's size varies they take ``input_size``.

    Args:
        name: ``cnn``, ``mlp`` or a timm model name.
        channels: channels of the dataset's images.
        image_size: side of the dataset's images, or None where it varies.

    Returns:
        ``(channels, image_size)`` of the model's input.
    """
    if name in BUILTIN_MODELS:
        return channels, image_size if image_size is not None else BUILTIN_DEFAULT_IMAGE_SIZE
    check_model_name(name)
    import timm

    cfg = timm.get_pretrained_cfg(name)
    default = int(cfg.input_size[-1]) if cfg is not None else TIMM_DEFAULT_IMAGE_SIZE
    size = default if image_size is None or (cfg is not None and cfg.fixed_input_size) else image_size
    if cfg is not None and cfg.min_input_size is not None:
        size = max(size, int(cfg.min_input_size[-1]))
    return 3, size
