"""python -m search.evaluate runs/<study-name>/model.pt [--data NAME] [--data-dir DIR]

Rebuilds a saved model from model.pt + model.json (no study needed), runs it on the test
split of the data it was trained on (or --data), and prints the accuracy line and sklearn's
per-class classification report: the same numbers as the run's report.md.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from search import costs, registry
from search import data as data_module
from search import metrics as metrics_module
from search.cli import Parser, describe, run_command, setup_logging
from search.errors import ConfigError
from search.export import load_model
from search.study import load_recorded
from search.train import predict_scores

log = logging.getLogger(__name__)


def evaluate(path: str, data: str | None = None, data_dir: str | None = None) -> dict:
    """Load and score the model at `path`. Raises ConfigError (ModelFileError, DataError)
    on a bad file or data whose images do not fit the model."""
    loaded = load_model(path)
    made = loaded.info.get("data", {})
    source = Path(str(made.get("source", "")))
    if data_dir is None and data is None and source.is_dir() and not os.environ.get(
            "SEARCH_DATA_DIR"):
        data_dir = str(source)  # the IDX folder the model was trained from, if still there
    if data is None:
        dataset = load_recorded(made, data_dir=data_dir)
    else:  # your own images are read as the model's were: its channels and size
        channels, height, width = loaded.info["input"]["shape"]
        options = data_module.ImageOptions(image_size=height if height == width else None,
                                           channels=channels)
        dataset = data_module.load(data, data_dir, images=options)
    expected = tuple(loaded.info["input"]["shape"])
    if dataset.image_shape != expected:
        raise ConfigError(f"{path} takes {'x'.join(map(str, expected))} images; data set "
                          f"{dataset.name} has {'x'.join(map(str, dataset.image_shape))}")
    if len(dataset.classes) != len(loaded.info["classes"]):
        raise ConfigError(f"{path} predicts {len(loaded.info['classes'])} classes; data set "
                          f"{dataset.name} has {len(dataset.classes)}")
    if made and (made.get("dataset"), made.get("n_test")) != (dataset.name, len(dataset.test)):
        log.warning("the model was trained on %s (%s test images); scoring on %s (%d)",
                    made.get("dataset"), made.get("n_test"), dataset.name, len(dataset.test))
    predicted = predict_scores(loaded.model, dataset.test.x).argmax(1).numpy()
    y_true = dataset.test.y.numpy()
    result = metrics_module.compute(y_true, predicted, dataset.classes)
    result["text"] = metrics_module.report_text(y_true, predicted, dataset.classes)
    result["dataset"] = dataset.name
    onnx = Path(path).with_name("model.onnx")
    if onnx.is_file():  # measured here, on the machine that runs this
        result["latency"] = costs.onnx_latency(onnx, expected)
    result["costs"] = costs.measure(registry.get(str(loaded.info["study"])), loaded.params,
                                    expected, len(loaded.info["classes"]),
                                    **loaded.info.get("options", {}))
    return result


def build_parser() -> Parser:
    parser = Parser(prog="python -m search.evaluate", description=describe(__doc__))
    parser.add_argument("model", metavar="MODEL_PT",
                        help="path to model.pt (model.json must be beside it)")
    parser.add_argument("--data", metavar="NAME|PATH",
                        help=f"data set to score on, one of {', '.join(data_module.DATASETS)}, "
                        "or a folder of images or an .npz, read at the model's size and "
                        "channels (default: the data in model.json)")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the data set's IDX "
                        "files (default: where the model's data came from, else "
                        "$SEARCH_DATA_DIR or ./data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        data_module.check_data_dir(args.data_dir)  # before the model is read
        result = evaluate(args.model, args.data, args.data_dir)
        print(f"{args.model} on {result['dataset']}: {metrics_module.accuracy_line(result)}")
        print(result["text"])
        print(f"costs: {result['costs'].describe()}")
        if "latency" in result:
            print(f"latency of model.onnx: {costs.describe_latency(result['latency'])}")

    return run_command(body, "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
