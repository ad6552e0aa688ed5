"""covidxr: COVID-19 on chest X-rays, with the evidence shown. Research and teaching only."""

__version__ = "0.1.0"

__all__ = ["Prediction", "Predictor", "__version__"]


def __getattr__(name: str):
    # `from covidxr import Predictor` loads torch and the model code on first use only, so the
    # command line (`covidxr --help`, `covidxr examples`) starts without them.
    if name in ("Prediction", "Predictor"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'covidxr' has no attribute {name!r}")
