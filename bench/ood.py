"""The out-of-distribution detector against the plain maximum softmax probability, side by side.

One run trains the preset's model with the real job (``run_training``: calibration, the feature
bank and the OOD threshold fitted on its splits), or takes ``--model``, then sends every image
through the served path (``Predictor.predict_many``: decode, resize, the forward pass, the
calibrated probabilities and the score) and reports, for each set of images the model never saw,
the AUROC of telling it from the test split and the false-positive rate at 95% in-distribution
acceptance, for the k-NN score the service uses (:mod:`hotdog_ray.confidence`), the maximum
softmax probability before scaling and the energy of the logits. Nothing is downloaded:

- in distribution: the preset's test split (the digits; generated photos for ``configs/hotdog.yaml``);
- far: crops and rescales of scikit-learn's sample photos, uniform and Gaussian noise, blank and
  single-colour images;
- near (the digits only): letters rendered with the font Pillow ships, in the digits' 8x8 style.

    python bench/ood.py                                   # the digits sample (trains it: ~3 min)
    python bench/ood.py --model models:/hotdog-classifier@champion --set tracking.uri=sqlite:///mlflow.db
    python bench/ood.py --config configs/hotdog.yaml      # generated hotdog photos
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))

ACCEPTANCE = 0.95


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def far_images(rng: np.random.Generator, crops: int = 40, side: int = 64) -> dict[str, list[bytes]]:
    """Images of nothing the zoo's presets learn: sample photos, noise, blank and flat colours."""
    from sklearn.datasets import load_sample_images

    photos = []
    for img in load_sample_images().images:  # china.jpg (the pagoda) and flower.jpg
        photos.append(png(img))
        h, w = img.shape[:2]
        for _ in range(crops):
            s = int(rng.integers(side, min(h, w)))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            photos.append(png(np.asarray(Image.fromarray(img[y : y + s, x : x + s]).resize((side, side)))))
    noise = [png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(50)] + [
        png(np.clip(rng.normal(128, 50, (side, side, 3)), 0, 255).astype(np.uint8)) for _ in range(50)
    ]
    flat = [png(np.full((side, side, 3), v, np.uint8)) for v in np.linspace(0, 255, 20).astype(np.uint8)] + [
        png(np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (side, side, 3)).copy())
        for _ in range(30)
    ]
    return {"sample photos": photos, "noise": noise, "blank and single colour": flat}


def letters() -> list[bytes]:
    """Letters in the digits' style: white on black, filling the square, box-filtered to 8x8 grey
    and stretched to the full range as the sample's scans are."""
    out = []
    for ch in "ABCEFGHJKLMNPQRSTUVWXYZabcdefghkmnpqrtuvwxyz":
        for size, dx in ((34, 0), (38, 1), (30, -1)):
            im = Image.new("L", (32, 32), 0)
            font = ImageFont.load_default(size=size)
            ImageDraw.Draw(im).text((16 + dx, 16), ch, fill=255, font=font, anchor="mm")
            small = np.asarray(im.resize((8, 8), Image.BOX), np.float64)
            out.append(png(np.round(small * 255 / max(small.max(), 1)).astype(np.uint8)))
    return out


def detection(inside: np.ndarray, outside: np.ndarray) -> dict[str, float]:
    """AUROC of scores (higher: out) and the false-positive rate at the in-distribution acceptance."""
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    threshold = np.quantile(inside, ACCEPTANCE, method="higher")
    return {
        "auroc": round(float(roc_auc_score(truth, np.r_[inside, outside])), 4),
        "fpr_at_95": round(float(np.mean(outside <= threshold)), 4),
    }


METHODS = ("knn", "msp", "energy")


def scored(predictor, images: list[bytes]) -> dict[str, np.ndarray]:
    """The served path's answers: each detector's score (higher: less familiar), labels and flags."""
    import torch

    from hotdog_ray.confidence import energy_score, uncalibrated
    from hotdog_ray.images import to_model_input
    from hotdog_ray.predict import Scores

    rows = [r for r in predictor.predict_many(images) if isinstance(r, Scores)]
    assert len(rows) == len(images), "an image did not decode"
    probs = np.stack([r.probabilities for r in rows])
    knn = np.array([r.ood_score for r in rows])
    pixels = torch.from_numpy(np.stack([predictor.preprocess(x) for x in images]))
    with torch.inference_mode():
        logits = predictor.model(to_model_input(pixels, predictor.bundle.meta["rescale"])).numpy()
    return {
        "knn": knn,
        "msp": -uncalibrated(probs, predictor.calibration.temperature).max(axis=1),
        "energy": energy_score(logits),
        "label": probs.argmax(axis=1),
        "in_distribution": predictor.calibration.in_distribution(knn),
    }


def uncalibrated_top(prediction, predictor) -> float:
    """The top probability the answer would have had before temperature scaling."""
    from hotdog_ray.confidence import uncalibrated

    probs = np.array([list(prediction.probabilities.values())])
    return uncalibrated(probs, predictor.calibration.temperature).max()


def train(config: str | None, sets: list[str], root: Path) -> tuple[object, str]:
    """Train the preset on its bundled or generated data in a store under ``root``; its config and model ref."""
    from hotdog_ray.config import load_config
    from hotdog_ray.train import run_training

    data = root / "data"
    if config and "hotdog" in config:
        from gpu_check import CLASSES, photo  # the generated photos of the GPU check

        rng = np.random.default_rng(0)
        for split, n in (("train", 400), ("validation", 100), ("test", 200)):
            for c, name in enumerate(CLASSES):
                (data / split / name).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    (data / split / name / f"{i:05d}.jpg").write_bytes(photo(c, 160, rng))
    else:
        from hotdog_ray.prepare import write_sample

        write_sample(str(data))
    cfg = load_config(
        config or "configs/sample.yaml",
        [
            f"data.root={data}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"train.storage_path={root / 'checkpoints'}",
            f"data.cache.root={root / 'cache'}",
            *sets,
        ],
    )
    outcome = run_training(cfg)
    return cfg, f"models:/{cfg.tracking.registered_model}/{outcome.model_version}"


def test_split(root: str) -> tuple[list[bytes], list[str]]:
    from hotdog_ray import storage

    loc = storage.resolve(root).join("test")
    files = sorted(p for p in storage.list_files(loc) if not p.rsplit("/", 1)[-1].startswith("."))
    return [storage.read_bytes(loc.fs, p) for p in files], [p.split("/")[-2] for p in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a preset (default: configs/sample.yaml)")
    parser.add_argument("--model", default=None, help="a model ref to measure instead of training one")
    parser.add_argument("--data", default=None, help="with --model: the dataset root of its test split")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config overrides")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hotdog_ray.config import load_config
    from hotdog_ray.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.model:
            cfg, ref = load_config(args.config, args.sets), args.model
        else:
            cfg, ref = train(args.config, args.sets, Path(tmp))
        trained_s = time.perf_counter() - t0
        predictor = Predictor.from_config(cfg, ref, device="cpu")
        images, labels = test_split(args.data or cfg.data.root)
        inside = scored(predictor, images)

    from sklearn.datasets import load_sample_image

    from hotdog_ray.confidence import calibration_report

    truth = np.array([predictor.classes.index(label) for label in labels])
    probs = np.stack([r.probabilities for r in predictor.predict_many(images)])
    calibration = calibration_report(probs, truth, predictor.calibration, inside["knn"])
    pagoda = predictor.predict(png(load_sample_image("china.jpg")))
    raw_top = float(uncalibrated_top(pagoda, predictor))
    rng = np.random.default_rng(0)
    far = far_images(rng)
    sets = {name: scored(predictor, imgs) for name, imgs in far.items()}
    sets["far (all)"] = {k: np.concatenate([s[k] for s in sets.values()]) for k in inside}
    digits = "hotdog" not in (args.config or "")
    if digits:
        sets["near: letters"] = scored(predictor, letters())
    rows = []
    for name, out in sets.items():
        rows.append(
            {
                "set": name,
                "images": len(out["knn"]),
                "flagged": round(float(np.mean(~out["in_distribution"])), 4),
                **{
                    f"{method}_{k}": v
                    for method in METHODS
                    for k, v in detection(inside[method], out[method]).items()
                },
            }
        )
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {platform.system()}",
        "config": args.config or "configs/sample.yaml",
        "model": ref,
        "train_s": round(trained_s, 1),
        "temperature": round(predictor.calibration.temperature, 4),
        "configured_acceptance": predictor.calibration.acceptance,
        "test_images": len(images),
        "test_accepted": round(float(np.mean(inside["in_distribution"])), 4),
        "test_accuracy": round(float(np.mean(inside["label"] == truth)), 4),
        "test_ece_before_after": [round(calibration["ece_uncalibrated"], 4), round(calibration["ece"], 4)],
        "test_brier_before_after": [
            round(calibration["brier_uncalibrated"], 4),
            round(calibration["brier"], 4),
        ],
        "pagoda": {
            "label": pagoda.label,
            "probability": round(pagoda.probability, 4),
            "uncalibrated_probability": round(raw_top, 4),
            "ood_score": round(pagoda.ood_score, 4),
            "threshold": round(predictor.calibration.ood_threshold, 4),
            "in_distribution": pagoda.in_distribution,
        },
        "rows": rows,
    }
    print(
        f"\n{result['config']}: {result['model']}, T = {result['temperature']}, test split "
        f"{result['test_images']} images, accuracy {result['test_accuracy']}, accepted "
        f"{result['test_accepted']} (configured {result['configured_acceptance']})\n"
    )
    print(
        f"test ECE before/after scaling {result['test_ece_before_after']}, Brier {result['test_brier_before_after']}; "
        f"china.jpg: {result['pagoda']}\n"
    )
    print("| set | images | flagged | k-NN AUROC / FPR@95 | MSP AUROC / FPR@95 | energy AUROC / FPR@95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[m + '_auroc']:.3f} / {r[m + '_fpr_at_95']:.3f}" for m in METHODS)
        print(f"| {r['set']} | {r['images']} | {r['flagged']:.3f} | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
