"""cnnkit: train, evaluate and use CNN image classifiers."""

__version__ = "0.1.0"
