"""How much of a task frozen features already hold: a linear probe and a k-nearest-neighbour vote.

Both take features of a training set and of a held-out set (rows: samples) with integer class labels. The linear
probe is multinomial logistic regression on standardized features (statistics from the training set), fitted to
convergence with L-BFGS and a small L2 penalty, as probes of self-supervised encoders are; k-NN votes among the k
most cosine-similar training samples, each vote weighted by exp(similarity / temperature) (the weighted k-NN of
InstDisc / DINO). Hand-written rather than scikit-learn's: torch is already here, and both are a few lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caries_mim.errors import InvalidArgumentError


def _check(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor) -> int:
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise InvalidArgumentError(f"features must be (M, D) with one D, got {tuple(train.shape)}, {tuple(test.shape)}")
    if train_labels.shape != (train.shape[0],) or test_labels.shape != (test.shape[0],):
        raise InvalidArgumentError("one label per feature row is needed")
    if train.shape[0] < 2 or test.shape[0] < 1:
        raise InvalidArgumentError(f"need >= 2 training and >= 1 test samples, got {train.shape[0]}, {test.shape[0]}")
    return int(max(train_labels.max(), test_labels.max())) + 1


def linear_probe_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    iterations: int = 200,
) -> float:
    """Held-out accuracy in [0, 1] of a logistic regression fitted on (``train``, ``train_labels``)."""
    classes = _check(train, train_labels, test, test_labels)
    train, test = train.double(), test.double()
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(train.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    with torch.no_grad():
        predicted = (test @ weight + bias).argmax(dim=1)
    return float((predicted == test_labels).double().mean())


def knn_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Held-out accuracy in [0, 1] of a similarity-weighted vote of the ``k`` nearest training samples (cosine)."""
    classes = _check(train, train_labels, test, test_labels)
    k = min(k, train.shape[0])
    similarity = F.normalize(test.double(), dim=1) @ F.normalize(train.double(), dim=1).T  # (M_test, M_train)
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(test.shape[0], classes, dtype=torch.float64)
    votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
    return float((votes.argmax(dim=1) == test_labels).double().mean())
