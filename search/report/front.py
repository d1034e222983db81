"""runs/<study-name>/report.md and report.html of a Pareto search (`--objectives`): the
front models side by side, the chart of test accuracy against cost, and a link to each
model's own report in its subfolder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from search.config import COST_OBJECTIVES
from search.costs import OBJECTIVE_FIELDS
from search.report import plots, render
from search.report.render import Block, Heading, Image, Table, Text


def _mean_sd(stats: dict) -> str:
    return (f"{stats['mean']:.4f} ± {stats['std']:.4f}" if len(stats["values"]) > 1
            else f"{stats['mean']:.4f}")


def chart_points(outcomes: list, cost: str) -> list[dict]:
    """The right panel's points: each front model and reference net (mean and sd over
    seeds of test accuracy) and the other studies' final models on the same data."""
    field = OBJECTIVE_FIELDS[cost]
    points = []
    for outcome in outcomes:
        s = outcome.results["best found"].summary()["test_accuracy"]
        points.append({"label": f"trial {outcome.best_trial.number}", "kind": "front",
                       "trial": outcome.best_trial.number, "mean": s["mean"], "std": s["std"],
                       "cost": getattr(outcome.config_costs["best found"], field)})
    lead = outcomes[-1]
    for label, result in lead.results.items():
        if label == "best found" or not result.runs:
            continue
        s = result.summary()["test_accuracy"]
        points.append({"label": label, "kind": "reference", "mean": s["mean"], "std": s["std"],
                       "cost": getattr(lead.config_costs[label], field)})
    # the other studies' counts are exact wherever they were made; a latency measured on
    # another run's machine and load would not compare, so they are left off that chart
    other_key = {"params": "n_parameters", "flops": "macs"}.get(cost)
    points += [{"label": other["study_name"], "kind": "other study",
                "mean": other["test_accuracy"], "std": 0.0, "cost": other.get(other_key)}
               for other in lead.other_studies
               if other_key and other.get("test_accuracy") is not None]
    return points


def build(outcomes: list, directory: Path, objectives: tuple[str, ...]) -> list[Block]:
    """The blocks of the front's report; draws its figure into directory/figures/."""
    lead = outcomes[-1]
    study = lead.study
    cost = objectives[0]
    points = chart_points(outcomes, cost)
    (directory / "figures").mkdir(parents=True, exist_ok=True)
    figure = directory / "figures" / "front.png"
    # the study's own names of its costs: a latency names its runtime there
    names = (study.metric_names or [None] + [COST_OBJECTIVES[c] for c in objectives])[1:]
    plots.save(plots.pareto_front(study, 1, names[0], points), figure)
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    seeds = len(lead.results["best found"].runs)
    blocks: list[Block] = [
        Heading(f"Study {study.study_name}: accuracy against " + " and ".join(names), 1),
        Text(f"{sum(states.values())} trials (" + ", ".join(
            f"{n} {s}" for s, n in sorted(states.items())) + f"); {len(study.best_trials)} "
             f"on the Pareto front. The final step retrained {len(outcomes)} of them, from the "
             f"cheapest to the most accurate, with {seeds} seed(s) each, and saved each in its "
             "own folder (model.pt, model.json, model.onnx and its full report)."),
        Image(figure, "Left: validation accuracy of every completed trial against "
                      f"{names[0]}, the front and the retrained trials. Right: "
                      "test accuracy of the retrained models (mean ± sd over seeds), the "
                      "reference nets and the other studies' final models on the same data."),
    ]
    timed = lead.config_costs["best found"].latency_ms is not None

    def cost_cells(c) -> list[str]:
        return [f"{c.params:,}", f"{c.macs:,}", *([f"{c.latency_ms:.3g}"] if timed else [])]

    rows = []
    for outcome in outcomes:
        s = outcome.results["best found"].summary()
        latency = outcome.onnx.get("latency", {})
        folder = outcome.directory.name
        rows.append([f"trial {outcome.best_trial.number}", f"`{folder}/`",
                     *cost_cells(outcome.config_costs["best found"]),
                     _mean_sd(s["val_accuracy"]), _mean_sd(s["test_accuracy"]),
                     f"{outcome.test['accuracy']:.4f}",
                     f"{latency.get('batch_1_ms_per_image', float('nan')):.3g}"])
    for label, result in lead.results.items():
        if label == "best found" or not result.runs:
            continue
        s = result.summary()
        rows.append([label, "-", *cost_cells(lead.config_costs[label]),
                     _mean_sd(s["val_accuracy"]), _mean_sd(s["test_accuracy"]), "-", "-"])
    blocks += [
        Heading("Front models and reference nets"),
        Table(["model", "folder", "parameters", "multiply-adds per image",
               *(["latency as searched, ms per image (batch 1)"] if timed else []),
               "validation accuracy", "test accuracy", "saved model, test",
               "ONNX ms per image (batch 1)"], rows),
        Text("Each saved model is the best validation seed of its retrain, reloaded from its "
             "files and scored on the test split; the test split chose nothing."
             + (f" The latencies as searched were measured one model after another, "
                f"each built anew with random weights ("
                f"{lead.config_costs['best found'].latency_on}); the saved model's ONNX "
                "latency is its own model.onnx in ONNX Runtime on every CPU core."
                if timed else "")),
    ]
    return blocks


def write(outcomes: list, directory: Path, objectives: tuple[str, ...]) -> None:
    """report.md and report.html of the front in `directory`, above the models' folders."""
    render.write(build(outcomes, directory, objectives), directory,
                 f"Study {outcomes[-1].study.study_name}: Pareto front")
