"""CIFAR model zoo: plain ``nn.Module``s returning logits, and a name registry (:func:`create_model`).

Architectures and default inits follow upstream (RelationalML/sparse_to_sparse): CIFAR ResNet-18/34/50 with a 3×3
stem, VGG-16/19 with BN, ResNet-20 of He et al., plus a small conv net for the 8×8 digits quickstart. Pooling is
adaptive, so the same models serve 64×64 Tiny-ImageNet with unchanged weight shapes (apart from the classifier).
Two small transformers (a causal language model with a tied head, a ViT-style classifier) serve the "your own
model" examples.
"""

from __future__ import annotations

from er_lightning.models.registry import MODEL_NAMES, create_model
from er_lightning.models.resnet20 import ResNet20, resnet20
from er_lightning.models.resnet_cifar import BasicBlock, Bottleneck, ResNetCIFAR, resnet18, resnet34, resnet50
from er_lightning.models.small import SmallCNN, small_cnn
from er_lightning.models.transformer import TransformerBlock, TransformerLM, ViT, transformer_lm
from er_lightning.models.vgg import VGG, vgg16, vgg19

__all__ = [
    "MODEL_NAMES",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "ResNet20",
    "ResNetCIFAR",
    "SmallCNN",
    "TransformerBlock",
    "TransformerLM",
    "ViT",
    "create_model",
    "resnet18",
    "resnet20",
    "resnet34",
    "resnet50",
    "small_cnn",
    "transformer_lm",
    "vgg16",
    "vgg19",
]
