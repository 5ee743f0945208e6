"""deidflow: de-identify whole medical-imaging datasets for research release."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deidflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
