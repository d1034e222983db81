"""Report sections that depend on more than one study's own trials (`python -m search.run`
final step): other studies' final models on the same data, and what augmentation did.

`gather_*` read the study and its storage; `*_blocks` turn what they found into report
blocks for `search.report.content`.
"""

from __future__ import annotations

import statistics
from collections import Counter

import optuna

from search.report.render import Block, Heading, Image, Table, Text

# what makes two studies' test scores comparable: the same images in the same splits
SAME_DATA = ("dataset", "n_train", "n_val", "n_test", "split_seed")


def gather_other_studies(study: optuna.Study, storage) -> list[dict]:
    """Final models of the other studies in `storage` made on the same data and split."""
    mine = study.user_attrs.get("data", {})
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == study.study_name:
            continue
        attrs = summary.user_attrs
        final, data = attrs.get("final"), attrs.get("data", {})
        if not final or any(data.get(k) != mine.get(k) for k in SAME_DATA):
            continue
        rows.append({"study_name": summary.study_name, "study": attrs.get("study", "?"),
                     "test_accuracy": final.get("test_accuracy"),
                     "macro_f1": final.get("macro_f1"),
                     "n_parameters": final.get("n_parameters"), "macs": final.get("macs")})
    return sorted(rows, key=lambda r: -(r["test_accuracy"] or 0.0))


def other_studies_blocks(outcome) -> list[Block]:
    rows = [[outcome.study.study_name + " (this study)", outcome.spec.name,
             f"{outcome.test['accuracy']:.4f}", f"{outcome.test['macro_f1']:.4f}",
             f"{outcome.results['best found'].n_parameters:,}"]]
    rows += [[r["study_name"], r["study"], f"{r['test_accuracy']:.4f}",
              f"{r['macro_f1']:.4f}",
              f"{r['n_parameters']:,}" if r["n_parameters"] is not None else "-"]
             for r in outcome.other_studies]
    if len(rows) == 1:
        return [Heading("Other studies on the same data"), Text(
            "No other study in this storage has a final model on the same data and split; "
            "run e.g. `python -m search.run --study mlp` with the same --data and --storage "
            "to put its test accuracy here.")]
    best_other = max(outcome.other_studies, key=lambda r: r["test_accuracy"])
    delta = (outcome.test["accuracy"] - best_other["test_accuracy"]) * 100
    return [
        Heading("Other studies on the same data"),
        Text("Final models (each reloaded from its model.pt) of the studies in this storage "
             "that searched the same training/validation split and scored the same test "
             f"images. This study is {delta:+.2f} points against the best of them "
             f"({best_other['study_name']})."),
        Table(["study", "kind", "test accuracy", "macro F1", "parameters"], rows),
    ]


def gather_augmentation(study: optuna.Study) -> dict:
    """What augmentation cost and how its copies were shared, from the trials' attrs."""
    trials = [t for t in study.get_trials(deepcopy=False) if "aug_strength" in t.params]
    augmented = [t for t in trials if "augment_copies_seen" in t.user_attrs]
    settings = Counter(
        (t.params["aug_strength"], tuple(k for k, v in sorted(t.params.items())
                                         if k.startswith("aug_") and v is True))
        for t in augmented)
    seconds = [t.user_attrs.get("augment_seconds", 0.0) for t in augmented]
    trained = [t.user_attrs.get("seconds_per_epoch", 0.0) * len(t.intermediate_values)
               for t in augmented]
    return {
        "trials": len(trials), "augmented": len(augmented), "settings": len(settings),
        "copies_seen": [t.user_attrs["augment_copies_seen"] for t in augmented],
        "augment_seconds": sum(seconds), "trial_seconds": sum(trained),
    }


def augmentation_blocks(outcome, copies: int) -> list[Block]:
    info, best = outcome.augmentation, outcome.results["best found"].params.augment
    blocks: list[Block] = [Heading("Augmentation"), Text(
        f"albumentations on the uint8 training images only (validation and test are never "
        f"augmented). The best found trains with augmentation **{best.describe()}**; the "
        f"lecture net with none. Each setting of strength and families has {copies} "
        "augmented copies of the training split, made once, cached beside the storage and "
        "reused by every trial and the final retrain that draws the same setting; a trial "
        "trains epoch e on one of them, in an order drawn from its seed.")]
    if info["augmented"]:
        seen = Counter(info["copies_seen"])
        share = (info["augment_seconds"] / info["trial_seconds"] * 100
                 if info["trial_seconds"] else 0.0)
        blocks.append(Text(
            f"{info['augmented']} of {info['trials']} trials trained on augmented images, "
            f"drawing {info['settings']} distinct settings. Distinct augmented copies a trial "
            "saw: " + ", ".join(f"{n} trials saw {k}" for k, n in sorted(seen.items()))
            + f" (median {statistics.median(info['copies_seen']):g}). Making or loading "
            f"copies took {info['augment_seconds']:.1f} s of those trials' "
            f"{info['trial_seconds']:.1f} s ({share:.0f}%)."))
    if "augment" in outcome.figures:
        blocks.append(Image(outcome.figures["augment"], outcome.augment_caption))
    return blocks


# --- frozen-backbone studies (vgg16) ------------------------------------------------------

RANDOM_WEIGHTS = (
    "**Random backbone weights (`--weights none`)**: the frozen VGG16 was randomly "
    "initialized, not trained on ImageNet. Its features are random projections of the "
    "images; nothing here says how pretrained VGG16 features would do.")


def backbone_input_blocks(outcome) -> list[Block]:
    ds, size = outcome.dataset, outcome.options.get("input_size")
    return [Text(
        f"The vgg16 study does not normalize with the training split's statistics: its "
        f"{'x'.join(map(str, ds.image_shape))} grayscale images are repeated to 3 channels, "
        f"resized to {size}x{size} and normalized with ImageNet's per-channel mean and std "
        "(0.485/0.456/0.406, 0.229/0.224/0.225), the inputs the pretrained filters were "
        f"trained on; the split's own mean {ds.channel_mean[0]:.4f} and std "
        f"{ds.channel_std[0]:.4f} would shift every input away from them.")]


def transfer_blocks(outcome) -> list[Block]:
    """What this run measured about the frozen backbone, and why it lost where it did."""
    weights, info, study = outcome.weights, outcome.model_info, outcome.study
    size = outcome.options.get("input_size")
    trained, total = info["n_parameters"], info["n_parameters_total"]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds()
               for t in study.get_trials(deepcopy=False)
               if t.datetime_complete and t.datetime_start]
    per_trial = statistics.fmean(seconds) if seconds else float("nan")
    backbone = outcome.backbone_ms
    side = size // 32
    rows = [
        ["weights", f"{weights.kind}: {weights.source} (sha256 `{weights.sha256[:16]}`...)"],
        ["input", f"{'x'.join(map(str, outcome.dataset.image_shape))} grayscale -> 3 x {size} "
                  f"x {size}; the conv stack leaves a {side}x{side}x512 map"],
        ["parameters", f"{trained:,} trained (the head) of {total:,} "
                       f"({100 * trained / total:.2f}%)"],
        ["seconds per trial", f"{per_trial:.2f} (head only, on cached features)"],
    ]
    on_features = outcome.results["best found"].best_run().test["accuracy"]
    rows.append(["precision", (
        f"trials and the final retrain scored the head on cached features (made at "
        f"{outcome.feature_precision or 'float32'}, stored as float16): test accuracy "
        f"{on_features:.4f}; the saved network, float32 on images: "
        f"{outcome.test['accuracy']:.4f} ({100 * (outcome.test['accuracy'] - on_features):+.2f}"
        " points)")])
    if backbone:
        epoch = backbone * (len(outcome.dataset.train) + len(outcome.dataset.val)) / 1000
        rows.append(["backbone", f"{backbone:.2f} ms per image (timed on test images): "
                     f"{epoch:.1f} s per epoch over the training and validation splits, "
                     "which every trial would pay without the feature cache"])
    blocks: list[Block] = [Heading("Frozen VGG16: what this run measured"),
                           Table(["", ""], rows)]
    better = [r for r in outcome.other_studies
              if r["test_accuracy"] is not None and r["test_accuracy"] > outcome.test["accuracy"]]
    if not better:
        blocks.append(Text("No other study in this storage scored higher on the same test "
                           "images."))
        return blocks
    top = max(better, key=lambda r: r["test_accuracy"])
    gap = (top["test_accuracy"] - outcome.test["accuracy"]) * 100
    reasons = []
    if weights.kind == "none":
        reasons.append("the backbone's weights are random, so its features encode no learned "
                       "shapes at all")
    else:
        reasons.append(f"its filters were learned on 224 px colour photographs of ImageNet; "
                       f"here {outcome.dataset.image_shape[-1]} px grayscale digits are "
                       f"upsampled to {size} px and repeated over three channels, and five "
                       f"poolings reduce them to a {side}x{side} map")
    origin = "as initialized" if weights.kind == "none" else "as ImageNet trained it"
    reasons.append(f"only the head ({trained:,} parameters, {100 * trained / total:.2f}% of "
                   f"the network) learns from these images; the other {total - trained:,} stay "
                   f"{origin}, while the {top['study']} study learns every one of its "
                   + (f"{top['n_parameters']:,} " if top["n_parameters"] else "")
                   + "parameters from them")
    blocks.append(Text(
        f"**Why VGG16 loses here**: its test accuracy {outcome.test['accuracy']:.4f} is "
        f"{gap:.2f} points below {top['study_name']} ({top['test_accuracy']:.4f}): "
        + "; ".join(reasons) + "."))
    return blocks
