"""Figures of the final report (runs/<study-name>/figures/*.png), drawn with matplotlib.

Each function returns a Figure, or None when the study has too little to draw (fewer than
two completed trials for importances, say); the report says so instead of showing nothing.
"""

from __future__ import annotations

import logging
import math

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training server

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from search.study import last_value  # noqa: E402

log = logging.getLogger(__name__)
Complete, Pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


def optimization_history(study: optuna.Study) -> Figure | None:
    trials = study.get_trials(deepcopy=False, states=(Complete, Pruned))
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    done = [t for t in trials if t.state == Complete]
    pruned = [t for t in trials if t.state == Pruned and last_value(t) is not None]
    ax.scatter([t.number for t in done], [t.values[0] for t in done], s=18, label="complete")
    ax.scatter([t.number for t in pruned], [last_value(t) for t in pruned], s=18, marker="x",
               color="0.6", label="pruned (last epoch reached)")
    best, line = -math.inf, []
    for t in sorted(done, key=lambda t: t.number):
        best = max(best, t.values[0])
        line.append((t.number, best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Optimization history")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def param_importances(study: optuna.Study) -> tuple[Figure | None, dict]:
    """fANOVA importances (seeded) for validation accuracy (a Pareto search's first
    objective) and their figure; ({}, None) when they cannot be computed."""
    accuracy = None if len(study.directions) == 1 else (lambda t: t.values[0])
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=accuracy)
    except (ValueError, RuntimeError) as exc:
        log.info("no parameter importances: %s", exc)
        return None, {}
    if not importances:
        return None, {}
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance for validation accuracy (fANOVA)")
    ax.set_title("Parameter importances")
    fig.tight_layout()
    return fig, dict(importances)


def param_slices(study: optuna.Study, marked: optuna.trial.FrozenTrial) -> Figure | None:
    """Each tuned parameter against validation accuracy, one panel per parameter, the
    trial `marked` (the one retrained) circled."""
    trials = study.get_trials(deepcopy=False, states=(Complete,))
    names = sorted({name for t in trials for name in t.params})
    if not trials or not names:
        return None
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, name in zip(axes.flat, names, strict=False):
        have = [t for t in trials if name in t.params]
        distribution = have[0].distributions[name]
        values = [t.params[name] for t in have]
        scores = [t.values[0] for t in have]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            choices = list(distribution.choices)
            x = [choices.index(v) + rng.uniform(-0.15, 0.15) for v in values]
            ax.set_xticks(range(len(choices)), [str(c) for c in choices], rotation=30,
                          fontsize=7)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            x = values
            low, high = distribution.low, distribution.high
            if distribution.log:
                ax.set_xscale("log")
                ax.set_xlim(low / 1.15, high * 1.15)
            else:
                pad = 0.04 * (high - low) or 0.5
                ax.set_xlim(low - pad, high + pad)
        ax.scatter(x, scores, s=14, alpha=0.8)
        for trial, trial_x in zip(have, x, strict=True):
            if trial.number == marked.number:
                ax.scatter([trial_x], [trial.values[0]], s=60, facecolors="none", edgecolors="C3")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("val accuracy", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Each tuned parameter against validation accuracy (x axis: its whole "
                 f"range; red circle: trial {marked.number}, retrained)", fontsize=10)
    fig.tight_layout()
    return fig


def training_curves(results: dict) -> Figure | None:
    """Validation accuracy and training loss per epoch of every final retrain seed."""
    if not any(r.runs for r in results.values()):
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for color, (label, result) in zip(("C3", "C0", "C2", "C1"), results.items(), strict=False):
        for i, run in enumerate(result.runs):
            epochs = [r.epoch for r in run.history]
            tag = label if i == 0 else None
            acc_ax.plot(epochs, [r.val_accuracy for r in run.history], color=color, alpha=0.8,
                        label=tag)
            loss_ax.plot(epochs, [r.train_loss for r in run.history], color=color, alpha=0.8,
                         label=tag)
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy", title="Final retrain: validation")
    loss_ax.set(xlabel="epoch", ylabel="training loss",
                title="Final retrain: training loss (each config's own loss)")
    loss_ax.set_yscale("log")
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion(matrix: list[list[int]], classes: list[str]) -> Figure:
    counts = np.asarray(matrix)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, classes, fontsize=8)
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split, reloaded model)")
    fig.tight_layout()
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(rows: list[tuple[str, np.ndarray]], title: str) -> Figure:
    """One row of images per (label, uint8 [N, C, H, W] array), the same images in each."""
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n + 1.4, 1.0 * len(rows) + 0.5),
                             squeeze=False)
    for (label, images), row in zip(rows, axes, strict=True):
        for image, ax in zip(images, row, strict=True):
            ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0),
                      cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pareto_front(study: optuna.Study, index: int, cost_label: str,
                 points: list[dict]) -> Figure:
    """A Pareto search on two panels with the same cost axis (log scale; the study's
    objective `index`, a cost): left, the
    validation accuracy of every completed trial, the front drawn as a step line and the
    retrained trials circled; right, the test accuracy of the retrained models and of
    `points` given (each {"label", "cost", "mean", "std", "kind"}: "front", "reference" or
    "other study"), the mean over seeds with its standard deviation as an error bar."""
    done = study.get_trials(deepcopy=False, states=(Complete,))
    front = sorted(study.best_trials, key=lambda t: t.values[index])
    fig, (search_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    search_ax.scatter([t.values[index] for t in done], [t.values[0] for t in done], s=14,
                      color="0.6", label="complete trials")
    search_ax.step([t.values[index] for t in front], [t.values[0] for t in front],
                   where="post", color="C3", label="Pareto front")
    retrained = [p for p in points if p["kind"] == "front"]
    by_number = {t.number: t for t in done}
    shown = [by_number[p["trial"]] for p in retrained if p.get("trial") in by_number]
    search_ax.scatter([t.values[index] for t in shown], [t.values[0] for t in shown], s=70,
                      facecolors="none", edgecolors="C3", label="retrained")
    search_ax.set(xscale="log", xlabel=cost_label, ylabel="validation accuracy",
                  title="Search: every completed trial")
    search_ax.legend(fontsize=8, loc="lower right")
    styles = {"front": ("o", "C3"), "reference": ("s", "C0"), "other study": ("^", "C2")}
    for kind, (marker, color) in styles.items():
        these = [p for p in points if p["kind"] == kind and p["cost"]]
        if not these:
            continue
        test_ax.errorbar([p["cost"] for p in these], [p["mean"] for p in these],
                         yerr=[p["std"] for p in these], fmt=marker, color=color, capsize=3,
                         label=kind)
        for p in these:
            test_ax.annotate(p["label"], (p["cost"], p["mean"]), textcoords="offset points",
                             xytext=(4, -10), fontsize=7)
    test_ax.set(xscale="log", xlabel=cost_label, ylabel="test accuracy (mean ± sd over seeds)",
                title="Final: retrained models on the test split")
    test_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
