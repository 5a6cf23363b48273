"""The run-diff view in the terminal UI (plugins/diff_view.py), driven in the app at 100 x 30.

Two synthetic runs over the same prompts: every token hook's activations are one seeded function
of (prompt, hook) in both, B's plus a little noise everywhere and a large change planted at one
hook, prompt and position; the runs' seeds differ, so their attention patterns and next-token
predictions differ everywhere. Run B lacks A's last prompt (not paired). What the view shows is
checked against numpy computed here from the two runs' stored activations, patterns and top-k
(relative L2, 1 − cos, Jensen–Shannon per head, the top-k KL), not against the view's code or the
stored result.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from rich.cells import cell_len

import workbench
from tests import widgets
from workbench.registries import analyze, build_analyses
from workbench.store.synthetic import synthetic_prompts, write_synthetic_run

PLANT_HOOK, PLANT_PROMPT, PLANT_POS = "blocks.1.hook_resid_post", 2, 4
LABEL_W = 14  # the heatmap's row labels, then a space, then 2 characters per position
SIZE = (100, 30)


def base(i, hook, acts):  # type: ignore[no-untyped-def]
    """Run A's activations (and B's before the change): seeded by prompt and hook only."""
    return np.random.default_rng([i, *hook.encode()]).normal(size=acts.shape)


def changed(i, hook, acts):  # type: ignore[no-untyped-def]
    x = base(i, hook, acts) + 0.01 * np.random.default_rng([99, i, *hook.encode()]).normal(size=acts.shape)
    if (i, hook) == (PLANT_PROMPT, PLANT_HOOK):
        x[PLANT_POS] += 3.0
    return x


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("diff-view")
    prompts = synthetic_prompts(5, seed=3, lo=7, hi=12)
    a = write_synthetic_run(folder / "a.h5", prompts=prompts, seed=1, n_layers=3, n_heads=3, top_k=10, edit=base)
    b = write_synthetic_run(folder / "b.h5", prompts=prompts[:4], seed=2, n_layers=3, n_heads=3, top_k=10,
                            edit=changed)
    with workbench.open_run(a) as run:
        [o] = analyze(run, [build_analyses().get("diff")], {"diff": {"other": str(b), "lens": "off"}})
    assert o.ok, o.stored.meta.get("traceback")
    ra, rb = workbench.open_run(a), workbench.open_run(b)
    yield a, ra, rb
    ra.close()
    rb.close()


# --- numpy, from the runs ------------------------------------------------------------------------


def token_hooks(run):  # type: ignore[no-untyped-def]
    return [h for h, s in run.hooks.items() if s.layout == "token"]


def rel_l2(ra, rb, hook, i):  # type: ignore[no-untyped-def]
    x, y = ra.activation(hook, i).astype(np.float64), rb.activation(hook, i).astype(np.float64)
    return np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)


def one_minus_cos(ra, rb, hook, i):  # type: ignore[no-untyped-def]
    x, y = ra.activation(hook, i).astype(np.float64), rb.activation(hook, i).astype(np.float64)
    return 1 - (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def js_heads(ra, rb, hook, i, q):  # type: ignore[no-untyped-def]
    """Per head, JS between the two runs' attention rows of query ``q`` (nats)."""
    p = ra.activation(hook, i)[:, q].astype(np.float64)
    r = rb.activation(hook, i)[:, q].astype(np.float64)
    m = (p + r) / 2

    def kl(u, v):  # type: ignore[no-untyped-def]
        return np.array([sum(a * np.log(a / b) for a, b in zip(uu, vv) if a > 0) for uu, vv in zip(u, v)])

    return (kl(p, m) + kl(r, m)) / 2


def kl_topk(ra, rb, i, t):  # type: ignore[no-untyped-def]
    """KL(A||B) over the tokens both top-k lists name, the rest of each pooled into one outcome."""
    ia, la = ra.top_k(i)
    ib, lb = rb.top_k(i)
    pb = dict(zip(ib[t].tolist(), np.exp(lb[t].astype(np.float64))))
    pairs = [(float(np.exp(x)), pb[k]) for k, x in zip(ia[t].tolist(), la[t].astype(np.float64)) if k in pb]
    pa = [u for u, _ in pairs] + [1 - sum(u for u, _ in pairs)]
    qb = [v for _, v in pairs] + [1 - sum(v for _, v in pairs)]
    return sum(u * np.log(u / v) for u, v in zip(pa, qb) if u > 0)


def label(hook):  # type: ignore[no-untyped-def]
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", hook)
    return f"{m.group(1)} {m.group(2)}" if m else hook.removeprefix("hook_")


# --- the app -------------------------------------------------------------------------------------


def drive(path, steps):  # type: ignore[no-untyped-def]
    """Open the app on run A's results at the planted prompt, await ``steps(press, view, app)``;
    ``press(*keys)`` presses them and returns the view as plain text (checked to fit its width)."""
    from workbench_plugins.diff_view import DiffView

    from workbench.tui import make_app

    app = make_app([str(path)], view="results", prompt=PLANT_PROMPT)

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=SIZE) as pilot:
            for _ in range(3):
                await pilot.pause()
            view = app.query_one(DiffView)

            async def press(*keys):  # type: ignore[no-untyped-def]
                for k in keys:
                    await pilot.press(k)
                await pilot.pause()
                text = widgets.plain(view, width=view.size.width)
                assert all(cell_len(ln.rstrip()) <= view.size.width for ln in text.splitlines()), text
                return text

            return await steps(press, view, app)

    return asyncio.run(main())


def heatmap(text):  # type: ignore[no-untyped-def]
    """The heatmap's cells: {(row label, position): characters}, and the focused (▼) position."""
    lines = text.splitlines()
    at = next(k for k, ln in enumerate(lines) if "▼" in ln)
    start = int(lines[at - 1][LABEL_W + 1 :].split()[0])  # the first tick is the window's start
    focused = start + (lines[at].index("▼") - LABEL_W - 1) // 2
    cells = {}
    for ln in lines[at + 1 :]:
        if ln.startswith("scale"):
            break
        row = ln[LABEL_W + 1 :]
        for c in range(len(row) // 2):
            cells[(ln[:LABEL_W].strip(), start + c)] = row[2 * c : 2 * c + 2]
    return cells, focused


def readout(text):  # type: ignore[no-untyped-def]
    """The focused token's table: {row label: (rel L2, 1 - cos)} as printed."""
    lines = text.splitlines()
    at = next(k for k, ln in enumerate(lines) if ln.split()[:3] == ["hook", "rel", "L2"])
    out = {}
    for ln in lines[at + 1 :]:
        m = re.match(r"\s*(.+?)\s+(\S+)\s+(\S+)(\s+█*)?\s*$", ln)
        if not m or ln.startswith("logit lens"):
            break
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def shows(printed, want):  # type: ignore[no-untyped-def]
    """``printed`` (4 decimals, or 3 significant digits below 1e-3) is ``want`` to its last digit;
    2e-7 more for the stored float32 cosine (1 − cos of nearly parallel vectors)."""
    exp = int(printed.split("e")[1]) - 2 if "e" in printed else -4
    return abs(float(printed) - want) <= 0.5 * 10.0**exp * 1.01 + 2e-7


def test_the_planted_change_is_the_hottest_cell(runs):
    path, ra, rb = runs
    hooks = token_hooks(ra)
    want = np.stack([rel_l2(ra, rb, h, PLANT_PROMPT) for h in hooks])
    assert np.unravel_index(np.argmax(want), want.shape) == (hooks.index(PLANT_HOOK), PLANT_POS)

    async def steps(press, view, app):  # type: ignore[no-untyped-def]
        return [await press(*["right"] * PLANT_POS), app.focus_state.pos]

    text, pos = drive(path, steps)
    assert pos == PLANT_POS
    assert f"prompt {PLANT_PROMPT} ↔ B {PLANT_PROMPT}" in text and "rel L2" in text
    cells, focused = heatmap(text)
    assert focused == PLANT_POS
    assert {label(h) for h in hooks} == {r for r, _ in cells}
    hottest = [k for k, v in cells.items() if v == "██"]
    assert hottest == [(label(PLANT_HOOK), PLANT_POS)], text
    assert all(v in ("░░", "  ") for k, v in cells.items() if k not in hottest)  # the noise: the lowest level
    top = want[hooks.index(PLANT_HOOK), PLANT_POS]
    m = re.search(rf"hottest: {label(PLANT_HOOK)} @ {PLANT_POS} \S+ = (\S+)", text)
    assert m and shows(m.group(1), top), text


def test_the_readout_follows_the_prompt_and_the_token(runs):
    path, ra, rb = runs
    hooks = token_hooks(ra)
    patterns = [h for h, s in ra.hooks.items() if s.layout == "square"]

    async def steps(press, view, app):  # type: ignore[no-untyped-def]
        shots = [(await press(*["right"] * PLANT_POS), app.focus_state.prompt, app.focus_state.pos)]
        shots.append((await press("n"), app.focus_state.prompt, app.focus_state.pos))
        shots.append((await press("right", "right"), app.focus_state.prompt, app.focus_state.pos))
        shots.append((await press("n"), app.focus_state.prompt, app.focus_state.pos))
        return shots

    shots = drive(path, steps)
    assert len({(i, p) for _, i, p in shots[:3]}) == 3  # three prompts or tokens in turn
    kls = []
    for text, i, pos in shots[:3]:
        assert f"prompt {i} ↔ B {i}" in text and f"position {pos} " in text
        got = readout(text)
        assert set(got) == {label(h) for h in hooks}, text
        for h in hooks:
            rel, cos = got[label(h)]
            assert shows(rel, rel_l2(ra, rb, h, i)[pos]) and shows(cos, one_minus_cos(ra, rb, h, i)[pos]), (h, rel, cos)
        kl = kl_topk(ra, rb, i, pos)
        kls.append(kl)
        assert shows(re.search(r"KL\(A‖B\) ≥ (\S+) \(top-k\)", text).group(1), kl)
        js = sorted(((float(v), layer, h) for layer, hook in enumerate(patterns)
                     for h, v in enumerate(js_heads(ra, rb, hook, i, pos))), reverse=True)
        v, layer, h = js[0]
        m = re.search(rf"at position {pos}: L{layer}H{h} (\S+)", text)
        assert m and shows(m.group(1), v), text
    assert any(k > 0 for k in kls)
    # the planted prompt's hottest cell, then the others' (their change is the noise)
    assert "hottest: 1 resid_post @ 4" in shots[0][0] and "hottest: 1 resid_post @ 4" not in shots[1][0]
    text, i, _ = shots[3]
    assert i == 4 and text.strip() == "prompt 4 is not paired (4 prompts are)"


def test_m_toggles_between_relative_l2_and_one_minus_cosine(runs):
    path, ra, rb = runs
    hooks = token_hooks(ra)

    async def steps(press, view, app):  # type: ignore[no-untyped-def]
        shots = [await press(*["right"] * PLANT_POS)]
        view.focus()
        shots.append(await press("m"))
        shots.append(await press("m"))
        return shots, view.measure

    (before, toggled, back), measure = drive(path, steps)
    assert measure == "rel_l2" and before == back
    assert "1 − cosine" in toggled and "1 − cosine" not in before
    cos = np.stack([one_minus_cos(ra, rb, h, PLANT_PROMPT) for h in hooks])
    k = hooks.index(PLANT_HOOK)
    assert np.unravel_index(np.argmax(cos), cos.shape) == (k, PLANT_POS)
    m = re.search(rf"hottest: {label(PLANT_HOOK)} @ {PLANT_POS} \S+ = (\S+)", toggled)
    assert m and shows(m.group(1), cos[k, PLANT_POS]), toggled
    cells, _ = heatmap(toggled)
    assert [c for c, v in cells.items() if v == "██"] == [(label(PLANT_HOOK), PLANT_POS)]
    # the most changed tokens are ranked by the measure shown, averaged over the hooks
    mean = cos.mean(axis=0)
    at = next(k for k, ln in enumerate(toggled.splitlines()) if ln.startswith("most changed tokens"))
    first = toggled.splitlines()[at + 2].split()
    assert int(first[0]) == np.argmax(mean) and shows(first[2], mean.max()), toggled
