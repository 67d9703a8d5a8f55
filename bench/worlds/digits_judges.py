"""Classifiers for the digits world: the reward judge and a held-out judge of another model class."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn is imported when a judge is fitted: listing the worlds must not load it (1 s)
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC


def fit_judge(x: np.ndarray, y: np.ndarray) -> MLPClassifier:
    """The reward judge: an MLP trained on real digits only (split A)."""
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, random_state=0).fit(x, y)


def fit_heldout_judge(x: np.ndarray, y: np.ndarray) -> SVC:
    """The held-out judge: an RBF SVM on a disjoint split (B); never used as a reward."""
    from sklearn.svm import SVC

    return SVC(C=5.0, gamma="scale").fit(x, y)
