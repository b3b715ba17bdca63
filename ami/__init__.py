"""ami: agents of the autonomous-machine-intelligence blueprint, in PyTorch."""

__version__ = "0.1.0"
