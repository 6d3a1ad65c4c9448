"""Fit a linear head to convergence on cached features: multinomial logistic regression by
full-batch L-BFGS, with scikit-learn's L2 convention (``C``: inverse regularisation)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def linear_layer(head: nn.Module) -> nn.Linear | None:
    """The head's only Linear layer, or None when the head is more than a linear classifier
    (an MLP; an embedding's projection, BatchNorm and class centres)."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 1 or len(list(head.parameters())) != len(list(layers[0].parameters())):
        return None
    return layers[0]


def fit_logistic_regression(
    layer: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    C: float = 1.0,
    max_iter: int = 500,
) -> float:
    """Set ``layer`` to the minimiser of mean cross-entropy + ||W||^2 / (2 C n); return the loss.

    The same objective as ``sklearn.linear_model.LogisticRegression(C=C)`` (bias unpenalised).
    """
    features = features.to(layer.weight.device, layer.weight.dtype)
    labels = labels.to(layer.weight.device)
    weight = layer.weight.detach().clone().zero_().requires_grad_(True)
    bias = layer.bias.detach().clone().zero_().requires_grad_(True)
    l2 = 1.0 / (2.0 * C * len(features))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
        loss = float(objective().detach())
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return loss
