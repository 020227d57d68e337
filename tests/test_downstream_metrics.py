"""Downstream metrics against scikit-learn and constructed cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from train.downstream import convergence, metrics, robustness, subsets


@pytest.fixture(scope="module")
def pneumonia(medmnist_dir):
    return np.load(medmnist_dir / "pneumoniamnist.npz")


def _scores_with_ties(y, seed):
    rng = np.random.default_rng(seed)
    s = y * 0.8 + rng.normal(0, 0.6, y.shape)
    return np.round(s, 1)  # rounding makes many ties


def test_binary_auc_and_ap_agree_with_sklearn(pneumonia):
    y = pneumonia["test_labels"].ravel()
    for seed in range(5):
        s = _scores_with_ties(y, seed)
        assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert np.isnan(metrics.roc_auc(np.ones(5), np.arange(5)))


def test_multiclass_and_multilabel_auc_agree_with_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + np.eye(4)[y] * 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metrics.auc(y, p, "multiclass") == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    ym = (rng.random((300, 3)) < 0.4).astype(float)
    sm = ym + rng.normal(0, 1, ym.shape)
    assert metrics.auc(ym, sm, "multilabel") == pytest.approx(roc_auc_score(ym, sm, average="macro"), abs=1e-12)
    ym[::7, 1] = np.nan  # unknown labels are ignored, not counted as negatives
    known = np.isfinite(ym[:, 1])
    expected = np.mean([roc_auc_score(ym[:, 0], sm[:, 0]), roc_auc_score(ym[known, 1], sm[known, 1]), roc_auc_score(ym[:, 2], sm[:, 2])])
    assert metrics.auc(ym, sm, "multilabel") == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_matches_sklearn_on_the_same_resamples(pneumonia):
    y = pneumonia["test_labels"].ravel()
    s = _scores_with_ties(y, 3)
    ours = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_boot=300, seed=7)
    theirs = metrics.bootstrap_ci(roc_auc_score, y, s, n_boot=300, seed=7)
    assert (ours.value, ours.low, ours.high) == pytest.approx((theirs.value, theirs.low, theirs.high), abs=1e-12)
    assert ours.low < ours.value < ours.high
    assert ours.high - ours.low < 0.1  # 624 test cases: a few AUC points wide


def test_operating_point():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.05, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    t = metrics.threshold_for_sensitivity(y, s, 0.9)
    sens, spec = metrics.sensitivity_specificity(y, s, t)
    assert t == 0.4 and sens == pytest.approx(0.9) and spec == pytest.approx(0.75)


def test_label_subsets_are_stratified_nested_and_seeded(pneumonia):
    y = pneumonia["train_labels"].ravel()
    fractions = (1.0, 0.5, 0.25, 0.1, 0.01)
    a = subsets.stratified_nested_subsets(y, fractions, seed=0)
    b = subsets.stratified_nested_subsets(y, fractions, seed=0)
    c = subsets.stratified_nested_subsets(y, fractions, seed=1)
    share = y.mean()
    for f in fractions:
        assert np.array_equal(a[f], b[f])
        assert len(a[f]) == pytest.approx(f * len(y), abs=2)
        assert y[a[f]].mean() == pytest.approx(share, abs=0.02)
    for big, small in zip(fractions, fractions[1:]):
        assert set(a[small]) <= set(a[big])
    assert not np.array_equal(a[0.1], c[0.1])
    assert len(a[1.0]) == len(y)
    with pytest.raises(ValueError, match="fewer examples"):
        subsets.stratified_nested_subsets(y[:50], [0.01], seed=0)


def test_convergence_known_answers():
    curve = [0.5, 0.7, 0.85, 0.9, 0.935, 0.95, 0.94]
    assert convergence.epochs_to_fraction_of_best(curve) == 5  # 0.98 * 0.95 = 0.931 <= 0.935
    assert convergence.epochs_to_fraction_of_best(curve, fraction=0.9) == 4  # 0.855
    assert convergence.epochs_to_fraction_of_best([0.5, 0.7, 0.93, 0.95]) == 4  # 0.93 < 0.931
    assert convergence.speedup(5, 10) == 0.5


def test_robustness_known_answers():
    cfg = robustness.RobustnessConfig(n_images=4, n_transforms=3, gamma=(2.0, 2.0), max_rotation_deg=0.0, scale=(1.0, 1.0))
    images = torch.full((6, 1, 16, 16), 0.5)
    changes = robustness.robustness_changes(lambda x: x.mean(dim=(1, 2, 3)), images, cfg)
    assert changes.shape == (4, 3)
    assert changes == pytest.approx(np.full((4, 3), 0.5), abs=1e-5)  # 0.5 -> 0.25
    # q = 0.447 predicts class 0 with p = 0.553; gamma 2 gives q = 0.2, i.e. p = 0.8: a change of 0.447.
    dark = torch.full((3, 1, 16, 16), 0.2 ** 0.5)
    flips = robustness.robustness_changes(lambda x: x.mean(dim=(1, 2, 3)), dark, cfg)  # q = 0.447 -> 0.2
    assert flips == pytest.approx(np.full((3, 3), (0.8 - 0.5528) / 0.5528), abs=1e-4)
    constant = robustness.robustness_changes(lambda x: torch.full((x.shape[0],), 0.3), images, robustness.RobustnessConfig(n_images=4, n_transforms=2))
    assert np.all(constant == 0)
