"""Linear-SVM evaluation of a learned feature space (Becher & Ponti: no kernel, C = 1)."""

from __future__ import annotations

import warnings

import numpy as np


def svm_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy (%) of ``LinearSVC(C=1)`` trained on the features as they are.

    Non-finite features (a diverged network) become 0, so a collapsed feature space gives
    a constant prediction (chance accuracy) instead of an error. Features far beyond the
    scale of a healthy network (> 1e3, only after divergence) are divided by one global
    factor so that liblinear stays numerically sane; per-feature standardization is not
    used, as it inflates nearly dead units and slows liblinear down ~40x.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    train_x = np.nan_to_num(train_x, nan=0.0, posinf=0.0, neginf=0.0)
    test_x = np.nan_to_num(test_x, nan=0.0, posinf=0.0, neginf=0.0)
    if np.ptp(train_x, axis=0).max(initial=0.0) == 0.0:
        # every feature constant: an SVM can only predict the majority class
        majority = np.bincount(train_y).argmax()
        return 100.0 * float(np.mean(test_y == majority))
    scale = np.abs(train_x).max()
    if scale > 1e3:
        train_x, test_x = train_x / scale, test_x / scale
    clf = LinearSVC(C=1.0, dual=False, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
    return 100.0 * float(np.mean(clf.predict(test_x) == test_y))
