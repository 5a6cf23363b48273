"""``workbench serve``: the terminal UI in a real headless Chromium (Debian's ``chromium``, driven
by Playwright; the browser tests skip with the reason where either is missing). The page's
terminal is read from xterm.js's buffer and a screenshot's pixels are checked against it
(tests/browser.py); what it must show comes from the run itself (tokens and attention weights
read through the store), not from the UI's code."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

import workbench
from tests import browser as B
from tests.clitools import run_cli
from workbench.store.synthetic import write_synthetic_run

HOOK = "blocks.0.attn.hook_pattern"
WHY = B.missing()
needs_browser = pytest.mark.skipif(WHY is not None, reason=f"browser test: {WHY}")
try:
    import textual_serve  # noqa: F401
except ImportError:
    needs_serve = pytest.mark.skip(reason="textual-serve is not installed (extra 'serve')")
else:
    needs_serve = pytest.mark.skipif(False, reason="")


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("serve") / "syn.h5", n_prompts=3, n_layers=2,
                               n_heads=2, seed=3)


@pytest.fixture(scope="module")
def browser():
    if WHY is not None:
        pytest.skip(f"browser test: {WHY}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = B.launch(pw)
        yield chromium
        chromium.close()


def expected(run_path: Path, prompt: int = 0) -> tuple[list[str], np.ndarray]:
    """A prompt's tokens as the strip spells them (a leading space as ·) and head 0's pattern."""
    with workbench.open_run(run_path) as run:
        tokens = [t.replace(" ", "·") for t in run.str_tokens(prompt)]
        pattern = np.asarray(run.activation(HOOK, prompt))[0]
    return tokens, pattern


@needs_browser
def test_page_paints_the_token_strip_and_the_attention_heatmap(run_path, browser, tmp_path):
    tokens, pattern = expected(run_path)
    port = B.free_port()
    server = B.start_server([run_path], port, tmp_path / "serve.log")
    try:
        assert [B.ipv4(a) for a in B.listening(port)] == ["127.0.0.1"]  # loopback only, no IPv6
        page = B.open_page(browser, f"http://127.0.0.1:{port}/")
        strip_text = " ".join(tokens)

        def grid_of(rows: list[str]) -> list[str] | None:
            """The heatmap's rows, once all are drawn: one per query, labelled with its token."""
            title = next((i for i, r in enumerate(rows) if HOOK in r), None)
            grid = rows[title + 2:title + 2 + len(tokens)] if title is not None else []
            ok = len(grid) == len(tokens) and all(f"{t} " in r for r, t in zip(grid, tokens))
            return grid if ok else None

        rows = B.wait_for_text(page, [strip_text, f"{HOOK}  [1/2]  head 0/1", "query 0 <s>"],
                               until=lambda rows: grid_of(rows) is not None)
        assert "syn.h5" in rows[0]
        strip = next(r for r in rows if strip_text in r)
        title = next(i for i, r in enumerate(rows) if HOOK in r)
        grid = grid_of(rows)
        assert grid is not None
        # two cells per key; the causal mask (the weights above the diagonal are exactly 0)
        # leaves the rest of each row empty
        start = strip.index("<s>")  # the views share the strip's left edge
        label_end = grid[1].index(tokens[1]) + len(tokens[1]) + 1
        for q, (row, token) in enumerate(zip(grid, tokens)):
            assert row[start:label_end].strip() == token
            cells = row[label_end:]
            assert np.count_nonzero(pattern[q]) == q + 1
            if q:  # row 0 holds the cursor's mark instead
                assert len(cells.rstrip()) == 2 * (q + 1), row
        png = page.screenshot(path=str(tmp_path / "serve.png"))
        # the shading was painted: each full-block cell's pixel is the colour the buffer holds
        full = [(title + 2 + q, [label_end + c for c, ch in enumerate(row[label_end:]) if ch == "█"])
                for q, row in enumerate(grid)]
        checked = 0
        for r, cols in full:
            for char, rgb, pixel in B.painted_colours(page, png, r, cols):
                assert char == "█" and rgb is not None
                want = ((rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255)
                assert max(abs(a - b) for a, b in zip(pixel, want)) <= 8, (r, char, want, pixel)
                checked += 1
        assert checked >= 3
        page.locator(".xterm-screen").click()  # keys reach the app: n is the next prompt
        page.keyboard.press("n")
        B.wait_for_text(page, ["prompt 2/3", " ".join(expected(run_path, 1)[0])])
        page.close()
    finally:
        assert B.stop(server) == 0


@needs_browser
def test_each_visitor_gets_its_own_app_and_ctrl_c_ends_them(run_path, browser, tmp_path):
    tokens, _ = expected(run_path)
    port = B.free_port()
    server = B.start_server([run_path], port, tmp_path / "serve.log")
    try:
        assert B.app_processes(server.pid) == []  # none until a page connects
        pages = [B.open_page(browser, f"http://127.0.0.1:{port}/") for _ in range(2)]
        for page in pages:
            B.wait_for_text(page, [" ".join(tokens)])
        apps = B.app_processes(server.pid)
        assert len(apps) == 2
        pages[0].close()  # its app ends with its page
        deadline = time.monotonic() + 15
        while len(B.app_processes(server.pid)) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        left = B.app_processes(server.pid)
        assert len(left) == 1 and left[0] in apps
    finally:
        code = B.stop(server)
    assert code == 0
    assert not Path(f"/proc/{left[0]}").exists()  # Ctrl+C ended the remaining visitor's app
    assert B.listening(port) == []


@needs_serve
def test_a_port_in_use_is_one_line(run_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(run_path), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"workbench: error: --port {port}: already in use on 127.0.0.1; choose another"]


@needs_serve
def test_a_run_that_cannot_be_opened_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    for path in (bad, tmp_path / "missing.h5"):
        result = run_cli("serve", str(path), "--port", str(B.free_port()))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("workbench: error: ") and path.name in lines[0], lines
