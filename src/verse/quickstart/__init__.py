"""`verse quickstart`: the synthetic reasoning task, the SFT pipeline around `verse.train`, and the report card."""

from verse.quickstart.pipeline import QuickstartConfig, QuickstartResult, run_quickstart

__all__ = ["QuickstartConfig", "QuickstartResult", "run_quickstart"]
