"""Encoders and the SwAV model (backbone + projector + per-modality prototypes)."""
from .resnet import ARCHS, ResNet, build_encoder
from .swav_model import ProjectionHead, SwAVModel

__all__ = ["ARCHS", "ResNet", "build_encoder", "ProjectionHead", "SwAVModel"]
