"""What optuna-dashboard shows of a finished study: its final files as Optuna artifacts of the
study, the `final` user attribute, and the study note."""

from __future__ import annotations

import storage
from search import metrics as metrics_module
from search.report import sections as report_sections

MIMETYPES = {".pt": "application/octet-stream", ".onnx": "application/octet-stream",
             ".json": "application/json", ".md": "text/markdown", ".html": "text/html",
             ".png": "image/png"}


def attach(outcome, opened, cfg) -> None:
    """Upload the files as Optuna artifacts and write the study note.

    They are artifacts of the study, not of the best trial: Optuna refuses to change a
    finished trial (UpdateFinishedTrialError), and the best trial is finished before the
    final retrain starts. The note and the user attribute `final` name the trial. A final
    step run again writes its files over the artifacts of the last one of the same names.
    """
    from optuna_dashboard import save_note

    names = ["model.pt", "model.json", "model.onnx", "metrics.json", "report.md",
             "report.html", *[f"figures/{p.name}" for p in outcome.figures.values()]]
    uploaded = _upload(outcome.study, opened, cfg, outcome.directory, names)
    outcome.study.set_user_attr("final", {
        "trial": outcome.best_trial.number if outcome.saved == "best found" else None,
        "config": outcome.saved, "directory": str(outcome.directory),
        "test_accuracy": outcome.test["accuracy"], "macro_f1": outcome.test["macro_f1"],
        "n_parameters": outcome.results[outcome.saved].n_parameters,
        "n_parameters_total": outcome.model_info["n_parameters_total"],
        "macs": outcome.config_costs[outcome.saved].macs,
        **({"weights": outcome.weights.describe()} if outcome.weights else {}),
        "artifacts": uploaded})
    rows = [f"| {label} | {r.summary()['test_accuracy']['mean']:.4f} | "
            f"{r.summary()['n_parameters']:,} |" for label, r in outcome.results.items()
            if r.runs]
    banner = ([report_sections.RANDOM_WEIGHTS, ""]
              if outcome.weights is not None and outcome.weights.kind == "none" else [])
    note = "\n".join([
        *banner,
        f"## Final model: {outcome.saved_title()}",
        "",
        f"**{metrics_module.accuracy_line(outcome.test)}**, from the model reloaded from "
        f"`{outcome.directory / 'model.pt'}`.",
        "",
        "| config | test accuracy (mean over seeds) | parameters |",
        "|---|---|---|",
        *rows,
        "",
        f"Files (study artifacts, below): {', '.join(names[:6])} and the figures. "
        f"Report: `{outcome.directory / 'report.html'}`.",
    ])
    save_note(outcome.study, note)


def _upload(study, opened, cfg, directory, names: list[str]) -> dict[str, str]:
    """Upload directory/<name> for each of `names` as artifacts of `study`; their ids by
    name. A final step run again replaces the files of the last one in place (same
    artifact, new bytes) instead of storing every model again (a vgg16 one is hundreds of
    MB)."""
    from optuna.artifacts import get_all_artifact_meta, upload_artifact

    store = storage.artifact_store(cfg.storage, cfg.artifact_dir)
    before = study.user_attrs.get("final", {}).get("artifacts", {})
    held = {meta.artifact_id: meta.filename
            for meta in get_all_artifact_meta(study, storage=opened)}
    uploaded = {}
    for name in names:
        path = directory / name
        previous = before.get(name)
        if held.get(previous) == path.name:
            with open(path, "rb") as content:
                store.write(previous, content)
            uploaded[name] = previous
            continue
        uploaded[name] = upload_artifact(
            artifact_store=store, file_path=str(path), study_or_trial=study,
            storage=opened, mimetype=MIMETYPES.get(path.suffix, "application/octet-stream"))
    return uploaded


def attach_front(outcomes: list, directory, opened, cfg) -> None:
    """A Pareto search's final files as artifacts of the study (the front's report and
    figure, each front model's ONNX file and model.json), the user attribute `final` (the
    most accurate front model's scores, for other studies' reports, and every front
    model's) and the study note: a table of the front models."""
    from optuna_dashboard import save_note

    study, lead = outcomes[-1].study, outcomes[-1]
    names = ["report.md", "report.html", "figures/front.png"]
    for outcome in outcomes:
        names += [f"{outcome.directory.name}/{file}" for file in ("model.json", "model.onnx")]
    uploaded = _upload(study, opened, cfg, directory, names)
    front = [{"trial": o.best_trial.number, "directory": str(o.directory),
              "test_accuracy": o.test["accuracy"], "macro_f1": o.test["macro_f1"],
              "n_parameters": o.config_costs["best found"].params,
              "macs": o.config_costs["best found"].macs} for o in outcomes]
    study.set_user_attr("final", {**front[-1], "config": "best found",
                                  "directory": str(directory), "front": front,
                                  "artifacts": uploaded})
    rows = [f"| trial {f['trial']} | {f['test_accuracy']:.4f} | {f['n_parameters']:,} | "
            f"{f['macs']:,} | `{f['directory']}` |" for f in front]
    save_note(study, "\n".join([
        f"## Pareto front: {len(outcomes)} models retrained and saved",
        "",
        "| trial | test accuracy (saved model) | parameters | multiply-adds per image | "
        "folder |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Report: `{directory / 'report.html'}`; each folder holds its model's own report.",
        f"The most accurate: trial {lead.best_trial.number}, "
        f"{metrics_module.accuracy_line(lead.test)}.",
    ]))
