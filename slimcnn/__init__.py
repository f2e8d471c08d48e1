"""slimcnn: make trained CNNs smaller and faster, and small CNNs better."""
__version__ = "0.1.0"
