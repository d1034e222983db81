"""python benchmarks/final_memory.py [--sizes 32,64] [--images 1000,4000] [--weights none]

Peak resident memory of what the final step does with the test images, for a vgg16 model
(the exercise head on a frozen VGG16) at each input size and number of mnist-5k test images,
side by side:

  batched:   the service: every scoring pass (the trained and the reloaded model) and the
             ONNX check run in batches sized by one image's activations
             (search.train.eval_batch), so memory follows the input size only
  one batch: the same steps with the batch bounded only by EVAL_BATCH (4096 images): all of
             mnist-5k's test split in one pass, as the final step scored before

The model is the folded network the final step saves, exported to ONNX once per size.
Each cell runs in a fresh process (peak RSS counts torch's allocations) and prints the peak
above the process's size after its imports, data and model, for the two scoring passes and
then for the ONNX check, and the ratio. With the 10,000 MNIST test images one batch is
4096 images: at 224 px about 150 GB. About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import header  # noqa: E402

_EXPORT = """
import sys, torch
from search import data as data_module, export
from search.models.vgg16 import FrozenVGG16, resolve_weights
size, weights, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
test = data_module.load("mnist-5k").test.x
torch.manual_seed(0)
model = FrozenVGG16(10, head="exercise", input_size=size, fold=True,
                    state=resolve_weights(weights, 0).state).eval()
torch.save(model.state_dict(), path + ".pt")
export.export_onnx(model, path, test[:2].float() / 255)
"""
_CELL = """
import json, resource, sys
import torch
from search import data as data_module, export, train
from search.models.vgg16 import FrozenVGG16
size, n, way, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if way == "one batch":
    train.EVAL_BYTES = 1 << 62
x = data_module.load("mnist-5k").test.x
test = x.repeat(-(-n // len(x)), 1, 1, 1)[:n]  # mnist-5k's 1000, repeated to n
model = FrozenVGG16(10, head="exercise", input_size=size, fold=True).eval()
model.load_state_dict(torch.load(path + ".pt", weights_only=True))
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
train.predict_scores(model, test)
train.predict_scores(model, test)  # the trained and the reloaded model
scored = peak()
checked = export.check_onnx(path, model, test)
print(json.dumps({"scoring_mb": scored - base, "onnx_mb": peak() - base, "images": len(test),
                  "batch": checked["batch"]}))
"""


def _child(code: str, *args) -> str:
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(run.stderr.strip().splitlines()[-1][:200] if run.stderr else "?")
    return run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64", help="input sizes, px (default 32,64)")
    parser.add_argument("--images", default="1000,4000",
                        help="test images scored (default 1000,4000: mnist-5k's 1000 test "
                             "images, repeated)")
    parser.add_argument("--weights", default="none", help="none (random, seeded) or a path")
    args = parser.parse_args()
    print(header())
    print()
    print("| input size | test images | batch | scoring: batched | scoring: one batch | "
          "ONNX check: batched | ONNX check: one batch | one batch / batched |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            path = f"{folder}/vgg16-{size}.onnx"
            _child(_EXPORT, size, args.weights, path)
            for n in (int(s) for s in args.images.split(",")):
                ours, theirs = (json.loads(_child(_CELL, size, n, way, path).splitlines()[-1])
                                for way in ("batched", "one batch"))
                worst = max(ours["scoring_mb"], ours["onnx_mb"], 1)
                print(f"| {size} | {ours['images']} | {ours['batch']} | "
                      f"{ours['scoring_mb']:,.0f} MB | {theirs['scoring_mb']:,.0f} MB | "
                      f"{ours['onnx_mb']:,.0f} MB | {theirs['onnx_mb']:,.0f} MB | "
                      f"{max(theirs['scoring_mb'], theirs['onnx_mb']) / worst:.1f}x |",
                      flush=True)
    print("\nMB: peak resident memory above the process's after its imports, data and model "
          "(a fresh process per cell; ONNX check: the peak through scoring and the check)")


if __name__ == "__main__":
    main()
