"""The figures of the final report (runs/<study-name>/figures/*.png), drawn after the final
model is tested: search history, importances, slices, training curves, the confusion matrix,
and for studies that augment, the same images at increasing strength."""

from __future__ import annotations

from search import augment
from search.report import plots


def write_figures(outcome) -> None:
    """Draw the report's figures into <run dir>/figures/ and note them in outcome.figures."""
    folder = outcome.directory / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    importance_fig, outcome.importances = plots.param_importances(outcome.study)
    figures = {
        "history": plots.optimization_history(outcome.study),
        "importances": importance_fig,
        "slices": plots.param_slices(outcome.study, outcome.best_trial),
        "curves": plots.training_curves(outcome.results),
        "confusion": plots.confusion(outcome.test["confusion_matrix"],
                                     list(outcome.dataset.classes)),
    }
    if outcome.spec.augments:
        figures["augment"] = _augment_grid(outcome)
    for key, fig in figures.items():
        if fig is not None:
            path = folder / f"{key}.png"
            plots.save(fig, path)
            outcome.figures[key] = path


def _augment_grid(outcome):
    """The first training image of each class at strengths 0, 0.5, 1 and the best's."""
    train = outcome.dataset.train
    firsts = [int((train.y == c).nonzero()[0]) for c in range(len(outcome.dataset.classes))
              if bool((train.y == c).any())]
    images = train.x[firsts]
    best = outcome.results["best found"].params.augment
    families = best.families or augment.FAMILIES
    strengths = [0.0, 0.5, 1.0, best.strength]
    labels = ["strength 0", "strength 0.5", "strength 1", f"best ({best.strength:g})"]
    grids = augment.grid_images(images, strengths, families)
    shown = ", ".join(families) + ("" if best.families else " (the best found uses none)")
    outcome.augment_caption = (
        f"The same training images (the first of each class) with families {shown}, at "
        f"strength 0 (as trained without augmentation), 0.5, 1 and the best found's "
        f"{best.strength:g}")
    return plots.image_grid(list(zip(labels, grids, strict=True)),
                            "Augmentation at increasing strength")
