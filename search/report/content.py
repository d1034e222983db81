"""What the final report says, as blocks for `search.report.render` (md and html)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from datetime import timedelta

import optuna

from search import augment, costs
from search import metrics as metrics_module
from search.report import sections as report_sections
from search.report.render import Block, Code, Heading, Image, Table, Text

# a best value within this share of its range (on the sampled scale) is "on the boundary"
BOUNDARY_SHARE = 0.05
_D = optuna.distributions


def describe_distribution(distribution) -> str:
    if isinstance(distribution, _D.CategoricalDistribution):
        return "one of " + ", ".join(str(c) for c in distribution.choices)
    kind = "int" if isinstance(distribution, _D.IntDistribution) else "float"
    scale = ", log scale" if distribution.log else ""
    return f"{kind} in [{distribution.low:g}, {distribution.high:g}]{scale}"


def _images_read(images: dict) -> str:
    """How your own images were read (search.data: Dataset.images), in one cell."""
    height, width = images["size"]
    return (f"{'a folder' if images['kind'] == 'folder' else 'an .npz file'} "
            f"({images['path']}): {images['channels']} channel(s), {width} x {height} px "
            f"(Pillow {images['filter']} resize where needed), test split: "
            f"{images['test_split']}" + ("; unreadable images skipped" if images.get(
                "skip_bad") else ""))


def boundary(value, distribution) -> str | None:
    """'lower' or 'upper' when a numeric value sits within BOUNDARY_SHARE of that end."""
    if isinstance(distribution, _D.CategoricalDistribution):
        return None
    low, high = float(distribution.low), float(distribution.high)
    if high <= low:
        return None
    if distribution.log:
        low, high, value = math.log(low), math.log(high), math.log(float(value))
    position = (float(value) - low) / (high - low)
    if position <= BOUNDARY_SHARE:
        return "lower"
    if position >= 1 - BOUNDARY_SHARE:
        return "upper"
    return None


def search_space(study: optuna.Study) -> dict:
    space: dict = {}
    for trial in study.get_trials(deepcopy=False):
        space.update(trial.distributions)
    return dict(sorted(space.items()))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _channels(values) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def _mean_sd(stats: dict, digits: int = 4) -> str:
    n = len(stats["values"])
    if n == 0:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}" if n > 1 else (
        f"{stats['mean']:.{digits}f}")


def _flat(params) -> dict:
    """A params dataclass as flat fields; nested ones (augment) as augment.strength, ..."""
    flat = {}
    for key, value in dataclasses.asdict(params).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def param_changes(reference, best) -> list[str]:
    ref, new = _flat(reference), _flat(best)
    return [f"{k} {_fmt(ref[k])} → {_fmt(new[k])}" for k in new if ref.get(k) != new[k]]


def _time_spent(study: optuna.Study) -> str:
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.datetime_start and t.datetime_complete]
    if not trials:
        return "-"
    busy = sum(((t.datetime_complete - t.datetime_start) for t in trials), timedelta())
    wall = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return (f"{busy.total_seconds():.0f} s of training in trials, "
            f"{wall.total_seconds():.0f} s from first trial start to last trial end")


def mixed_settings(study: optuna.Study, best_trial) -> list[Block]:
    """A table of the settings trials ran with, when runs of this study used several
    (resumed with other --epochs, --batch-size, --sampler, --pruner or --seed)."""
    groups: dict[str, list[int]] = {}
    for trial in study.get_trials(deepcopy=False):
        if "settings" in trial.user_attrs:
            key = json.dumps(trial.user_attrs["settings"], sort_keys=True)
            groups.setdefault(key, []).append(trial.number)
    if len(groups) < 2:
        return []
    names = list(json.loads(next(iter(groups))))
    rows = [[*(_fmt(json.loads(key).get(n, "?")) for n in names), str(len(numbers)),
             f"{numbers[0]}-{numbers[-1]}"] for key, numbers in groups.items()]
    best = best_trial.user_attrs.get("settings", {})
    return [Text("**Mixed settings.** Runs of this study used different settings, so trials "
                 "are not all comparable; the final retrain used the best trial's own ("
                 + ", ".join(f"{k} {v}" for k, v in best.items()) + ")."),
            Table([*names, "trials", "numbers"], rows)]


def build(outcome) -> list[Block]:
    study, ds, results = outcome.study, outcome.dataset, outcome.results
    best_trial, test = outcome.best_trial, outcome.test
    best_summary = results[outcome.saved].summary()
    blocks: list[Block] = [Heading(f"Study {study.study_name}", 1)]
    if outcome.weights is not None and outcome.weights.kind == "none":
        blocks.append(Text(report_sections.RANDOM_WEIGHTS))
    compare = ", ".join(
        f"{label} {results[label].summary()['test_accuracy']['mean']:.4f}"
        for label in results if label != outcome.saved and results[label].runs)
    found = ("Best found" if len(study.directions) == 1
             else f"Trial {best_trial.number} of the Pareto front")
    title = found if outcome.saved == "best found" else (
        f"Saved model: the {outcome.saved}, which scored higher on validation than the best "
        f"found ({results[outcome.saved].best_run().val_accuracy:.4f} against "
        f"{results['best found'].best_run().val_accuracy:.4f} at their best seeds)"
        if results["best found"].runs else f"Saved model: the {outcome.saved}")
    blocks.append(Text(
        f"**{title}: {metrics_module.accuracy_line(test)}** (the saved model, reloaded from "
        f"model.pt + model.json). Mean over {len(best_summary['seeds'])} retrain seeds: "
        f"{_mean_sd(best_summary['test_accuracy'])}" + (f"; {compare}." if compare else ".")))

    blocks += [Heading("Data"), Table(["", ""], [
        ["dataset", f"{ds.name} (from {ds.source})"],
        ["splits", f"{len(ds.train)} train / {len(ds.val)} validation (fixed, seeded, "
                   f"stratified) / {len(ds.test)} test (final evaluation only)"],
        ["input", f"{'x'.join(map(str, ds.image_shape))} images, pixels / 255, then "
                  + (f"{'repeated to 3 channels, ' if ds.image_shape[0] == 1 else ''}resized "
                     f"to {outcome.options['input_size']} px "
                     "and normalized with ImageNet's mean and std inside the model (below)"
                     if outcome.weights is not None else
                     f"normalized inside the model with the training split's own statistics: "
                     f"mean {_channels(ds.channel_mean)}, std {_channels(ds.channel_std)} "
                     "(validation and test images never enter them)")],
        ["classes", ", ".join(ds.classes)],
        *([["read from", _images_read(ds.images)]] if ds.images else []),
    ])]
    blocks += [Text(f"Note: {note}") for note in ds.notes]

    applied = outcome.model_info["input"].get("applied")
    if outcome.weights is not None:
        blocks += report_sections.backbone_input_blocks(outcome)
    elif applied and [round(v, 6) for v in applied["mean"]] != [
            round(v, 6) for v in ds.channel_mean]:
        blocks.append(Text(
            f"The best found normalizes with fixed constants instead (mean "
            f"{_channels(applied['mean'])}, std {_channels(applied['std'])}, PyTorch's MNIST "
            "example values)."))
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    config = study.user_attrs.get("config", {})
    speeds = Counter(t.user_attrs["speed"] for t in study.get_trials(deepcopy=False)
                     if "speed" in t.user_attrs)
    blocks += [
        Heading("Search"),
        Text(f"{sum(states.values())} trials: "
             + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
             + f". Sampler {config.get('sampler', '?')}, pruner {config.get('pruner', '?')}, "
             f"{config.get('epochs', '?')} epochs per trial (as the study was started), "
             "objective: best validation accuracy over a trial's epochs. Time: "
             f"{_time_spent(study)}."
             + (" Training precision and layout: " + ", ".join(
                 f"{speed} ({n} trials)" for speed, n in speeds.most_common()) + "."
                if speeds else "")),
        Table(["parameter", "searched over"],
              [[name, describe_distribution(d)] for name, d in search_space(study).items()]),
    ]
    blocks += mixed_settings(study, best_trial)
    failures = Counter(t.user_attrs["failure"].split(" in epoch")[0]
                       for t in study.get_trials(deepcopy=False) if "failure" in t.user_attrs)
    if failures:
        blocks.append(Text("Trials stopped by a failure: " + "; ".join(
            f"{n}x {why}" for why, n in failures.most_common())))

    blocks.append(Heading("Best parameters"))
    rows, on_edge = [], []
    for name, value in best_trial.params.items():
        distribution = best_trial.distributions[name]
        edge = boundary(value, distribution)
        if edge:
            on_edge.append(f"{name} ({edge} end)")
        rows.append([name, _fmt(value), describe_distribution(distribution),
                     f"**{edge} end**" if edge else ""])
    blocks.append(Text(f"Trial {best_trial.number}, validation accuracy "
                       f"{best_trial.values[0]:.4f}."))
    blocks.append(Table(["parameter", "best", "range", "on boundary"], rows))
    blocks.append(Text(
        "On the boundary of its range: " + ", ".join(on_edge) + ". The optimum may lie "
        "outside the space; widen these ranges in a new space version." if on_edge else
        "No numeric parameter sits on the boundary of its range (within 5% of it)."))

    blocks += _comparison(outcome)
    blocks += report_sections.other_studies_blocks(outcome)
    if outcome.weights is not None:
        blocks += report_sections.transfer_blocks(outcome)
    if outcome.spec.augments:
        blocks += report_sections.augmentation_blocks(outcome, augment.COPIES)
    blocks += _final_model(outcome)
    blocks += _figures(outcome)
    onnx = outcome.onnx
    blocks += [
        Heading("Files"),
        Table(["file", "what"], [
            ["model.pt", f"state_dict only, sha256 `{outcome.model_info['sha256']}`"],
            ["model.json", "architecture params, data, normalization, classes, metrics, "
                           "versions"],
            ["model.onnx", f"input `image` float [N, {', '.join(map(str, ds.image_shape))}] "
                           f"in [0, 1]; onnxruntime {onnx['onnxruntime']} agrees on "
                           f"{onnx['images']} test images (same predictions, max |diff| "
                           f"{onnx['max_abs_diff']:.1e} ≤ {onnx['atol']:.0e})"],
            ["metrics.json", "test accuracy, macro F1, per-class precision/recall/F1"],
        ]),
        Heading("Reproduce"),
        Code(outcome.command),
        Table(["library", "version"], [[k, v] for k, v in outcome.model_info["versions"].items()]),
    ]
    return blocks


def _comparison(outcome) -> list[Block]:
    results = outcome.results
    rows = []
    for label, result in results.items():
        if not result.runs:
            rows.append([label, _fmt(result.params), str(result.n_parameters), "-", "-", "-",
                         "-", "-", "-", "all seeds diverged"])
            continue
        s = result.summary()
        rows.append([label, outcome.spec.describe(result.params),
                     f"{s['n_parameters']:,}", f"{outcome.config_costs[label].macs:,}",
                     _mean_sd(s["val_accuracy"]),
                     _mean_sd(s["test_accuracy"]), _mean_sd(s["macro_f1"]),
                     ", ".join(f"{b}/{n}" for b, n in zip(s["best_epochs"],
                                                          s["epochs_trained"], strict=True)),
                     f"{s['seconds_per_epoch']:.2f}", "; ".join(s["failures"])])
    references = ", ".join(label for label in results if label != "best found")
    schedule = outcome.schedule
    stop = (f", stopped after {schedule['patience']} epochs without a better validation "
            "accuracy" if schedule.get("patience") else "")
    blocks: list[Block] = [
        Heading("Reference configs and best found"),
        Text(f"The {references} and the best found, each retrained with the same seeds on "
             f"the training split for up to {schedule.get('max_epochs', '?')} epochs (the "
             f"search's trials ran {schedule.get('trial_epochs', '?')}){stop}, keeping the "
             "best validation epoch; test scores are mean ± standard deviation over seeds."),
        Table(["config", "architecture and training", "parameters", "multiply-adds / image",
               "val accuracy",
               "test accuracy", "macro F1", "best epoch / trained", "s/epoch", "notes"], rows),
    ]
    # each step the exercise took from the lecture's config, then each reference to the best
    labels = [label for label in results if label != "best found"]
    steps = [(labels[0], later) for later in labels[1:]] + [(label, "best found")
                                                             for label in labels]
    for start, end in steps:
        before, after = results[start], results[end]
        if not before.runs or not after.runs:
            continue
        delta = (after.summary()["test_accuracy"]["mean"]
                 - before.summary()["test_accuracy"]["mean"]) * 100
        changes = param_changes(before.params, after.params)
        blocks.append(Text(
            f"**From the {start} to the {end}** ({', '.join(changes) or 'no change'}): "
            f"test accuracy {delta:+.2f} points"))
    return blocks


def _final_model(outcome) -> list[Block]:
    test, classes = outcome.test, outcome.dataset.classes
    rows = [[name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
             str(m["support"])] for name, m in test["per_class"].items()]
    blocks: list[Block] = [
        Heading("Final model on the test set"),
        Text(f"Computed by a new model instance loaded from model.pt and model.json; its "
             f"predictions equal the in-memory model's on all {test['n_test']} test images. "
             f"{metrics_module.accuracy_line(test)}."),
        Text(f"Costs: {costs.Costs(**outcome.model_info['costs']).describe()}; latency of "
             f"model.onnx: {costs.describe_latency(outcome.onnx['latency'])}."),
        Table(["class", "precision", "recall", "F1", "support"], rows),
        Code(outcome.report_text),
    ]
    if "confusion" in outcome.figures:
        blocks.append(Image(outcome.figures["confusion"], "Confusion matrix"))
    worst = sorted(test["per_class"].items(), key=lambda kv: kv[1]["f1"])[:2]
    if len(classes) > 2:
        blocks.append(Text("Weakest classes by F1: " + ", ".join(
            f"{name} ({m['f1']:.3f})" for name, m in worst) + "."))
    return blocks


def _figures(outcome) -> list[Block]:
    captions = {
        "history": "Optimization history (validation accuracy per trial)",
        "importances": "Parameter importances (fANOVA)",
        "slices": "Each tuned parameter against validation accuracy",
        "curves": "Training curves of the final retrain",
    }
    blocks: list[Block] = [Heading("Search figures")]
    for key, caption in captions.items():
        if key in outcome.figures:
            blocks.append(Image(outcome.figures[key], caption))
        else:
            blocks.append(Text(f"{caption}: not enough completed trials to draw."))
    if outcome.importances:
        blocks.append(Table(["parameter", "importance"],
                            [[k, f"{v:.3f}"] for k, v in outcome.importances.items()]))
    return blocks
