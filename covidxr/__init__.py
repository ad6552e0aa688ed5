"""covidxr: COVID-19 on chest X-rays, with the evidence shown. Research and teaching only."""

__version__ = "0.1.0"

from .predictor import Prediction, Predictor  # noqa: E402

__all__ = ["Prediction", "Predictor", "__version__"]
