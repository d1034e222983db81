"""Test-set metrics shared by the final report and `python -m search.evaluate`.

Both print through these functions, so the report and the evaluate command show the same
numbers for the same model and data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def compute(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "n_test": int(len(y_true)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def report_text(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> str:
    """sklearn's per-class classification report, 4 digits."""
    return classification_report(y_true, y_pred, labels=list(range(len(classes))),
                                 target_names=list(classes), digits=4, zero_division=0)


def accuracy_line(metrics: dict) -> str:
    """The one line both the report and `search.evaluate` print for a model's test score."""
    return (f"test accuracy {metrics['accuracy']:.4f} "
            f"({round(metrics['accuracy'] * metrics['n_test'])}/{metrics['n_test']}), "
            f"macro F1 {metrics['macro_f1']:.4f}")
