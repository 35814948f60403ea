"""Linear probes of a LLaVA run's visual tokens: do the projected image features carry the scene
facts the VQA questions ask about? If a probe reads a fact and the model still answers at
chance, the LLM is not reading its visual tokens; if the probe cannot, the tower or projector
lost it.

For the first N images of a LLaVA JSON export (`python -m vlmjax.data.export llava`), the
model's projected visual tokens [T, D] (PrefixLM.image_features, flattened and standardised) are
fit by ridge regression to one-hot labels of: the object count, the first listed object's
colour, shape and position, and the background. Accuracy on held-out images against the
majority class.

    python benchmarks/llava_probe.py --model WORKDIR --llava_dir DIR [--images 6000]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

PROBES = {
    "count": lambda e: len(e["objects"]),
    "colour of the first object": lambda e: e["objects"][0]["colour"],
    "shape of the first object": lambda e: e["objects"][0]["shape"],
    "position of the first object": lambda e: str(e["objects"][0]["position"]),
    "background": lambda e: e["background"],
}


def ridge_probe(features_train, labels_train, features_test, labels_test, alpha=10.0):
    """(accuracy, majority-class accuracy) of a ridge regression to one-hot labels."""
    classes = sorted(set(labels_train) | set(labels_test))
    y_train = np.array([classes.index(label) for label in labels_train])
    y_test = np.array([classes.index(label) for label in labels_test])
    def with_bias(x):
        return np.concatenate([x, np.ones((len(x), 1))], axis=1)
    x = with_bias(features_train)
    weights = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]),
                              x.T @ np.eye(len(classes))[y_train])
    predicted = np.argmax(with_bias(features_test) @ weights, axis=1)
    accuracy = float(np.mean(predicted == y_test))
    return accuracy, float(np.bincount(y_test).max() / len(y_test))


def visual_tokens(model_dir: str, image_paths: list[str], batch: int = 500) -> np.ndarray:
    from vlmjax.convert import load_pretrained
    from vlmjax.generate import load_image
    model, params, model_config = load_pretrained(model_dir)
    features = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_features))
    out = []
    for start in range(0, len(image_paths), batch):
        images = np.stack([load_image(path, model_config)
                           for path in image_paths[start:start + batch]])
        out.append(np.asarray(features(params, images)))
    return np.concatenate(out).reshape(len(image_paths), -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a llava workdir (or HF LLaVA dir)")
    parser.add_argument("--llava_dir", required=True, help="a LLaVA JSON export of vlm_shapes")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--held_out", type=float, default=1 / 6)
    args = parser.parse_args(argv)
    with open(os.path.join(args.llava_dir, "train_vqa.json")) as file:
        entries = json.load(file)[:args.images]
    paths = [os.path.join(args.llava_dir, "images", e["image"]) for e in entries]
    x = visual_tokens(args.model, paths)
    split = int(len(x) * (1 - args.held_out))
    x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
    print(f"{args.model}: {len(x)} images ({len(x) - split} held out), visual tokens "
          f"flattened to {x.shape[1]} features")
    print("| fact | probe accuracy | majority class |")
    print("| --- | --- | --- |")
    rows = {}
    for name, label_of in PROBES.items():
        labels = [label_of(e) for e in entries]
        rows[name] = ridge_probe(x[:split], labels[:split], x[split:], labels[split:])
        print(f"| {name} | {100 * rows[name][0]:.1f}% | {100 * rows[name][1]:.1f}% |")
    return rows


if __name__ == "__main__":
    main()
