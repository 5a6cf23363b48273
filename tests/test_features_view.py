"""The SAE feature dashboards in the terminal UI (plugins/features_view.py), driven key by key in
the app at 80 x 24.

Checked against what the view does not compute itself: the ``features`` result's arrays (sorting,
the list's values, the histogram's counts, the promoted and suppressed logits), the run's own
token labels, the promoted tokens' labels from the run's vocabulary (search), and the SAE's
encoding of the stored activations done here by hand (``SAE.encode`` on ``run.activation``):
the shading of each context token, and the features active at the focused token.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from rich.cells import cell_len
from workbench_plugins.sae import stored_sae

import workbench
from tests import widgets
from workbench.capturing.prompts import Prompt
from workbench.kit import token_label
from workbench.registries import analyze, build_analyses

HOOK = "blocks.1.hook_resid_post"
SIZE = (80, 24)


@pytest.fixture(scope="module")
def feat(tmp_path_factory):
    """A tiny-llama run (its unembedding is trained: logit effects are stored), a small TopK SAE
    trained on it, and its ``features`` result: (run path, open run, features result, SAE)."""
    model = workbench.load_model("tiny-llama", device="cpu", progress=False)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "a", "dog", "ran", "to", "the", "park", "when", "it",
             "rained"]
    rng = np.random.default_rng(0)
    prompts = [Prompt(text=" ".join(rng.choice(words, size=8)), id=f"p{i}") for i in range(60)]
    path = tmp_path_factory.mktemp("features-view") / "run.h5"
    workbench.capture(model, prompts, hooks=[HOOK], out=path, progress=False)
    run = workbench.open_run(path)
    a = build_analyses()
    [sae] = analyze(run, [a.get("sae")], {"sae": {"hook": HOOK, "features": 64, "k": 4, "batch": 64,
                                                   "ce": False}}, model=model)
    assert sae.ok, sae.stored.error
    [out] = analyze(run, [a.get("features")], {"features": {"logits": 5}}, model=model)
    assert out.ok, out.stored.error
    assert out.stored.data["dead"] > 0  # the list hides some
    yield path, run, out.stored, stored_sae(sae.stored)
    run.close()


def drive(path, steps, size=SIZE):
    """Open the app on ``path``'s results, show the feature dashboard view, focus it and await
    ``steps(press, view)``; ``press(*keys)`` presses them and returns what the view shows (plain
    text), checked to fit the panel."""
    from workbench_plugins.features_view import FeaturesView

    from workbench.tui import make_app
    from workbench.tui.results import ResultsPanel

    app = make_app([str(path)], view="results")

    async def main():
        async with app.run_test(size=size) as pilot:
            for _ in range(3):
                await pilot.pause()
            panel = app.query_one(ResultsPanel)
            panel.open(next(k for k, (s, v) in enumerate(panel.entries) if v is not None and s.analysis == "features"))
            for _ in range(3):
                await pilot.pause()
            view = app.query_one(FeaturesView)
            view.focus()

            async def press(*keys):
                for k in keys:
                    await pilot.press(k)
                await pilot.pause()
                width, height = view.size.width, view.parent.content_region.height
                text = widgets.plain(view, width=width)
                lines = text.rstrip("\n").splitlines()
                assert len(lines) <= height and all(cell_len(ln.rstrip()) <= width for ln in lines), text
                return text

            return await steps(press, view)

    return asyncio.run(main())


def rows(text):
    """The feature ids of a list (or here) pane's rows, and the one under the cursor."""
    ids, cursor = [], None
    for ln in text.splitlines()[2:]:
        head = ln[:1]
        rest = ln[1:].split()
        if head in ("▶", " ") and rest and rest[0].isdigit():
            ids.append(int(rest[0]))
            if head == "▶":
                cursor = ids[-1]
    return ids, cursor


def by(values, keep):
    idx = np.flatnonzero(keep)
    return idx[np.argsort(-np.asarray(values)[idx], kind="stable")].tolist()


def test_list_sorts_hides_dead_and_moves(feat):
    path, run, stored, _ = feat
    a = stored.arrays
    alive = a["fires"] > 0
    n_alive, dead = int(alive.sum()), int((~alive).sum())

    async def steps(press, view):
        shots = {"start": await press()}
        shots["down"] = await press("down", "down", "down")
        shots["pagedown"] = await press("pagedown")
        shots["end"] = await press("end")
        shots["max"] = await press("home", "o")
        shots["logit"] = await press("o")
        shots["density"] = await press("o")
        shots["dead"] = await press("d")
        return shots

    shots = drive(path, steps)
    start = shots["start"]
    assert start.startswith(f"{n_alive}/64 features · {dead} dead hidden") and "dens▼" in start
    ids, cursor = rows(start)
    want = by(a["density"], alive)
    assert ids == want[:len(ids)] and cursor == want[0] and len(ids) >= 10
    f = want[0]
    line = next(ln for ln in start.splitlines() if ln.startswith("▶"))
    assert f"{100 * a['density'][f]:.3g}%" in line and f"{a['max'][f]:.3g}" in line
    assert token_label(run.display_ids([int(a["promoted_ids"][f, 0])])[0].label, 99)[:3] in line
    assert rows(shots["down"])[1] == want[3]
    # PageDown moves by the rows the list shows
    assert rows(shots["pagedown"])[1] == want[min(3 + len(ids), n_alive - 1)]
    assert rows(shots["end"])[1] == want[-1]
    assert rows(shots["max"])[0] == by(a["max"], alive)[:len(ids)] and "max▼" in shots["max"]
    assert rows(shots["logit"])[0] == by(a["promoted"][:, 0], alive)[:len(ids)]
    assert "promotes▼" in shots["logit"]
    assert rows(shots["density"])[0] == want[:len(ids)]
    assert shots["dead"].startswith(f"64/64 features · {dead} dead shown")
    assert rows(shots["dead"])[0] == by(a["density"], np.ones(64, bool))[:len(ids)]


def test_search_by_promoted_token(feat):
    path, run, stored, _ = feat
    a = stored.arrays
    ids = np.unique(a["promoted_ids"])
    labels = {int(t): d.label for t, d in zip(ids, run.display_ids(ids), strict=True)}
    # a letter that some but not all features promote a token containing (either case)
    letters = [c for c in "etaoinsrhl" if 0 < sum(any(c in labels[int(t)].lower() for t in row)
                                                   for row in a["promoted_ids"]) < 40]
    needle = letters[0]
    hit = np.array([any(needle in labels[int(t)].lower() for t in row) for row in a["promoted_ids"]])
    want = by(a["density"], hit & (a["fires"] > 0))

    async def steps(press, view):
        found = await press("slash", *needle, "enter")
        listed = view.order().tolist()
        cleared = await press("slash", "backspace", "enter")
        return found, listed, cleared

    found, listed, cleared = drive(path, steps)
    assert listed == want
    assert rows(found)[0] == want[:len(rows(found)[0])]
    assert found.startswith(f"{len(want)}/64 features · /{needle}")
    assert cleared.startswith(f"{int((a['fires'] > 0).sum())}/64 features")


def _context_window(top, under, labels, p, t):
    """Which tokens a context's line shows, ``labels[lo:t] [labels[t]] labels[t+1:hi]``, and the
    column of the first (after the ``value`` / ``#prompt:position`` in front)."""
    where = f"#{p}:{t} "
    col = under.index(where) + len(where)
    body = top[col:].rstrip()
    lo = next(lo for lo in range(t, -1, -1) if body.startswith("".join(labels[lo:t]) + f"[{labels[t]}]"))
    rest = body[len("".join(labels[lo:t])) + len(labels[t]) + 2:]
    hi = next(hi for hi in range(t + 1, len(labels) + 1) if "".join(labels[t + 1:hi]) == rest)
    return lo, hi, col


def test_dashboard_contexts_histogram_and_logits(feat):
    path, run, stored, sae = feat
    a = stored.arrays
    alive = a["fires"] > 0
    f = by(a["density"], alive)[0]
    edges = a["hist_edges"].astype(np.float64)

    async def steps(press, view):
        dash = await press("b", "enter")  # b: the sidebar hidden (wider contexts)
        shown = {p: view.activations(p, f) for p in set(a["top_prompt"][f][:3].tolist())}
        table = await press("v")
        nxt = await press("v", "down")
        back = await press("escape")
        return dash, shown, table, nxt, back

    dash, shown, table, nxt, back = drive(path, steps)
    lines = dash.splitlines()
    assert lines[0].startswith(f"feature {f} fires {int(a['fires'][f]):,}")
    # the top context: its value, where, the best token in brackets, and the shading under each
    # token equal to the SAE's own encoding of that prompt
    p, t, v = int(a["top_prompt"][f, 0]), int(a["top_pos"][f, 0]), float(a["top_values"][f, 0])
    acts = sae.encode(run.activation(HOOK, p))[:, f]
    assert acts[t] == pytest.approx(v, rel=1e-4) and acts[t] == pytest.approx(float(a["max"][f]), rel=1e-4)
    np.testing.assert_allclose(shown[p], acts, rtol=1e-5, atol=1e-7)
    k = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith(f"{v:.3g} "))
    top, under = lines[k], lines[k + 1]
    assert under.lstrip().startswith(f"#{p}:{t} ")
    labels = [token_label(d.label, 12) for d in run.display_tokens(p)]
    assert f"[{labels[t]}]" in top
    lo, hi, col = _context_window(top, under, labels, p, t)
    assert lo < t and hi - lo >= 4
    x = col
    for j in range(lo, hi):
        if j == t:
            x += 1  # the bracket
        cells = under[x:x + cell_len(labels[j])]
        if acts[j] > 0:
            assert cells.strip() and " " not in cells, (j, cells)
        else:
            assert cells.strip() == "", (j, cells)
        if j == t:
            assert cells == "█" * len(cells)  # the feature's max: the full block
            x += 1
        x += cell_len(labels[j])
    # the histogram's span as one line of bars: a blank exactly where a bin is empty
    hist = a["hist"][f]
    nz = np.flatnonzero(hist)
    first, last = int(nz[0]), int(nz[-1])
    spark = next(ln for ln in lines if ln.startswith("hist "))
    lo_label, hi_label = f"{10 ** edges[first]:.2g}", f"{10 ** edges[last + 1]:.2g}"
    assert spark.startswith(f"hist {lo_label} ") and spark.rstrip().endswith(f" {hi_label}")
    bars = spark[len(f"hist {lo_label} "):len(spark.rstrip()) - len(hi_label) - 1]
    assert len(bars) == last - first + 1
    assert [c == " " for c in bars] == [hist[b] == 0 for b in range(first, last + 1)]
    assert bars[int(np.argmax(hist[first:last + 1]))] == "█"
    # v: the histogram as a table, a row per bin with its activation range and count
    for b in range(first, last + 1):
        label = f"{10 ** edges[b]:.3g}–{10 ** edges[b + 1]:.3g}"
        row = next(ln for ln in table.splitlines() if ln.lstrip().startswith(label))
        assert row.rstrip().endswith(f" {int(hist[b]):,}"), row
    assert sum(int(hist[b]) for b in range(first, last + 1)) == int(a["fires"][f])
    # the top promoted and suppressed tokens with their logits
    plus = next(ln for ln in lines if ln.startswith("+ "))
    minus = next(ln for ln in lines if ln.startswith("− "))
    for ln, ids, vals in ((plus, "promoted_ids", "promoted"), (minus, "suppressed_ids", "suppressed")):
        label = token_label(run.display_ids([int(a[ids][f, 0])])[0].label, 8)
        assert ln.startswith(f"+ {label} {a[vals][f, 0]:+.2f}" if ln is plus else f"− {label} {a[vals][f, 0]:+.2f}")
    # ↓ on the dashboard: the next feature of the list; Esc: back to the list, cursor on it
    g = by(a["density"], alive)[1]
    assert nxt.startswith(f"feature {g} ")
    assert "/64 features" in back.splitlines()[0] and rows(back)[1] == g


def test_fires_here_follows_the_focused_token(feat):
    path, run, _, sae = feat
    prompt, pos = 2, 5
    acts = sae.encode(run.activation(HOOK, prompt))[pos]
    want = [int(f) for f in np.argsort(-acts) if acts[f] > 0]
    assert len(want) >= 2

    async def steps(press, view):
        listed = await press("n", "n", *["right"] * pos)  # the app's keys: the focus moves
        here = await press("h")
        opened = await press("down", "enter")
        again = await press("escape")
        return listed, here, opened, again

    listed, here, opened, again = drive(path, steps)
    label = token_label(run.display_tokens(prompt)[pos].label, 16)
    assert f"fires at #{prompt}:{pos} {label}" in here
    ids, cursor = rows("\n".join(here.splitlines()[1:]))
    assert ids == want and cursor == want[0]
    for f in want:
        line = next(ln for ln in here.splitlines() if ln[1:].split()[:1] == [str(f)])
        assert f"{acts[f]:.3g}" in line
    # the line under the list says the same, strongest first
    at = listed.rstrip("\n").splitlines()[-1]
    assert at.startswith(f"at #{prompt}:{pos} ") and f": {want[0]} {acts[want[0]]:.3g}" in at
    # Enter on the second: its dashboard; Esc: back to the here pane
    assert opened.startswith(f"feature {want[1]} ")
    assert again.startswith(f"fires at #{prompt}:{pos}")


def test_view_registered_and_import_light(feat):
    import subprocess
    import sys

    from workbench.registries import build_views

    [view] = build_views().for_analysis("features")
    assert view.name == "feature-dashboard"
    code = ("import sys, workbench_plugins.features, workbench_plugins.sae; "
            "print('torch' in sys.modules, 'textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]



def test_dashboard_figure_draws_the_stored_feature(feat):
    """``workbench.show(run, "features", feature=f)``: the histogram, the top contexts and the
    logit effects drawn are the result's own arrays for that feature (the strongest by default),
    and the context labels end in the token at the stored position."""
    import workbench as wb

    _, run, stored, _ = feat
    a = stored.arrays
    strongest = int(np.argmax(a["max"]))
    fig = wb.show(run, "features", result=stored)
    hist_ax, ctx_ax, logit_ax = fig.axes[:3]
    assert hist_ax.get_title().startswith(f"feature {strongest}:")
    f = 3 if strongest != 3 else 4
    fig = wb.show(run, "features", result=stored, feature=f)
    hist_ax, ctx_ax, logit_ax = fig.axes[:3]
    heights = [p.get_width() for p in ctx_ax.patches]
    values = [float(v) for v, p in zip(a["top_values"][f], a["top_prompt"][f]) if p >= 0][:10]
    np.testing.assert_allclose(heights, values[::-1], rtol=1e-6)
    labels = [t.get_text() for t in ctx_ax.get_yticklabels()][::-1]
    for label, p, t in zip(labels, a["top_prompt"][f], a["top_pos"][f]):
        assert label.endswith("[" + run.display_tokens(int(p))[int(t)].label + "]")
    effects = sorted(p.get_width() for p in logit_ax.patches)
    want = sorted(np.concatenate([a["promoted"][f], a["suppressed"][f]]).astype(float).tolist())
    np.testing.assert_allclose(effects, want, rtol=1e-6)
    with pytest.raises(wb.UserError, match="does not exist"):
        wb.show(run, "features", result=stored, feature=10_000)
