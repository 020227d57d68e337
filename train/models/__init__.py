"""Encoders and the SwAV model (backbone + projector + per-modality prototypes)."""
from .densenet3d import DenseNet3D
from .resnet import ARCHS, ARCHS_3D, ResNet, build_encoder
from .swav_model import ProjectionHead, SwAVModel

__all__ = ["ARCHS", "ARCHS_3D", "DenseNet3D", "ResNet", "build_encoder", "ProjectionHead", "SwAVModel"]
