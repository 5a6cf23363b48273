"""The terminal UI, driven by Textual's Pilot.

Values the app shows are checked against independent computations: TransformerLens'
``run_with_cache`` on a tiny model for the attention weight and residual norm under the cursor,
the model's own softmax for the top-k probabilities. Navigation, search, the live refresh of a run
still being written and running an analysis in the background are driven key by key.
"""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import workbench
from tests import widgets
from workbench import hookimpl
from workbench.analysis import Analysis, Result
from workbench.cli import cli
from workbench.store.synthetic import write_synthetic_run
from workbench.tui import make_app
from workbench.tui import render as R
from workbench.tui.results import GenericResultView
from workbench.tui.screens import HelpScreen

SIZE = (80, 24)


plain = functools.partial(widgets.plain, width=120)


def drive(app, steps, size=SIZE):  # type: ignore[no-untyped-def]
    """Run ``app`` headless and await ``steps(pilot)``; returns what it returns."""

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            return await steps(pilot)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_models):
    model = tiny_models["tiny-llama"]
    prompts = ["the cat sat on the mat", "hello world, again and again", "a b c"]
    out = tmp_path_factory.mktemp("tui") / "llama.h5"
    workbench.capture(model, prompts, hooks=["attention", "residual"], out=out, batch_size=2,
                      progress=False)
    return model, prompts, out


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic_run(tmp_path / "syn.h5", n_prompts=6, n_layers=2, n_heads=3, seed=3)


# --- what the views show, against TransformerLens ---------------------------------------------


def test_cursor_readouts_equal_run_with_cache(llama_run):
    model, prompts, out = llama_run
    tokens = torch.tensor([model.tokenize(prompts[0])])
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(tokens)
    app = make_app([str(out)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.press("right", "right", "right", "shift+right", "right_square_bracket",
                          "full_stop")
        await pilot.pause()
        attention = app.view_widget().readout()
        await pilot.press("2", "right_square_bracket", "right_square_bracket")
        await pilot.pause()
        residual = app.view_widget().readout()
        await pilot.press("3")
        await pilot.pause()
        return attention, residual, app.view_widget().readout()

    attention, residual, topk = drive(app, steps)
    expected = float(cache["blocks.1.attn.hook_pattern"][0, 1, 3, 1])
    assert attention.endswith(f": {expected:.4f}"), attention
    strs = model.str_tokens(model.tokenize(prompts[0]))
    assert attention.startswith(f"query 3 {strs[3]!r} → key 1 {strs[1]!r}")
    # rows of the residual view: embed, L0:pre?/post..., two steps down from the top
    labels, _ = R.residual_norms(workbench.open_run(out), 0)
    label = labels[2]
    layer = int(label[1:label.index(":")])
    point = {"pre": "hook_resid_pre", "mid": "hook_resid_mid", "post": "hook_resid_post"}[label.split(":")[1]]
    norm = float(cache[f"blocks.{layer}.{point}"][0, 3].norm())
    assert residual.startswith(f"{label} at 3 ") and math.isclose(
        float(residual.split("= ")[1]), norm, rel_tol=1e-3), (residual, norm)
    probs = torch.softmax(logits[0, 3].double(), -1)
    top = int(probs.argmax())
    # the top token as the UI shows it: a byte piece (the tiny tokenizer is byte-level) as <CD>
    shown = workbench.open_run(out).display_ids([top])[0].describe()
    assert topk.endswith(f"top {shown} {float(probs[top]):.4f}") and "�" not in topk, topk


def test_attention_grid_leaves_the_causal_mask_empty(llama_run):
    _, _, out = llama_run
    run = workbench.open_run(out)
    pattern = run.activation("blocks.0.attn.hook_pattern", 0)[0]
    text = R.grid(pattern, run.str_tokens(0), run.str_tokens(0), (0, 0), 200, 40, vmax=1.0).plain
    rows = text.splitlines()[1:]
    n = pattern.shape[0]
    assert len(rows) == n
    label_w = len(rows[0]) - 2 * n  # every row: label, then two characters per key
    assert (pattern[np.triu_indices(n, 1)] == 0).all() and (np.diag(pattern) > 0).all()
    for q, row in enumerate(rows):
        cells = row[label_w:]
        assert cells[2 * (q + 1):].strip() == "", f"row {q} shows weight above the diagonal"
        assert q == 0 or cells[2 * q : 2 * (q + 1)].strip(), f"row {q}: diagonal not shown"


def test_render_levels_and_windows():
    assert R.cell(0.0, 1.0).plain == "  "
    assert R.cell(1e-9, 1.0).plain == "░░"  # tiny but not zero: visible
    assert R.cell(1.0, 1.0).plain == "██"
    assert [R.level(v, 1.0) for v in (0.0, 0.5, 1.0)] == [0, 7, len(R.RAMP) - 1]
    w = R.Window.around(100, 95, 10)
    assert (w.start, w.stop) == (90, 100)
    w = R.Window.around(100, 50, 10)
    assert w.start <= 50 < w.stop and w.stop - w.start == 10
    assert R.token_label(" a\nb", 10) == "·a⏎b"
    assert R.token_label("abcdefghijkl", 5) == "abcd…"


# --- navigation ----------------------------------------------------------------------------------


def test_navigation_prompts_tokens_layers_heads(synthetic):
    run = workbench.open_run(synthetic)
    app = make_app([str(synthetic)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        f = app.focus_state
        seen = []
        await pilot.press("G")
        seen.append(f.pos)
        await pilot.press("right")  # clamps at the last token
        seen.append(f.pos)
        await pilot.press("g", "down", "down")  # the prompt list has focus
        seen.append(f.prompt)
        await pilot.press("n")
        seen.append(f.prompt)
        await pilot.press("p", "p")
        seen.append(f.prompt)
        await pilot.press("comma")  # head wraps backwards
        await pilot.pause()
        seen.append(app.view_widget().readout())
        header = plain(app.view_widget())
        seen.append(f.head)
        await pilot.press("left_square_bracket")
        seen.append(f.pattern)
        await pilot.press("i")
        await pilot.pause()
        strip = plain(app.query_one("#strip"))
        return seen, header, strip

    seen, header, strip = drive(app, steps)
    last = run.n_tokens(0) - 1
    assert seen[:5] == [last, last, 2, 3, 1]
    assert seen[6] == 2 and seen[7] == 1  # 3 heads: 0 - 1 -> 2; 2 patterns: 0 - 1 -> 1
    assert "head 2/2" in header
    tokens, ids = run.str_tokens(1), run.tokens(1)
    assert f"{R.token_label(tokens[0], 16)}₍{int(ids[0])}₎" in strip


def test_search_finds_tokens_across_prompts_and_wraps(synthetic):
    run = workbench.open_run(synthetic)
    target = " Paris"
    hits = [(i, p) for i in range(len(run)) for p, t in enumerate(run.str_tokens(i)) if "paris" in t.lower()]
    assert len(hits) >= 2
    app = make_app([str(synthetic)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        found = []
        for _ in range(len(hits) + 1):
            await pilot.press("slash")
            await pilot.pause()
            await pilot.press(*target.strip().lower(), "enter")
            await pilot.pause()
            found.append((app.focus_state.prompt, app.focus_state.pos))
        missing = app.find_token("no-such-token")
        return found, missing

    found, missing = drive(app, steps)
    assert found == hits + [hits[0]]
    assert not missing


def test_help_lists_every_key_and_the_palette_has_the_actions(synthetic):
    app = make_app([str(synthetic)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = plain(app.screen.query_one("#help-table"))
        await pilot.press("escape")
        commands = [c.title for c in app.get_system_commands(app.screen)]
        return text, commands

    text, commands = drive(app, steps)
    for binding in app.BINDINGS:
        assert binding.description in text, binding.description
    assert {"Run analysis…", "Find token…", "Export view as SVG", "Show Attention", "Keys"} <= set(commands)


def test_svg_export(synthetic, tmp_path):
    app = make_app([str(synthetic)], export_dir=tmp_path)

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.press("s")
        await pilot.pause()

    drive(app, steps)
    (svg,) = app.exported
    assert svg.parent == tmp_path and svg.name == "syn-attention-p0.svg"
    assert svg.read_text().lstrip().startswith("<svg") and "hook_pattern" in svg.read_text()


def test_several_runs_and_a_folder_of_runs(tmp_path, monkeypatch):
    a = write_synthetic_run(tmp_path / "a.h5", n_prompts=2, seed=1)
    b = write_synthetic_run(tmp_path / "b.h5", n_prompts=5, seed=2)
    monkeypatch.chdir(tmp_path)
    app = make_app([])
    assert [r.final_path.name for r in app.runs] == ["a.h5", "b.h5"]

    async def steps(pilot):  # type: ignore[no-untyped-def]
        app.query_one("#runs").focus()
        await pilot.press("down")
        await pilot.pause()
        return app.active_run.final_path, app.sub_title

    path, sub = drive(app, steps)
    assert path.name == b.name and sub.startswith("5/5 prompts")
    assert a.exists()


# --- live runs -----------------------------------------------------------------------------------


def test_prompts_appear_while_the_capture_writes(tmp_path):
    out = tmp_path / "live.h5"
    writer = subprocess.Popen([sys.executable, "-m", "workbench.store.synthetic", str(out),
                               "--prompts", "10", "--delay", "0.4"])
    try:
        partial = out.with_name("live.h5.partial")
        deadline = time.monotonic() + 30
        while not partial.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        app = make_app([str(partial)], poll=0.1)

        async def steps(pilot):  # type: ignore[no-untyped-def]
            counts = []
            end = time.monotonic() + 30
            while time.monotonic() < end:
                await pilot.pause(0.2)
                counts.append(app._listed)
                # reopened under its final name by the poll, which sets the title in the same step
                # (the live status alone can turn complete between two polls)
                if not app.active_run.is_partial:
                    break
            return counts, app.active_run.status, app.sub_title

        counts, status, sub = drive(app, steps)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert counts == sorted(counts) and len(set(counts)) >= 3, counts  # rose on its own, in steps
    assert counts[-1] == 10 and status == "complete" and sub == "10/10 prompts"


# --- analyses ------------------------------------------------------------------------------------


RELEASE_SLOW = threading.Event()  # the slow analysis finishes only once this is set


class SlowPlugin:
    """An analysis that takes about a second, reports progress and then waits for
    :data:`RELEASE_SLOW` (so a loaded machine cannot let it finish before the test looks), and a
    third-party view."""

    @hookimpl
    def register_analyses(self, register):  # type: ignore[no-untyped-def]
        def compute(ctx):  # type: ignore[no-untyped-def]
            total = 0
            for i in ctx.prompts:
                time.sleep(0.15)
                total += ctx.run.n_tokens(i)
                ctx.progress(i + 1, ctx.n_prompts)
            RELEASE_SLOW.wait(60)
            return Result(data={"tokens": total}, arrays={"per_prompt": np.arange(ctx.n_prompts, dtype=np.float64)})

        register(Analysis(name="slow-count", description="counts tokens, slowly", version="1",
                          compute=compute))

    @hookimpl
    def register_views(self, register):  # type: ignore[no-untyped-def]
        from workbench import View

        def make(stored, run):  # type: ignore[no-untyped-def]
            from textual.widgets import Static

            class TokenCount(Static):
                pass

            return TokenCount(f"{stored.data['tokens']} tokens in {len(run)} prompts", id="token-count")

        register(View(name="slow-count-view", analysis="slow-count", title="Token count", make=make))


def test_analysis_runs_in_the_background_and_its_view_appears(synthetic, workbench_register_plugin):
    workbench_register_plugin(SlowPlugin(), name="slow")
    RELEASE_SLOW.clear()
    run = workbench.open_run(synthetic)
    expected_tokens = sum(run.n_tokens(i) for i in range(len(run)))
    app = make_app([str(synthetic)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.press("a")
        await pilot.pause()
        picker = app.screen
        names = [picker.query_one("#analysis-list").get_option_at_index(k).id
                 for k in range(picker.query_one("#analysis-list").option_count)]
        index = names.index("slow-count")
        app.screen.query_one("#analysis-list").highlighted = index
        await pilot.press("enter")
        await pilot.pause(0.3)
        running = [w for w in app.workers if w.group == "analysis" and not w.is_finished]
        moved = []
        for _ in range(3):  # the UI answers keys while the analysis runs
            before = app.focus_state.pos
            await pilot.press("right")
            moved.append(app.focus_state.pos - before)
        label = plain(app.query_one("#progress-label"))
        still_running = bool(running) and not running[0].is_finished
        RELEASE_SLOW.set()
        await app.workers.wait_for_complete()
        await pilot.pause(0.2)
        shown = app.query("#token-count")
        return (names, still_running, moved, label, app.active_view(),
                plain(shown.first()).strip() if shown else None)

    names, still_running, moved, label, view, shown = drive(app, steps)
    assert "slow-count" in names and "next-token" in names
    assert still_running and moved == [1, 1, 1]
    assert label.startswith("slow-count: ")
    assert view == "results"
    assert shown == f"{expected_tokens} tokens in 6 prompts"
    assert workbench.result(run, "slow-count").data["tokens"] == expected_tokens


def test_results_without_a_view_use_the_generic_view(synthetic):
    from workbench.registries import analyze, build_analyses

    with workbench.open_run(synthetic) as run:
        (outcome,) = analyze(run, [build_analyses().get("next-token")])
        assert outcome.ok
        mean_loss = outcome.stored.data["mean_loss"]
    app = make_app([str(synthetic)], view="results")

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.pause()
        return [plain(w) for w in app.query(GenericResultView)]

    (text,) = drive(app, steps)
    assert "next-token" in text and f"{mean_loss:.6g}" in text and "prompt_mean_loss" in text


# --- the real app in a terminal ------------------------------------------------------------------


def test_first_screen_imports_neither_torch_nor_transformer_lens(synthetic):
    code = (
        "import asyncio, sys\n"
        "from workbench.tui import make_app\n"
        f"app = make_app([{str(synthetic)!r}])\n"
        "async def main():\n"
        "    async with app.run_test(size=(80, 24)) as pilot:\n"
        "        await pilot.pause()\n"
        "        await pilot.press('right', '2', '3', '4', '5')\n"
        "        await pilot.pause()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _workbench() -> str:
    return str(Path(sys.executable).with_name("workbench"))


def test_smoke_real_app_in_a_pseudo_terminal(synthetic):
    """Start ``workbench tui`` on a pseudo-terminal, as a user's shell would, read what it draws,
    press keys, quit."""
    import os
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the app, 80x24
        os.environ.update(TERM="xterm-256color", COLUMNS="80", LINES="24")
        os.execv(_workbench(), [_workbench(), "tui", str(synthetic)])
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    seen = b""

    def read_until(needle: bytes, timeout: float) -> bool:
        nonlocal seen
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    return needle in seen
                if needle in seen:
                    return True
        return needle in seen

    try:
        assert read_until(b"hook_pattern", 30), seen[-2000:]
        assert read_until(b"query 0", 5)
        os.write(fd, b"\x1b[C")  # right arrow
        assert read_until(b"query 1", 10), seen[-2000:]
        os.write(fd, b"q")
        end = time.monotonic() + 10
        status = None
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            read_until(b"\x00", 0.1)
        assert status is not None and os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.mark.skipif(subprocess.run(["which", "tmux"], capture_output=True, check=False).returncode != 0,
                    reason="tmux is not installed")
def test_smoke_in_tmux_reads_the_screen(synthetic, tmp_path):
    session = f"wb-{time.monotonic_ns()}"
    run = ["tmux", "-L", session]
    subprocess.run([*run, "new-session", "-d", "-s", "t", "-x", "80", "-y", "24",
                    f"TERM=xterm-256color {_workbench()} tui {synthetic}"], check=True)
    try:
        def screen() -> str:
            return subprocess.run([*run, "capture-pane", "-p", "-t", "t"], capture_output=True,
                                  text=True, check=False).stdout

        end = time.monotonic() + 30
        while "hook_pattern" not in screen() and time.monotonic() < end:
            time.sleep(0.2)
        first = screen()
        assert "blocks.0.attn.hook_pattern" in first and "query 0" in first
        lines = first.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        subprocess.run([*run, "send-keys", "-t", "t", "Right", "3"], check=True)
        end = time.monotonic() + 10
        while "next token after 1" not in screen() and time.monotonic() < end:
            time.sleep(0.2)
        assert "next token after 1" in screen()
    finally:
        subprocess.run([*run, "kill-server"], capture_output=True, check=False)


# --- command line --------------------------------------------------------------------------------


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), prog_name="workbench")


def test_tui_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("tui")
    assert r.exit_code == 2 and "no runs here" in r.output and len(r.output.strip().splitlines()) == 1
    r = invoke("tui", str(tmp_path / "missing.h5"))
    assert r.exit_code == 2 and "no such run" in r.output
    (tmp_path / "bad.h5").write_text("not hdf5")
    r = invoke("tui", str(tmp_path / "bad.h5"))
    assert r.exit_code == 2 and "not a workbench run" in r.output


def test_plot_writes_images(llama_run, tmp_path):
    _, _, out = llama_run
    png = tmp_path / "a.png"
    r = invoke("plot", str(out), "--layer", "1", "--head", "2", "-o", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "n.svg"
    r = invoke("plot", str(out), "--kind", "residual", "--prompt", "1", "-o", str(svg))
    assert r.exit_code == 0 and "<svg" in svg.read_text()


@pytest.mark.parametrize("args, message", [
    (["--head", "9"], "head 9 does not exist"),
    (["--layer", "7"], "no attention pattern of layer 7"),
    (["--prompt", "5"], "prompt 5 is not in this run"),
    (["--hook", "blocks.0.attn.hook_patern"], "did you mean blocks.0.attn.hook_pattern"),
])
def test_plot_user_errors(llama_run, tmp_path, args, message):
    _, _, out = llama_run
    r = invoke("plot", str(out), *args, "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_says_how_to_install(llama_run, tmp_path, monkeypatch):
    _, _, out = llama_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = invoke("plot", str(out), "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "pip install 'workbench[plot]'" in r.output


def test_long_runs_are_listed_a_page_at_a_time(tmp_path, monkeypatch):
    import workbench.tui.app as app_module

    monkeypatch.setattr(app_module, "PAGE", 4)
    path = write_synthetic_run(tmp_path / "long.h5", n_prompts=10, seed=5)
    run = workbench.open_run(path)
    app = make_app([str(path)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        seen = []
        for _ in range(5):
            await pilot.press("n")
            seen.append((app.focus_state.prompt, app.query_one("#prompts").option_count,
                         plain(app.query_one("#prompts-label")).strip()))
        await pilot.press("p")
        seen.append((app.focus_state.prompt, None, plain(app.query_one("#prompts-label")).strip()))
        await pilot.press("up")  # inside the page, the list itself moves
        seen.append((app.focus_state.prompt, None, None))
        return seen, plain(app.query_one("#strip"))

    seen, strip = drive(app, steps)
    assert seen[:5] == [(1, 4, "prompts 0–3 of 10"), (2, 4, "prompts 0–3 of 10"),
                        (3, 4, "prompts 0–3 of 10"), (4, 4, "prompts 4–7 of 10"),
                        (5, 4, "prompts 4–7 of 10")]
    assert seen[5] == (4, None, "prompts 4–7 of 10")
    assert seen[6][0] == 7  # arrows stay within the page (the list wraps); n / p cross pages
    assert "".join(R.token_label(t, 16) + " " for t in run.str_tokens(7)).strip() in strip


def test_encoder_decoder_cross_attention_view(tmp_path, tiny_models):
    model = tiny_models["tiny-t5"]
    out = tmp_path / "t5.h5"
    workbench.capture(model, [{"prompt": "translate this please", "target": "das hier"}],
                      hooks=["attention"], out=out, progress=False)
    run = workbench.open_run(out)
    hooks = R.pattern_hooks(run)
    cross = next(k for k, h in enumerate(hooks) if "cross" in h)
    app = make_app([str(out)])

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.press("right", *["right_square_bracket"] * cross, "shift+right", "shift+right")
        await pilot.pause()
        return plain(app.view_widget()), app.view_widget().readout()

    text, readout = drive(app, steps)
    name = hooks[cross]
    pattern = run.activation(name, 0)
    q_tokens, k_tokens = run.axis_tokens(name, 0)[1:]
    assert name in text and "cross-attention" in text
    q = min(1, len(q_tokens) - 1)
    assert readout == f"query {q} {q_tokens[q]!r} → key 2 {k_tokens[2]!r}: {float(pattern[0, q, 2]):.4f}"


# --- results: the selection, keys without the mouse, views that follow the focus ------------------


@pytest.fixture(scope="module")
def results_run(tmp_path_factory, tiny_models):
    """A tiny-Llama run with results of head-roles (a view with a table and a look panel that
    follows the focus) and next-token (no view: the generic one)."""
    from workbench.registries import analyze, build_analyses

    model = tiny_models["tiny-llama"]
    out = tmp_path_factory.mktemp("tui-results") / "roles.h5"
    workbench.capture(model, ["the cat sat on the mat", "a b c a b c"], hooks=["attention", "residual"],
                      out=out, progress=False)
    with workbench.open_run(out) as run:
        outcomes = analyze(run, [build_analyses().get(a) for a in ("head-roles", "next-token")],
                           {"head-roles": {"seqs": 2}}, model=model)
        assert all(o.ok for o in outcomes)
    return out


def _entry(app, analysis):  # type: ignore[no-untyped-def]
    from workbench.tui.results import ResultsPanel

    return next(k for k, (s, _) in enumerate(app.query_one(ResultsPanel).entries) if s.analysis == analysis)


def _notes(app):  # type: ignore[no-untyped-def]
    """Record the app's notifications (error toasts included)."""
    seen: list[tuple[str, str]] = []
    notify = app.notify

    def record(message, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((kwargs.get("severity", "information"), message))
        return notify(message, **kwargs)

    app.notify = record
    return seen


def test_results_mark_the_entry_on_screen_and_tab_reaches_the_views_keys(results_run):
    from textual.widgets import DataTable
    from workbench_plugins.attention_view import HeadRolesView

    from workbench.tui.results import ResultsPanel

    app = make_app([str(results_run)], view="results")

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.pause()
        panel = app.query_one(ResultsPanel)
        listing = panel.query_one("#result-list")

        def marked():  # type: ignore[no-untyped-def]
            return [k for k in range(listing.option_count)
                    if str(listing.get_option_at_index(k).prompt).startswith(ResultsPanel.MARK)]

        seen = {"first": marked()}
        await pilot.press("tab")  # from the prompt list to the results list
        seen["list focused"] = app.focused is listing
        roles, generic = _entry(app, "head-roles"), _entry(app, "next-token")
        while listing.highlighted != roles:
            await pilot.press("down")
        await pilot.pause()
        seen["roles marked"] = marked() == [roles]
        view = app.query_one(HeadRolesView)
        await pilot.press("tab")  # straight into the view's table: its keys work
        seen["table focused"] = isinstance(app.focused, DataTable) and app.focused in view.query(DataTable)
        before = view.sort_by
        await pilot.press("o")
        seen["sorted"] = (before, view.sort_by)
        await pilot.press("shift+tab")
        seen["back"] = app.focused is listing
        while listing.highlighted != generic:
            await pilot.press("down")
        await pilot.pause()
        seen["generic marked"] = marked() == [generic]
        await pilot.press("tab")  # a view without a focusable widget: its scrolling body
        seen["body focused"] = app.focused is panel.query_one("#result-body")
        return seen

    seen = drive(app, steps, size=(120, 40))
    assert seen["first"] == [0] and seen["list focused"] and seen["roles marked"], seen
    assert seen["table focused"] and seen["sorted"] == ("induction", "first_token"), seen
    assert seen["back"] and seen["generic marked"] and seen["body focused"], seen


def test_a_view_being_swapped_out_or_in_follows_quietly(results_run):
    """'b' (and any focus change) while the results panel swaps a head-roles view out used to ask
    the half-removed view to follow (Textual removes the look panel before the view itself):
    'view HeadRolesView failed to follow the focus: NoMatches(... LookPanel ...)'."""
    from textual import events
    from workbench_plugins.attention_view import HeadRolesView, LookPanel

    app = make_app([str(results_run)], view="results")
    notes = _notes(app)

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.pause()
        listing = app.query_one("#result-list")
        listing.focus()
        roles, other = _entry(app, "head-roles"), _entry(app, "next-token")
        step = "down" if other > roles else "up"
        back = "up" if step == "down" else "down"
        for _ in range(3):
            listing.highlighted = roles
            await pilot.pause()
            for k in [step] * abs(other - roles) + ["b", "right"]:  # no pause: mid-swap
                app.post_message(events.Key(k, None))
            for k in [back] * abs(other - roles) + ["b", "left"]:  # and back in, mid-mount
                app.post_message(events.Key(k, None))
            await pilot.pause(0.3)
        await pilot.press("right", "right")
        await pilot.pause()
        return app.query_one(HeadRolesView).query_one(LookPanel).shown, app.focus_state.pos

    shown, pos = drive(app, steps, size=(120, 40))
    assert [n for n in notes if n[0] == "error"] == []
    assert shown == (0, pos) and pos == 2  # the view on screen still follows the focus


def test_follow_before_compose_is_a_no_op(results_run):
    from workbench_plugins.attention_view import AttendsToView, HeadRolesView

    from workbench.store.results import list_results
    from workbench.tui.state import Focus

    with workbench.open_run(results_run) as run:
        stored = next(s for s in list_results(run) if s.analysis == "head-roles")
        for view in (HeadRolesView(stored, run), AttendsToView(stored, run)):
            view.follow(run, Focus(prompt=0))  # not composed: nothing to update, no error


class FailingFollowPlugin:
    """A view whose ``follow`` has a real bug."""

    @hookimpl
    def register_analyses(self, register):  # type: ignore[no-untyped-def]
        register(Analysis(name="follow-bug", description="a result", version="1",
                          compute=lambda ctx: Result(data={"n": len(ctx.run)})))

    @hookimpl
    def register_views(self, register):  # type: ignore[no-untyped-def]
        from workbench import View

        def make(stored, run):  # type: ignore[no-untyped-def]
            from textual.widgets import Static

            class Buggy(Static):
                def follow(self, run, focus):  # type: ignore[no-untyped-def]
                    raise RuntimeError("a bug in the view")

            return Buggy("buggy")

        register(View(name="follow-bug-view", analysis="follow-bug", title="buggy", make=make))


def test_a_view_with_a_real_bug_is_reported_once_and_logged(synthetic, workbench_register_plugin, caplog):
    from workbench.registries import analyze, build_analyses

    workbench_register_plugin(FailingFollowPlugin(), name="follow-bug")
    with workbench.open_run(synthetic) as run:
        analyze(run, [build_analyses().get("follow-bug")])
    app = make_app([str(synthetic)], view="results")
    notes = _notes(app)

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.pause()
        shown = len(notes)
        await pilot.press("right", "right")  # not asked again
        await pilot.pause()
        return shown

    with caplog.at_level("ERROR", logger="workbench.tui.app"):
        shown = drive(app, steps)
    errors = [m for s, m in notes if s == "error"]
    assert errors and len(notes) == shown
    assert all(m == "view Buggy failed to follow the focus: RuntimeError('a bug in the view')" for m in errors)
    records = [r for r in caplog.records if "failed to follow" in r.getMessage()]
    assert len(records) == len(errors) and all(r.exc_info and "a bug in the view" in str(r.exc_info[1])
                                               for r in records)


def test_run_view_shows_the_installed_transformer_lens_version(llama_run):
    """TransformerLens 4 has no ``__version__``: the capture records the package's version."""
    from importlib.metadata import version

    _, _, out = llama_run
    expected = version("transformer-lens")
    assert workbench.open_run(out).capture_settings.versions["transformer_lens"] == expected
    app = make_app([str(out)], view="info")

    async def steps(pilot):  # type: ignore[no-untyped-def]
        await pilot.pause()
        return plain(app.view_widget())

    text = drive(app, steps, size=(160, 40))
    assert f"transformer_lens {expected}" in text, text
