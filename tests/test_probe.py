"""The L-BFGS probe solves the same problem as scikit-learn's logistic regression."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from transferlab.finetune.probe import fit_logistic_regression, linear_layer


def test_matches_scikit_learn_logistic_regression():
    generator = np.random.default_rng(0)
    centers = generator.normal(size=(4, 24)) * 1.5
    labels = generator.integers(0, 4, size=300)
    features = centers[labels] + generator.normal(size=(300, 24))
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(features, labels)

    layer = nn.Linear(24, 4)
    fit_logistic_regression(
        layer,
        torch.tensor(features, dtype=torch.float32),
        torch.tensor(labels),
        C=0.5,
    )
    with torch.no_grad():
        probs = layer(torch.tensor(features, dtype=torch.float32)).softmax(1).numpy()
    np.testing.assert_allclose(probs, reference.predict_proba(features), atol=2e-3)
    # scikit-learn's multinomial weights are defined up to a per-feature shift across classes.
    ours = layer.weight.detach().numpy()
    np.testing.assert_allclose(
        ours - ours.mean(0), reference.coef_ - reference.coef_.mean(0), atol=5e-3
    )


def test_linear_layer_finds_the_head_layer_or_none():
    assert isinstance(linear_layer(nn.Sequential(nn.Dropout(0.1), nn.Linear(3, 2))), nn.Linear)
    assert linear_layer(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) is None
    assert linear_layer(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))) is None  # embedding
