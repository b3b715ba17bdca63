"""ami: agents of the autonomous-machine-intelligence blueprint, in PyTorch.

`from ami import AMI` is the Python API (ami/api.py); it is imported on first use, so that `ami --version` and
`import ami.envs` stay light."""

__version__ = "0.1.0"
__all__ = ["AMI", "Callback", "__version__"]


def __getattr__(name: str):
    if name == "AMI":
        from ami.api import AMI

        return AMI
    if name == "Callback":
        from ami.train import Callback

        return Callback
    raise AttributeError(f"module 'ami' has no attribute {name!r}")
