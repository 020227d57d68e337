"""METHOD.md's 3-D "1 + 4 crops, crops 0 and 1 assigned" as configs/swav_3d_ct.toml resolves it.

Choice (docs/TRAIN.md, "3-D volumes"): one 224 x 224 x 192 crop and four 112 x 112 x 96 crops, five views;
the assigned views are view 0 (the large crop) and view 1 (the first small crop): codes are computed
for those two only, and every view w != v (all five, the other assigned one included) predicts the code
of assigned view v. Here the crops are cut by fn.medswav.multicrop from the real MPRAGE volume (at a
quarter of the production sizes, so the DenseNet3D forward stays cheap on a CPU) and fed through the
3-D SwAV model; the loss must be exactly that rule.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import augment_dali
from nvidia.dali import fn, pipeline_def
from train.config import load_config
from train.models import SwAVModel
from train.swav import sinkhorn, swapped_prediction_loss

from _volume_fixtures import load_series

augment_dali.load_plugin()  # the medswav operators (importing the package loads nothing)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "swav_3d_ct.toml"
SHRINK = 4  # production crop sizes / SHRINK


@pytest.fixture(scope="module")
def cfg():
    return load_config(["--config", str(CONFIG), "--synthetic"])


@pytest.fixture(scope="module")
def views(cfg, dicom_dir):
    """crops as the trainer takes them: one [B, n_g, 1, d_g, s_g, s_g] tensor per group, from two
    rescaled-size stand-ins of the real MR volume (every second voxel, and a shifted copy)."""
    vol, _ = load_series(dicom_dir / "mr_mprage_sagittal_192")
    vols = [np.ascontiguousarray(vol[::2, ::2, ::2]), np.ascontiguousarray(vol[1::2, 1::2, 1::2])]
    sizes = [s // SHRINK for s in cfg.crop_sizes]
    depths = [d // SHRINK for d in cfg.crop_depths]

    @pipeline_def(batch_size=len(vols), num_threads=1, device_id=None, seed=3)
    def pipe():
        x = fn.external_source(source=lambda: vols, batch=True, layout="DHW")
        return tuple(fn.medswav.multicrop(x, crop_sizes=sizes, crop_depths=depths,
                                          num_crops=list(cfg.num_crops)))

    p = pipe()
    p.build()
    groups = p.run()
    return [torch.from_numpy(np.stack([np.array(g[i]) for i in range(len(vols))]))[:, :, None] for g in groups]


def test_config_is_one_plus_four_with_views_0_and_1_assigned(cfg, views):
    assert tuple(cfg.num_crops) == (1, 4) and tuple(cfg.crops_for_assign) == (0, 1)
    assert tuple(cfg.crop_sizes) == (224, 112) and tuple(cfg.crop_depths) == (192, 96)
    big, small = views
    assert big.shape[1:] == (1, 1, 192 // SHRINK, 224 // SHRINK, 224 // SHRINK)
    assert small.shape[1:] == (4, 1, 96 // SHRINK, 112 // SHRINK, 112 // SHRINK)


def test_loss_assigns_the_large_crop_and_the_first_small_crop(cfg, views):
    torch.manual_seed(0)
    model = SwAVModel(cfg.arch, 1, cfg.num_prototypes, cfg.feat_dim, cfg.hidden_dim,
                      assigned_views=len(cfg.crops_for_assign)).eval()
    with torch.no_grad():
        out = model(views)
        # view order: the large crop, then the small crops in order (view 1 = first small crop)
        z_small0 = model.projection(model.backbone(views[1][:, 0]))
    scores, z = out["scores"][0], out["z"]
    assert scores.shape[0] == 5
    torch.testing.assert_close(z[1], z_small0, rtol=1e-5, atol=1e-5)
    protos = model.prototypes[0].weight
    tau, eps, iters = cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations

    loss, codes = swapped_prediction_loss(scores, z, protos, temperature=tau, eps=eps, iterations=iters,
                                          assigned=cfg.crops_for_assign)

    # the documented rule, written out: codes of views 0 and 1 only; each predicted by the four others
    log_p = F.log_softmax(scores / tau, dim=-1)
    want = 0.0
    for i, v in enumerate((0, 1)):
        q = sinkhorn(scores[v].clone(), eps, iters)
        torch.testing.assert_close(codes[i], q)
        others = [w for w in range(5) if w != v]
        want = want + sum(-(q * log_p[w]).sum(1).mean() for w in others) / len(others)
    torch.testing.assert_close(loss, want / 2)

    # views 2..4 are predictors only: changing them leaves the codes as they were ...
    moved = scores.clone()
    moved[2:] = moved[2:].roll(1, dims=-1)
    _, codes_moved = swapped_prediction_loss(moved, z, protos, temperature=tau, eps=eps, iterations=iters,
                                             assigned=cfg.crops_for_assign)
    torch.testing.assert_close(codes_moved, codes)
    # ... while view 1 is assigned: its code follows its scores
    moved = scores.clone()
    moved[1] = moved[1].roll(1, dims=-1)
    _, codes_moved = swapped_prediction_loss(moved, z, protos, temperature=tau, eps=eps, iterations=iters,
                                             assigned=cfg.crops_for_assign)
    torch.testing.assert_close(codes_moved[0], codes[0])
    assert not torch.allclose(codes_moved[1], codes[1])
    # a single assigned crop (the other reading of "1 + 4") is a different loss
    single, _ = swapped_prediction_loss(scores, z, protos, temperature=tau, eps=eps, iterations=iters, assigned=(0,))
    assert not torch.isclose(single, loss)
