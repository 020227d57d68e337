"""The linear probe of `benchmarks.representation` (the protocol every pretraining arm is judged by), on
real PneumoniaMNIST features of a seeded random encoder; the lightly arms are not needed here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.representation import C_GRID, extract_features, probe, random_encoder
from train.downstream.data import load_npz
from train.downstream.subsets import stratified_nested_subsets


@pytest.fixture(scope="module")
def pneumonia_features(medmnist_dir):
    torch.set_num_threads(2)
    data = load_npz(medmnist_dir / "pneumoniamnist.npz")
    idx = stratified_nested_subsets(data["train"].labels, [0.1], seed=0)[0.1]
    encoder = random_encoder(0)
    x = {"train": extract_features(encoder, data["train"].images[idx]),
         "val": extract_features(encoder, data["val"].images), "test": extract_features(encoder, data["test"].images)}
    y = {"train": data["train"].labels[idx], "val": data["val"].labels, "test": data["test"].labels}
    return x, y


def test_probe_picks_c_on_validation_and_reports_sklearns_test_auc(pneumonia_features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = pneumonia_features
    assert len(y["train"]) == 470 and set(np.unique(y["train"])) == {0, 1}
    r = probe(x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], "binary", seed=0)

    # The same protocol written with scikit-learn alone: standardise on the labelled subset, one model per
    # C, keep the best validation AUC, report its test AUC and accuracy.
    fitted = {c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x["train"], y["train"])
              for c in C_GRID}
    val_auc = {c: roc_auc_score(y["val"], m.predict_proba(x["val"])[:, 1]) for c, m in fitted.items()}
    best = max(C_GRID, key=lambda c: val_auc[c])
    assert r["C"] == best
    assert r["val_auc"] == pytest.approx(val_auc, abs=1e-6)
    assert r["auc"] == pytest.approx(roc_auc_score(y["test"], fitted[best].predict_proba(x["test"])[:, 1]), abs=1e-6)
    assert r["auc"] == pytest.approx(roc_auc_score(y["test"], r["test_scores"]), abs=1e-12)
    assert r["acc"] == pytest.approx(accuracy_score(y["test"], fitted[best].predict(x["test"])), abs=1e-9)
    # Even untrained convolutions separate pneumonia from normal lungs: a real signal, not chance.
    assert r["auc"] > 0.62 and r["acc"] > 0.6
    # Labels shuffled away from the images: the same probe falls to chance.
    shuffled = np.random.default_rng(0).permutation(y["train"])
    chance = probe(x["train"], shuffled, x["val"], y["val"], x["test"], y["test"], "binary", seed=0)
    assert abs(chance["auc"] - 0.5) < 0.1 and chance["auc"] < r["auc"] - 0.1


def test_probe_refuses_what_it_cannot_score(pneumonia_features):
    x, y = pneumonia_features
    with pytest.raises(ValueError, match="single class"):
        probe(x["train"], np.zeros_like(y["train"]), x["val"], y["val"], x["test"], y["test"], "binary")
    with pytest.raises(ValueError, match="multilabel"):
        probe(x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], "multilabel")
