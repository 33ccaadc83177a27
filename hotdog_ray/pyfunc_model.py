"""The registered model as MLflow sees it: a pyfunc defined from code (MLflow's models-from-code).

MLflow copies this file into every model folder :func:`hotdog_ray.export.save_mlflow_model`
writes and runs it when ``mlflow.pyfunc.load_model`` or ``mlflow models serve`` loads the model:
nothing is pickled, and the weights are read with ``weights_only`` loading as everywhere else.
The package never imports this file (running it registers the model with MLflow). It needs
hotdog_ray importable where it loads (``mlflow models serve --env-manager local``).

Input: a DataFrame with an ``image`` column of encoded image bytes (base64 in JSON requests).
Output: ``label``, ``probability``, ``probability_<class>`` (calibrated), ``ood_score`` and
``in_distribution`` per row; an image that cannot be decoded gets an empty label, NaN probabilities
and the reason in ``error``.
"""

import mlflow
import numpy as np
import pandas as pd

from hotdog_ray.bundle import load_bundle
from hotdog_ray.export import probability_column
from hotdog_ray.images import ImageError
from hotdog_ray.predict import Predictor


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The bundle behind :class:`~hotdog_ray.predict.Predictor`, on its default runtime."""

    def load_context(self, context) -> None:
        self.predictor = Predictor(load_bundle(context.artifacts["bundle"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        p = self.predictor
        images = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        results = p.predict_many([bytes(data) for data in images])
        errors = [str(r) if isinstance(r, ImageError) else None for r in results]
        ok = np.asarray([e is None for e in errors], bool)
        probs = np.full((len(results), len(p.classes)), np.nan, np.float32)
        ood = np.full(len(results), np.nan, np.float64)
        if ok.any():
            good = [r for r in results if not isinstance(r, ImageError)]
            probs[ok] = np.stack([r.probabilities for r in good])
            ood[ok] = [r.ood_score for r in good]
        best = np.where(ok, np.nan_to_num(probs, nan=-1).argmax(axis=1), -1)
        out = pd.DataFrame(
            {
                "label": [p.classes[b] if b >= 0 else "" for b in best],
                "probability": [float(probs[i, b]) if b >= 0 else np.nan for i, b in enumerate(best)],
                **{probability_column(c): probs[:, j].astype(np.float64) for j, c in enumerate(p.classes)},
                "ood_score": ood,
                "in_distribution": p.calibration.in_distribution(ood),
            }
        )
        if not ok.all():
            out["error"] = errors
        return out


mlflow.models.set_model(ImageClassifier())
