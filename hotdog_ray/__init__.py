"""hotdog-ray: train, track and serve convolutional image classifiers on Ray."""

__version__ = "0.1.0"
