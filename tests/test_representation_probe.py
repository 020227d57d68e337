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


def test_neighbour_agreement_matches_sklearns_nearest_neighbours_and_beats_shuffled_labels(medmnist_dir, tmp_path):
    from sklearn.neighbors import NearestNeighbors

    from benchmarks.representation import draw_neighbours, neighbour_agreement

    torch.set_num_threads(2)
    data = load_npz(medmnist_dir / "breastmnist.npz")
    encoder = random_encoder(0)
    agree, nearest = neighbour_agreement(encoder, data, k=5, gallery_size=300, seed=0)
    assert nearest.shape == (len(data["test"].labels), 5)

    # The same neighbours found by scikit-learn (cosine distance, brute force) over the same seeded gallery.
    gallery = np.sort(np.random.default_rng(0).choice(len(data["train"].labels), 300, replace=False))
    g = extract_features(encoder, data["train"].images[gallery])
    q = extract_features(encoder, data["test"].images)
    ref = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute").fit(g).kneighbors(q, return_distance=False)
    assert np.mean(np.sort(gallery[ref], axis=1) == np.sort(nearest, axis=1)) > 0.99  # ties may swap
    expected = np.mean(data["train"].labels[gallery[ref]] == data["test"].labels[:, None])
    assert agree == pytest.approx(expected, abs=0.01)
    # Neighbours drawn blind to the image agree with the query's label at the rate sum_c p_gallery(c) p_test(c)
    # (about 0.6 here); neighbours in feature space do better.
    shares = np.bincount(data["train"].labels[gallery]) / 300
    test_shares = np.bincount(data["test"].labels, minlength=len(shares)) / len(data["test"].labels)
    assert agree > float(shares @ test_shares) + 0.02

    png = draw_neighbours(tmp_path / "n.png", "breastmnist", data, {"random": (agree, nearest)}, queries=2)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 150
