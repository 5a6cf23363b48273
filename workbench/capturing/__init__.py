"""Capture: run a model over prompts and stream chosen activations into an HDF5 run.

(The package is ``capturing``, not ``capture``: a subpackage named ``capture`` would replace the
``workbench.capture`` function as soon as it was imported.)

    import workbench
    result = workbench.capture("smollm2-135m", ["The capital of France is"],
                               hooks=["residual", "blocks.3.attn.hook_pattern"], out="run.h5")
    run = workbench.open_run("run.h5")

Modules: ``entry`` (:func:`capture`: check, plan, open, batches, finish), ``plan`` (tokenizing,
hook resolution, size estimate, the settings document), ``forward`` (a batch's hooked forward
pass, loss and top-k), ``sampling`` (the generation loop shared with steering), ``hooks`` (which
tensors to store), ``prompts`` (prompt files and ids). The writer thread and the file transaction
are the run store's (``workbench.store.writer_thread``, ``workbench.store.transaction``).
"""

from workbench.capturing.entry import CaptureInterrupted, CaptureResult, capture
from workbench.capturing.hooks import PRESETS
from workbench.capturing.plan import CapturePlan
from workbench.capturing.prompts import Prompt, load_prompts_file

__all__ = ["PRESETS", "CaptureInterrupted", "CapturePlan", "CaptureResult", "Prompt", "capture",
           "load_prompts_file"]
