"""Driving ``workbench serve`` from a real headless Chromium (Debian's ``chromium``, through
Playwright's Python package; Playwright never downloads a browser of its own here).

textual-serve's page draws the app with xterm.js on canvases, so the page's DOM holds no text.
What the terminal holds is read from xterm.js's buffer, the model its renderer paints each frame:
a script added before the page's own catches the ``Terminal`` when textual.js stores it
(``this.terminal = new Terminal(...)``) and keeps it as ``window.__wbTerminal``.
:func:`painted_colours` then checks pixels of a screenshot against the buffer's colours, so a
test knows the text was painted, not only received. Shared by tests/test_serve.py and
benchmarks/serve_bench.py. Linux only (processes and sockets are read from /proc).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 800}

CATCH_TERMINAL = """
Object.defineProperty(Object.prototype, 'terminal', {configurable: true, set(value) {
  Object.defineProperty(this, 'terminal', {value, writable: true, configurable: true, enumerable: true});
  if (value && value.buffer && typeof value.write === 'function') window.__wbTerminal = value;
}});
"""

SCREEN_JS = """() => {
  const t = window.__wbTerminal;
  if (!t) return null;
  const b = t.buffer.active, rows = [];
  for (let i = 0; i < t.rows; i++) {
    const l = b.getLine(b.viewportY + i);
    rows.push(l ? l.translateToString(true) : '');
  }
  return rows;
}"""

CELLS_JS = """([row, cols]) => {
  const t = window.__wbTerminal, line = t.buffer.active.getLine(t.buffer.active.viewportY + row);
  const box = t.element.querySelector('.xterm-screen').getBoundingClientRect();
  const w = box.width / t.cols, h = box.height / t.rows;
  return cols.map(c => { const cell = line.getCell(c);
    return {char: cell.getChars(), rgb: cell.isFgRGB() ? cell.getFgColor() : null,
            x: box.left + (c + 0.5) * w, y: box.top + (row + 0.5) * h}; });
}"""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (extra 'test')"
    try:
        import textual_serve  # noqa: F401
    except ImportError:
        return "textual-serve is not installed (extra 'serve')"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (Debian's chromium: apt-get install chromium)"
    if not Path("/proc/net/tcp").exists():
        return "needs Linux's /proc"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: list[Path], port: int, log: Path, *options: str,
                 timeout: float = 60) -> subprocess.Popen[bytes]:
    """``workbench serve RUNS --port PORT`` in a new process, once it answers on the port."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", *map(str, runs),
                                 "--port", str(port), *options],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"workbench serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"workbench serve did not listen on {port} in {timeout} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """Ctrl+C (SIGINT) to the server; its exit status (killed, with its group, if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    return proc.returncode


def launch(playwright: Any) -> Any:
    """Chromium, headless, with a fresh profile of its own (Playwright makes one per launch)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport=VIEWPORT)
    page.add_init_script(CATCH_TERMINAL)
    page.goto(url)
    return page


def screen(page: Any) -> list[str]:
    """The terminal's rows as text ([] before textual.js made its terminal)."""
    return page.evaluate(SCREEN_JS) or []


def wait_for_text(page: Any, needles: list[str], timeout: float = 30,
                  until: Callable[[list[str]], bool] | None = None) -> list[str]:
    """Poll the terminal until every needle is on screen (and ``until(rows)`` holds); its rows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = screen(page)
        text = "\n".join(rows)
        if all(n in text for n in needles) and (until is None or until(rows)):
            return rows
        if time.monotonic() > deadline:
            absent = [n for n in needles if n not in text]
            raise AssertionError(f"not on screen after {timeout} s: {absent or until}\n" + text)
        time.sleep(0.05)


def painted_colours(page: Any, png: bytes, row: int, cols: list[int]
                    ) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """For each column of a terminal row: its character, the buffer's foreground colour (0xRRGGBB,
    or None when not a true colour), and the screenshot's pixel at the cell's centre."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return [(c["char"], c["rgb"], image.getpixel((int(c["x"]), int(c["y"]))))
            for c in page.evaluate(CELLS_JS, [row, cols])]


# --- processes and sockets, from /proc -------------------------------------------------------

def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def app_processes(server: int) -> list[int]:
    """The server's children running ``workbench.cli tui``: one per visitor."""
    apps = []
    for pid in children(server):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"workbench.cli" in argv and b"tui" in argv:
            apps.append(pid)
    return apps


def memory(pid: int) -> dict[str, int]:
    """``rss`` and ``uss`` (private: what the process alone costs) in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def listening(port: int) -> list[str]:
    """The local addresses listening on TCP ``port`` (IPv4 and IPv6), as /proc/net spells them."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def ipv4(address: str) -> str:
    """/proc/net/tcp's little-endian hex address as dotted quad."""
    return socket.inet_ntoa(bytes.fromhex(address)[::-1])
