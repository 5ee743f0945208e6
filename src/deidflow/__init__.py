"""deidflow: de-identify whole medical-imaging datasets for research release."""
from ._version import __version__

__all__ = ["__version__"]
