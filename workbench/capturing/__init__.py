"""Capture: run a model over prompts and stream chosen activations into an HDF5 run.

(The package is ``capturing``, not ``capture``: a subpackage named ``capture`` would replace the
``workbench.capture`` function as soon as it was imported.)

    import workbench
    result = workbench.capture("smollm2-135m", ["The capital of France is"],
                               hooks=["residual", "blocks.3.attn.hook_pattern"], out="run.h5")
    run = workbench.open_run("run.h5")
"""

from workbench.capturing.hooks import PRESETS
from workbench.capturing.prompts import Prompt, load_prompts_file
from workbench.capturing.runner import CapturePlan, CaptureResult, capture

__all__ = ["PRESETS", "CapturePlan", "CaptureResult", "Prompt", "capture", "load_prompts_file"]
