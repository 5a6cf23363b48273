"""Writing one benchmark's section of BENCHMARKS.md while keeping the other benchmarks' sections."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: str | Path, section: str) -> None:
    """Put ``section`` (text starting with its ``## Title`` line) into the markdown file ``path``:
    in place of the section with the same title, else at the end."""
    target = Path(path)
    head = section.split("\n", 1)[0]
    assert head.startswith("## "), head
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    body = section.rstrip("\n") + "\n"
    if head in text:
        before, _, rest = text.partition(head)
        after = rest.split("\n## ", 1)
        text = before + body + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    target.write_text(text)


def publish(lines: list[str], write: str | Path | None) -> None:
    """Print a benchmark's section (``lines``, starting with its ``## Title``) and, with
    ``write``, put it into that markdown file (:func:`replace_section`)."""
    section = "\n".join(lines) + "\n"
    print(section)
    if write:
        replace_section(write, section)
