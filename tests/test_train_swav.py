"""Swapped-prediction maths: Sinkhorn marginals, the loss against a hand computation, stop-gradient on
codes, the queue, per-modality independence and the masked supervised term."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.models import SwAVModel
from train.swav import (FeatureQueue, code_stats, modality_losses, sinkhorn, supervised_loss,
                        swapped_prediction_loss)


def _features(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _scores(v, b, k, seed=0, f=8):
    z = _features(v, b, f, seed=seed)
    c = _features(k, f, seed=seed + 1)
    return z @ c.t(), z, c


def test_sinkhorn_marginals():
    scores, _, _ = _scores(1, 24, 6)
    q = sinkhorn(scores[0], eps=0.03, iterations=3)
    # Every sample's code is a distribution (the last normalisation is over samples: exact) ...
    torch.testing.assert_close(q.sum(1), torch.ones(24), rtol=0, atol=1e-5)
    assert (q >= 0).all()
    # ... and the prototype marginals move towards equipartition (B/K each) with every iteration,
    # exact in the limit.
    raw = torch.softmax(scores[0] / 0.03, dim=1).sum(0)
    deviation = lambda col_sums: (col_sums - 4.0).abs().max().item()
    assert deviation(q.sum(0)) < 0.5 * deviation(raw)
    assert deviation(sinkhorn(scores[0], iterations=10).sum(0)) < deviation(q.sum(0))
    q_many = sinkhorn(scores[0], eps=0.03, iterations=1000)
    torch.testing.assert_close(q_many.sum(0), torch.full((6,), 4.0), rtol=0, atol=1e-3)
    torch.testing.assert_close(q_many.sum(1), torch.ones(24), rtol=0, atol=1e-5)


def _plain_sinkhorn(scores: torch.Tensor, eps: float, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp as written in its paper, in float64, without the max shift: [B, K] codes."""
    b, k = scores.shape
    q = torch.exp(scores.double() / eps).t()
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True); q /= k
        q /= q.sum(0, keepdim=True); q /= b
    return (q * b).t()


def test_sinkhorn_is_overflow_safe_and_matches_plain_formula():
    scores, _, _ = _scores(1, 10, 5)
    # Reference without the max shift, in float64 (no overflow there): the shift changes nothing.
    torch.testing.assert_close(sinkhorn(scores[0]).double(), _plain_sinkhorn(scores[0], 0.03), rtol=1e-5, atol=1e-7)
    # The extreme spread of normalised features (+1 vs -1): exp(66.7) would overflow fp16; fp32 is safe.
    extreme = torch.where(scores[0] > 0, 1.0, -1.0).half()
    q = sinkhorn(extreme)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(10), rtol=0, atol=1e-5)


def test_sinkhorn_small_epsilon_keeps_a_far_prototype_finite():
    """eps 0.01 (the demo's sharper codes): a prototype 1.6 below the best score of every sample has
    exp(-160) = 0 in fp32, a column of zeros and 1 / 0. The codes must stay the plain formula's (in
    float64), returned in fp32, equipartition giving the far prototype its share all the same."""
    scores, _, _ = _scores(1, 8, 4, seed=3)
    s = torch.cat([scores[0].clamp(0.2, 1.0), torch.full((8, 1), -0.6)], dim=1)   # [8, 5], column 4 far
    assert (torch.exp((s - s.max()) / 0.01).float()[:, 4] == 0).all()           # what fp32 would compute
    q = sinkhorn(s, eps=0.01, iterations=3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), _plain_sinkhorn(s, 0.01), rtol=1e-5, atol=1e-7)
    assert q[:, 4].sum() > 1.0                                                     # B / K = 1.6 in the limit
    with pytest.raises(ValueError, match="underflows"):
        sinkhorn(s, eps=0.002)


def _reference_loss(scores: np.ndarray, tau: float, assigned=(0, 1)) -> float:
    """Straight from METHOD.md section 1, in float64 loops."""
    v_count, b, k = scores.shape
    total = 0.0
    for v in assigned:
        q = np.exp(scores[v] / 0.03).T
        q /= q.sum()
        for _ in range(3):
            q /= q.sum(1, keepdims=True); q /= k
            q /= q.sum(0, keepdims=True); q /= b
        q = (q * b).T
        sub = 0.0
        for w in range(v_count):
            if w == v:
                continue
            logits = scores[w] / tau
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            sub += -(q * logp).sum(1).mean()
        total += sub / (v_count - 1)
    return total / len(assigned)


def test_loss_equals_hand_computation():
    scores, z, c = _scores(4, 6, 5)
    loss, _ = swapped_prediction_loss(scores, z, c, temperature=0.1)
    assert loss.item() == pytest.approx(_reference_loss(scores.double().numpy(), 0.1), rel=1e-5)


def test_loss_of_uninformative_scores_is_ln_k():
    # Equal scores: codes are uniform (1/K) and every prediction is uniform -> exactly ln K.
    loss, q = swapped_prediction_loss(torch.zeros(3, 4, 7), torch.zeros(3, 4, 8), torch.zeros(7, 8))
    torch.testing.assert_close(q, torch.full((2, 4, 7), 1 / 7))
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)


def test_codes_carry_no_gradient():
    scores, z, c = _scores(3, 5, 4)
    scores.requires_grad_(True)
    tau, views, b, assigned = 0.1, 3, 5, (0, 1)
    loss, q = swapped_prediction_loss(scores, z, c, temperature=tau, assigned=assigned)
    assert not q.requires_grad
    loss.backward()
    # With q held constant, dL/ds_w = sum_{v assigned, v != w} (softmax(s_w/tau) - q_v) / (tau b (V-1) A).
    expected = torch.zeros_like(scores)
    p = torch.softmax(scores.detach() / tau, dim=-1)
    for i, v in enumerate(assigned):
        for w in range(views):
            if w != v:
                expected[w] += (p[w] - q[i]) / (tau * b * (views - 1) * len(assigned))
    torch.testing.assert_close(scores.grad, expected, rtol=1e-4, atol=1e-6)


def test_queue_fifo_and_per_modality():
    queue = FeatureQueue(num_modalities=2, num_assigned=2, length=6, feat_dim=3)
    a, b_, c = (torch.full((2, 3), float(i)) for i in (1, 2, 3))
    queue.push(0, 1, a)
    assert not queue.full(0, 1) and int(queue.filled[0, 1]) == 2
    queue.push(0, 1, b_)
    queue.push(0, 1, c)
    assert queue.full(0, 1)
    torch.testing.assert_close(queue.features[0, 1, :, 0], torch.tensor([3., 3, 2, 2, 1, 1]))  # newest first
    queue.push(0, 1, torch.full((2, 3), 4.0))                                                  # oldest leaves
    torch.testing.assert_close(queue.features[0, 1, :, 0], torch.tensor([4., 4, 3, 3, 2, 2]))
    # Other modality / other assigned crop untouched.
    assert int(queue.filled[1].sum()) == 0 and int(queue.filled[0, 0]) == 0
    assert queue.features[1].abs().sum() == 0 and queue.features[0, 0].abs().sum() == 0


def test_queue_unused_until_full_then_prepended():
    scores, z, c = _scores(3, 4, 5)
    plain_loss, plain_q = swapped_prediction_loss(scores, z, c)
    queue = FeatureQueue(1, 2, length=8, feat_dim=8)
    # Not full: the codes equal those without a queue, while the batch is pushed.
    loss1, q1 = swapped_prediction_loss(scores, z, c, queue=queue, fill_queue=True)
    torch.testing.assert_close(q1, plain_q)
    assert int(queue.filled[0, 0]) == 4 and not queue.full(0, 0)
    other = _features(3, 4, 8, seed=11)
    queue.push(0, 0, other[0])
    queue.push(0, 1, other[1])
    assert queue.full(0, 0) and queue.full(0, 1)
    snapshot = queue.features[0].clone()
    loss2, q2 = swapped_prediction_loss(scores, z, c, queue=queue, fill_queue=False)
    # Full: codes come from Sinkhorn over [queue; batch], the batch rows kept.
    for i, v in enumerate((0, 1)):
        expected = sinkhorn(torch.cat([snapshot[i] @ c.t(), scores[v]]))[-4:]
        torch.testing.assert_close(q2[i], expected)
    assert not torch.allclose(q2, plain_q, atol=1e-3)


def test_each_modality_codes_depend_only_on_its_own_features():
    views, b, k, f = 3, 4, 6, 8
    z = _features(views, 2 * b, f)
    protos = [_features(k, f, seed=5), _features(k, f, seed=6)]
    scores = [z[:, m * b:(m + 1) * b] @ protos[m].t() for m in range(2)]
    queue = FeatureQueue(2, 2, length=b, feat_dim=f)
    losses, codes = modality_losses(scores, z, protos, queue=queue, fill_queue=True)

    z2 = z.clone()
    z2[:, b:] = _features(views, b, f, seed=9)            # other features for modality 1 only
    scores2 = [z2[:, m * b:(m + 1) * b] @ protos[m].t() for m in range(2)]
    losses2, codes2 = modality_losses(scores2, z2, protos, queue=FeatureQueue(2, 2, b, f), fill_queue=True)
    torch.testing.assert_close(codes2[0], codes[0], rtol=0, atol=0)
    assert losses2[0].item() == losses[0].item()
    assert not torch.allclose(codes2[1], codes[1])
    # The queue of modality 0 received modality 0's features only.
    torch.testing.assert_close(queue.features[0, 0], z[0, :b])
    torch.testing.assert_close(queue.features[1, 0], z[0, b:])


def test_model_routes_each_modality_to_its_own_prototypes():
    torch.manual_seed(0)
    model = SwAVModel("resnet18", num_modalities=2, num_prototypes=5, feat_dim=8, hidden_dim=16)
    out = model([torch.rand(4, 2, 1, 16, 16), torch.rand(4, 2, 1, 8, 8)])
    assert [tuple(s.shape) for s in out["scores"]] == [(4, 2, 5), (4, 2, 5)]
    out["scores"][0].sum().backward()
    assert model.prototypes[1].weight.grad is None or model.prototypes[1].weight.grad.abs().sum() == 0
    assert model.prototypes[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(out["scores"][1].detach(), out["z"][:, 2:].detach() @ model.prototypes[1].weight.t())


def test_unlabelled_samples_give_no_supervised_gradient():
    labels = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [float("nan"), 1.0], [0.0, 1.0]])
    logits = torch.randn(2, 4, 2, requires_grad=True)
    loss = supervised_loss(logits, labels, "bce")
    loss.backward()
    g = logits.grad
    assert g[:, 1].abs().sum() == 0          # unlabelled sample
    assert g[:, 2, 0].abs().sum() == 0       # unknown finding of a labelled sample
    assert (g[:, 0].abs() > 0).all() and (g[:, 3].abs() > 0).all() and (g[:, 2, 1].abs() > 0).all()
    # Mean over known entries equals BCE over them.
    known = torch.isfinite(labels)
    ref = F.binary_cross_entropy_with_logits(logits.detach()[:, known], labels[known].expand(2, -1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)

    onehot = torch.tensor([[0.0, 1.0, 0.0], [float("nan")] * 3, [1.0, 0.0, 0.0]])
    logits = torch.randn(2, 3, 3, requires_grad=True)
    supervised_loss(logits, onehot, "ce").backward()
    assert logits.grad[:, 1].abs().sum() == 0 and logits.grad[:, 0].abs().sum() > 0
    # No labelled sample at all: an exact zero that still reaches the head.
    logits = torch.randn(2, 2, 1, requires_grad=True)
    zero = supervised_loss(logits, torch.full((2, 1), float("nan")))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad.abs().sum() == 0


def test_code_stats_detect_collapse():
    k = 10
    healthy = torch.eye(k)[None].repeat(2, 1, 1)          # every sample its own prototype
    collapsed = torch.zeros(2, k, k); collapsed[..., 3] = 1.0
    assert code_stats(healthy)["code_entropy"] == pytest.approx(1.0)
    assert code_stats(healthy)["proto_usage"] == pytest.approx(1.0)
    assert code_stats(collapsed)["code_entropy"] == pytest.approx(0.0)
    assert code_stats(collapsed)["proto_usage"] == pytest.approx(0.1)


def test_lars_matches_the_per_parameter_formula():
    from train.optim import LARS
    torch.manual_seed(0)
    w, bias = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    frozen = torch.randn(2, 3, requires_grad=True)
    opt = LARS([{"params": [w, frozen], "lars": True}, {"params": [bias], "lars": False, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    ref = {id(p): p.detach().clone() for p in (w, bias, frozen)}
    bufs = {}
    for it in range(3):
        gw, gb = torch.randn(4, 3), torch.randn(4)
        w.grad, bias.grad, frozen.grad = gw.clone(), gb.clone(), None   # frozen: gradient dropped
        opt.step()
        for p, g, lars in ((w, gw, True), (bias, gb, False)):
            r = ref[id(p)]
            d = g.clone()
            if lars:
                trust = 0.001 * r.norm() / (g.norm() + 0.01 * r.norm() + 1e-8)
                d = (g + 0.01 * r) * trust
            bufs[id(p)] = d if it == 0 else 0.9 * bufs[id(p)] + d
            ref[id(p)] = r - 0.5 * bufs[id(p)]
            torch.testing.assert_close(p.detach(), ref[id(p)])
    torch.testing.assert_close(frozen.detach(), ref[id(frozen)], rtol=0, atol=0)
    assert frozen not in opt.state or not opt.state[frozen]
