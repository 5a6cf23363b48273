"""Notebooks: examples/notebook.ipynb runs headless (nbclient, a real IPython kernel) and its
outputs are checked against independent computations: the model's own forward pass, the run's
stored arrays, and the planted induction mechanism of toy-induction."""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.widgets import plain

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "notebook.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    folder = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"WORKBENCH_NOTEBOOK_DIR": str(folder), "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        from jupyter_client.kernelspec import NATIVE_KERNEL_NAME

        # the native kernel is ipykernel in this interpreter (the project's venv)
        nbclient.NotebookClient(nb, timeout=600, kernel_name=NATIVE_KERNEL_NAME,
                                resources={"metadata": {"path": str(folder)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, folder


def outputs_of(nb, needle: str) -> list[dict]:
    """The outputs of the code cell whose source contains ``needle``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(cells) == 1, needle
    return cells[0].outputs


def data_of(nb, needle: str, mime: str):
    found = [o["data"][mime] for o in outputs_of(nb, needle) if mime in o.get("data", {})]
    assert found, f"no {mime} output from the cell with {needle!r}"
    return found[-1]


def test_notebook_runs_and_every_display_renders(executed):
    nb, folder = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # the kernel ran the notebook; its files are here:
    assert (folder / "induction.h5").exists() and (folder / "induction.h5.results").is_dir()
    for needle in ('"attention", layer=1', 'show(run, "lens"', 'show(run, "dla"'):
        png = base64.b64decode(data_of(nb, needle, "image/png"))
        assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_the_run_shows_its_tokens(executed):
    import workbench

    nb, folder = executed
    page = data_of(nb, "run = workbench.open_run", "text/html")
    with workbench.open_run(folder / "induction.h5") as run:
        for i in range(len(run)):
            labels = [t.label for t in run.display_tokens(i)]
            shown = [html.unescape(x) for x in re.findall(r'class="wb-tok[^"]*"[^>]*>([^<]*)<', page)]
            assert all(lab in shown for lab in labels)
        assert f"{len(run)} of {len(run)}" in page and "toy-induction" in page
    assert re.search(r'class="wb-tok wb-special"[^>]*>&lt;bos&gt;<', page)  # the BOS token, marked special


def test_attention_figure_holds_the_stored_pattern_and_shows_induction(executed):
    import workbench

    _, folder = executed
    with workbench.open_run(folder / "induction.h5") as run:
        fig = workbench.show(run, "attention", layer=1, head=0, prompt=0)
        drawn = np.ma.filled(fig.axes[0].images[0].get_array(), 0.0)
        stored = run.activation("blocks.1.attn.hook_pattern", 0)[0]
        np.testing.assert_array_equal(drawn, stored.astype(np.float64))
        # the planted mechanism: <bos> + 10 letters + the same 10 again; in the second copy each
        # query attends most to the key just after its token's first occurrence (q - 10 + 1)
        for q in range(12, 21):
            assert int(np.argmax(stored[q])) == q - 9
        assert float(np.mean([stored[q, q - 9] for q in range(12, 21)])) > 0.5


def test_lens_picture_is_the_terminal_view_and_the_model_agrees(executed):
    import torch

    import workbench
    from workbench.registries import build_views

    nb, folder = executed
    svg = data_of(nb, '"lens-grid", prompt=0, terminal=True', "image/svg+xml")
    with workbench.open_run(folder / "induction.h5") as run:
        pic = workbench.show(run, "lens-grid", prompt=0, terminal=True)
        assert pic.svg.count("<text") == svg.count("<text")
        # the same drawing as the terminal view's own widget, line for line
        stored = workbench.result(run, "logit-lens")
        view = build_views().by_name["lens-grid"].make(stored, run)

        class Focus:
            prompt, pos = 0, run.n_tokens(0) - 1

        view.follow(run, Focus())
        terminal = [line.strip() for line in plain(view, 200).splitlines() if line.strip()]
        picture = [line.strip() for line in pic.text.splitlines() if line.strip()]
        for line in terminal:
            assert line in picture, line
        # the last position's output, from the model itself
        model = workbench.load_model("toy-induction", device="cpu", progress=False)
        with torch.inference_mode():
            logits = model.bridge(torch.tensor([run.tokens(0).tolist()]))[0, -1]
        probs = torch.softmax(logits.double(), -1)
        top = int(torch.argmax(probs))
        label = run.display_ids([top])[0].label
        assert f"output {label!r} {float(probs[top]):.1%}" in pic.text


def test_stored_result_displays_through_its_view(executed):
    nb, _ = executed
    page = data_of(nb, "outcomes[2].stored", "text/html")
    assert "<svg" in page and "induction" in html.unescape(page)


def test_show_refuses_clearly(executed):
    import workbench
    from workbench.errors import UserError

    _, folder = executed
    with workbench.open_run(folder / "induction.h5") as run:
        with pytest.raises(UserError, match="no view or analysis named 'nope'"):
            workbench.show(run, "nope")
        with pytest.raises(UserError, match="takes no option 'colour'"):
            workbench.show(run, "attention", colour="red")
        with pytest.raises(UserError, match="prompt 9 is not in this run"):
            workbench.show(run, "lens-grid", prompt=9, terminal=True)
