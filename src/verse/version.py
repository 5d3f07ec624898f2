"""The version of Verse (read by `verse --version`, `verse.__version__` and the package metadata)."""

__version__ = "0.1.0"
