"""--deterministic on CUDA, checked on the CPU through the real code paths.

torch.use_deterministic_algorithms(True) raises on CUDA for ops without a deterministic kernel; on the
CPU it does not, so the training step's forward + backward + code statistics are traced at the ATen
level here and checked against torch's documented list of ops that have no deterministic CUDA kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train import determinism
from augment_dali.config import AugmentConfig
from train.config import Config
from train.models import SwAVModel
from train.swav import code_stats, modality_losses

REPO = Path(__file__).resolve().parents[1]

# torch.use_deterministic_algorithms: ops that raise on CUDA tensors (those a SwAV step could reach).
NO_DETERMINISTIC_CUDA_KERNEL = {
    "adaptive_avg_pool2d_backward", "_adaptive_avg_pool2d_backward", "adaptive_avg_pool3d_backward",
    "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward", "adaptive_max_pool3d_backward",
    "max_pool3d_with_indices_backward", "avg_pool3d_backward", "bincount", "index_add", "index_add_",
    "scatter_add", "scatter_add_", "scatter_reduce", "put_", "histc", "embedding_bag",
    "_embedding_bag_backward", "nll_loss2d_forward", "upsample_bilinear2d_backward",
}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops_of_a_step(arch: str, crops) -> set[str]:
    torch.manual_seed(0)
    model = SwAVModel(arch, 1, 50, feat_dim=16, hidden_dim=32)
    log = OpLog()
    with log:
        out = model(crops)
        losses, _ = modality_losses(out["scores"], out["z"], [model.prototypes[0].weight])
        torch.stack(losses).sum().backward()
        code_stats(out["scores"][0][:2])
    return log.ops


def test_resnet_step_uses_only_ops_with_deterministic_cuda_kernels():
    crops = [torch.rand(4, 2, 1, 32, 32), torch.rand(4, 2, 1, 16, 16)]
    ops = _ops_of_a_step("resnet18", crops)
    assert "convolution_backward" in ops          # the trace saw the backward pass
    assert not ops & NO_DETERMINISTIC_CUDA_KERNEL, sorted(ops & NO_DETERMINISTIC_CUDA_KERNEL)


def test_densenet3d_head_pooling_is_deterministic_and_its_max_pool3d_refused():
    crops = [torch.rand(2, 2, 1, 8, 24, 24)]
    ops = _ops_of_a_step("densenet3d", crops)
    # Its in-network MaxPool3d has no deterministic CUDA backward: refused up front, naming the op.
    assert ops & NO_DETERMINISTIC_CUDA_KERNEL == {"max_pool3d_with_indices_backward"}
    cfg = Config(synthetic=True, arch="densenet3d", augment=AugmentConfig(crop_depths=(8, 4)), deterministic=True)
    assert "MaxPool3d" in determinism.refusal(cfg, "cuda")
    assert determinism.refusal(cfg, "cpu") is None
    assert determinism.refusal(Config(synthetic=True, arch="resnet50", deterministic=True), "cuda") is None


def test_pooling_and_code_stats_match_the_ops_they_replace():
    torch.manual_seed(0)
    model = SwAVModel("densenet3d", 1, 10).eval()
    x = torch.rand(2, 1, 8, 24, 24)
    feats = model.backbone.features(x)
    pooled = torch.cat([torch.nn.functional.adaptive_max_pool3d(feats, 1).flatten(1),
                        torch.nn.functional.adaptive_avg_pool3d(feats, 1).flatten(1)], dim=1)
    torch.testing.assert_close(model.backbone(x), pooled)
    scores = torch.randn(2, 40, 30)
    best = scores.reshape(-1, 30).argmax(1)
    hist = torch.bincount(best, minlength=30).float()
    p = hist[hist > 0] / best.numel()
    stats = code_stats(scores)
    assert stats["proto_usage"] == pytest.approx(float((hist > 0).sum()) / 30)
    assert stats["code_entropy"] == pytest.approx(float(-(p * p.log()).sum()) / torch.log(torch.tensor(30.0)).item())


def test_cublas_workspace_is_set_before_cuda_work_or_refused(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    determinism.prepare_environment("cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    determinism.prepare_environment("cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"    # a valid choice is kept
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(determinism.DeterminismError, match="CUBLAS_WORKSPACE_CONFIG=:0:0"):
        determinism.prepare_environment("cuda")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    determinism.prepare_environment("cpu")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_train_refuses_deterministic_densenet3d_on_cuda_with_one_line():
    """Through the real entry point: --device cuda --deterministic on densenet3d is refused before any
    CUDA work (this machine has no GPU, so the device check must come after the refusal or name both)."""
    run = subprocess.run([sys.executable, "-m", "train", "--synthetic", "--arch", "densenet3d", "--crop-depths", "8,4",
                          "--crop-sizes", "32,16", "--deterministic", "--device", "cuda", "--out", "/nonexistent"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: --deterministic on CUDA: densenet3d")
