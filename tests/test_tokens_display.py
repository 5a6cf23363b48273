"""Tokens as they are: byte-level pieces shown as their bytes with the characters they form,
special tokens by name, double-width characters taking two cells in every grid and the strip,
and generated text printed after a capture and by ``inspect``.

The fast tests use a synthetic run whose vocabulary holds byte pieces (SmolLM2's split of 你好
and 🍕), and the tiny models, whose tokenizer is byte-level (one token per UTF-8 byte); the
integration test runs SmolLM2 itself through ``workbench predict``.
"""

from __future__ import annotations

import asyncio
import functools
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from rich.cells import cell_len

import workbench
from tests import widgets
from workbench.cli import cli
from workbench.kit.shading import grid, short, token_label
from workbench.models.token_bytes import byte_decoder
from workbench.store import schema as S
from workbench.store.synthetic import WORDS, write_synthetic_run
from workbench.store.tokens_display import (
    DisplayToken,
    TokenTable,
    byte_groups,
    bytes_label,
    show_tokens,
)

plain = functools.partial(widgets.plain, width=120)

# SmolLM2's pieces: 你好 is E4 BD | A0 | E5 A5 | BD, 🍕 is F0 9F | 8D | 95.
PIECES = (b"\xe4\xbd", b"\xa0", b"\xe5\xa5", b"\xbd", b"\xf0\x9f", b"\x8d", b"\x95")
WHOLE = ("你好".encode(), "🍕".encode())  # tokens that are whole characters (two cells each)


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="workbench")


# --- the rule, on a table built by hand ------------------------------------------------------------


def test_bytes_label_shows_bytes_that_are_not_utf8():
    assert bytes_label(b"\xe4\xbd") == "<E4><BD>"
    assert bytes_label(b" \xe4") == " <E4>"
    assert bytes_label(b"ok\xf0\x9f\x8d\x95\x95") == "ok🍕<95>"
    assert bytes_label("你".encode()) == "你"


def _table(*extra: bytes, special: tuple[int, ...] = (0,)) -> TokenTable:
    return TokenTable.from_pieces([b"<s>", b" a", *extra], special)


def test_pieces_show_their_bytes_and_the_characters_they_form():
    table = _table(*PIECES)
    ids = [0, 2, 3, 4, 5]  # <s> 你好
    shown = show_tokens(ids, ["<s>", "�", "�", "�", "�"], table)
    assert [t.label for t in shown] == ["<s>", "<E4><BD>", "<A0>", "<E5><A5>", "<BD>"]
    assert [t.kind for t in shown] == ["special", "bytes", "bytes", "bytes", "bytes"]
    assert [t.chars for t in shown] == ["", "你", "你", "好", "好"]
    assert [t.span for t in shown] == [None, (1, 3), (1, 3), (3, 5), (3, 5)]
    assert shown[1].describe() == "<E4><BD> (part of 你, tokens 1-2)"
    assert byte_groups(shown) == [(1, 3), (3, 5)]
    assert table.text(ids[1:]) == "你好"
    pizza = show_tokens([1, 6, 7, 8], [" a", "�", "�", "�"], table)
    assert [t.label for t in pizza] == [" a", "<F0><9F>", "<8D>", "<95>"]
    assert {t.chars for t in pizza[1:]} == {"🍕"} and pizza[1].span == (1, 4)
    assert pizza[0] == DisplayToken(" a") and pizza[0].describe() == "' a'"  # clean: as today


def test_a_piece_straddling_two_characters_is_part_of_both():
    table = _table(b"\xe4\xbd", b"\xa0\xe5", b"\xa5", b"\xbd")
    shown = show_tokens([2, 3, 4, 5], ["�"] * 4, table)
    assert [t.chars for t in shown] == ["你", "你好", "好", "好"]
    assert byte_groups(shown) == [(0, 4)]
    # an incomplete character at the end forms nothing, and its bytes stay visible
    cut = show_tokens([2], ["�"], table)
    assert cut[0].chars == "" and cut[0].describe() == "<E4><BD> (bytes)"


def test_predictions_are_shown_each_on_its_own():
    table = _table(*PIECES)
    shown = show_tokens([6, 7, 8, 6], ["�"] * 4, table, sequence=False)
    assert [t.label for t in shown] == ["<F0><9F>", "<8D>", "<95>", "<F0><9F>"]
    assert all(t.chars == "" for t in shown)  # not neighbours: no characters across them


def test_special_tokens_are_named_even_when_they_decode_to_nothing():
    table = TokenTable.from_pieces([b"<|im_start|>", b"[CLS]", b"hi"], special=[0, 1])
    shown = show_tokens([0, 1, 2], ["", "", "hi"], table)
    assert [(t.label, t.kind) for t in shown] == [("<|im_start|>", "special"), ("[CLS]", "special"),
                                                  ("hi", "text")]
    assert shown[0].describe() == "<|im_start|> (special)"


def test_without_a_table_tokens_are_their_strings():
    assert [t.label for t in show_tokens([5, 6], ["�", " x"], None)] == ["�", " x"]


# --- cell widths ------------------------------------------------------------------------------------


def test_labels_are_cut_and_padded_by_terminal_cells():
    assert token_label("你好你好", 5) == "你好…" and cell_len(token_label("你好你好", 5)) <= 5
    assert token_label("🍕🍕🍕", 4) == "🍕…"
    assert token_label("a\x1bb", 10) == "a<1B>b"  # a control character as its byte
    assert cell_len(short("你好你好你好", 7)) <= 7


def test_grid_rows_are_equally_wide_with_double_width_labels():
    rows = ["<s>", "你好", "🍕", "<E4><BD>", " a", "你好你好你好你好"]
    values = np.tril(np.ones((len(rows), len(rows)), np.float32))
    text = grid(values, rows, rows, (2, 1), 80, 20, vmax=1.0)
    lines = text.plain.splitlines()[1:]
    assert len(lines) == len(rows)
    assert len({cell_len(line) for line in lines}) == 1, [cell_len(x) for x in lines]


# --- a run: stored bytes, the reader, the terminal UI ------------------------------------------------


@pytest.fixture
def byte_run(tmp_path):
    base = len(WORDS) + 1  # the synthetic vocabulary: <s>, the words, then the extra tokens
    pieces, whole, special = base, base + len(PIECES), base + len(PIECES) + len(WHOLE)
    prompts = [[special, *range(pieces, pieces + 4)],  # <|im_start|> 你好 as four pieces
               [0, 1, *range(pieces + 4, pieces + 7), 2],  # <s> the 🍕 cat
               [0, whole, whole + 1, 3, whole, 4]]  # whole characters: 你好 🍕 sat 你好 on
    return write_synthetic_run(tmp_path / "bytes.h5", extra_tokens=PIECES + WHOLE,
                               specials=("<|im_start|>",), prompts=prompts, n_heads=2)


def test_a_run_shows_its_tokens_without_the_tokenizer(byte_run):
    with workbench.open_run(byte_run) as run:
        assert run.prompts[0] == "你好" and run.str_tokens(0) == ["", "�", "�", "�", "�"]
        shown = run.display_tokens(0)
        assert [t.label for t in shown] == ["<|im_start|>", "<E4><BD>", "<A0>", "<E5><A5>", "<BD>"]
        assert [t.chars for t in shown] == ["", "你", "你", "好", "好"]
        assert [t.label for t in run.display_tokens(1)][2:5] == ["<F0><9F>", "<8D>", "<95>"]
        ids = run.tokens(0)
        assert [t.label for t in run.display_ids(ids[[1, 1, 0]])] == ["<E4><BD>", "<E4><BD>", "<|im_start|>"]
        assert run.display_ids([10**6])[0].label == f"#{10**6}"


def test_a_run_written_before_the_bytes_shows_its_strings(byte_run):
    with h5py.File(byte_run, "a") as f:
        for name in (S.VOCAB_BYTES, S.VOCAB_BYTES_OFFSETS, S.VOCAB_SPECIAL):
            del f[name]
    with workbench.open_run(byte_run) as run:
        assert run.token_table is None
        assert [t.label for t in run.display_tokens(0)] == run.str_tokens(0)


def test_terminal_ui_strip_info_line_grids_and_top_k(byte_run):
    from workbench.tui import make_app

    app = make_app([str(byte_run)])

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            await pilot.press("right")
            await pilot.pause()
            seen = {"strip": plain(app.query_one("#strip")), "info": plain(app.query_one("#info")),
                    "attention": plain(app.view_widget())}
            await pilot.press("3")
            await pilot.pause()
            seen["topk"] = plain(app.view_widget())
            await pilot.press("n", "n", "1")  # the prompt of whole CJK and emoji tokens
            await pilot.pause()
            seen["wide"] = plain(app.view_widget())
            await pilot.press("2")
            await pilot.pause()
            seen["residual"] = plain(app.view_widget())
            return seen

    seen = asyncio.run(main())
    assert "<|im_start|> <E4><BD> <A0> <E5><A5> <BD>" in seen["strip"]
    assert "<E4><BD> (part of 你, tokens 1-2)" in seen["info"]
    assert "<|im_start|>" in seen["attention"] and "<E5><A5>" in seen["attention"]
    for name, text in seen.items():
        assert "�" not in text and "''" not in text, (name, text)
    # the heatmap of whole CJK and emoji tokens: every row's label ends in the same column
    labels = ["<s>", "你好", "🍕", "·sat", "·on"]
    ends = []
    for line in seen["wide"].splitlines():
        label = next((x for x in labels if line.lstrip().startswith(x + " ")), None)
        rest = line.lstrip()[len(label) + 1:] if label else ""
        if label and rest.strip() and set(rest) <= set("░▒▓█◆ "):
            ends.append(cell_len(line[: line.index(label) + len(label)]))
    assert len(ends) == 6 and len(set(ends)) == 1, seen["wide"]


# --- the tiny models: byte-level tokenizers, through the command line ------------------------------


def test_tiny_tokenizer_bytes_match_gpt2s_table(tiny_models):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_decoder() == {c: b for b, c in bytes_to_unicode().items()}
    model = tiny_models["tiny-gpt2"]
    raw = model.vocab_bytes()
    ids = model.tokenize("你 🍕")
    assert b"".join(raw[i] for i in ids[1:]) == "你 🍕".encode()
    assert raw[model.bos_token_id] == b"<bos>" and model.bos_token_id in model.special_ids()


def test_capture_stores_the_bytes_and_the_special_tokens(tmp_path, tiny_models):
    out = tmp_path / "zh.h5"
    workbench.capture(tiny_models["tiny-gpt2"], ["你好", "🍕!"], out=out, progress=False)
    with workbench.open_run(out) as run:
        assert run.token_table is not None and len(run.token_table) == len(tiny_models["tiny-gpt2"].tokenizer)
        shown = run.display_tokens(0)
        assert [t.label for t in shown] == ["<bos>", "<E4>", "<BD>", "<A0>", "<E5>", "<A5>", "<BD>"]
        assert shown[0].kind == "special" and [t.chars for t in shown[1:]] == ["你"] * 3 + ["好"] * 3
        assert [t.chars for t in run.display_tokens(1)][1:] == ["🍕"] * 4 + [""]


@pytest.mark.parametrize("prompt, chars", [("你好", "你 = tokens 1-3 · 好 = tokens 4-6"),
                                           ("🍕", "🍕 = tokens 1-4")])
def test_predict_shows_bytes_and_characters_on_a_byte_tokenizer(prompt, chars):
    result = _cli("predict", prompt, "-m", "tiny-gpt2", "-k", "10")
    assert result.exit_code == 0, result.output
    assert "�" not in result.output and "<bos>│<" in result.output
    assert f"characters {chars}" in result.output
    data = json.loads(_cli("predict", prompt, "-m", "tiny-gpt2", "-k", "10", "--json").stdout)
    pred = data["predictions"][0]
    assert pred["display_tokens"][0] == "<bos>" and "�" not in "".join(pred["display_tokens"])
    assert all("�" not in t["display"] for t in pred["top"])


def test_capture_generate_prints_the_continuations_and_inspect_shows_them(tmp_path):
    out = tmp_path / "gen.h5"
    result = _cli("capture", "-m", "tiny-gpt2", "-p", "你好", "-p", "once", "--generate", "4",
                  "--seed", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    with workbench.open_run(out) as run:
        from workbench.store.tokens_display import generated_text

        texts = [generated_text(run, i) for i in range(2)]
        gen = run.tokens(0)[run.n_input_tokens(0):]
        assert len(gen) == 4 and texts[0] == run.token_table.text(gen.tolist())
    assert "generated  4 tokens after each prompt" in result.stdout
    assert f"[0] p0 '你好' → {texts[0]!r}" in result.stdout
    assert f"[1] p1 'once' → {texts[1]!r}" in result.stdout
    shown = _cli("inspect", str(out))
    assert f"[1] p1 'once' → {texts[1]!r}" in shown.output
    data = json.loads(_cli("inspect", str(out), "--json").stdout)
    assert [p["generated"] for p in data["first_prompts"]] == texts
    plain_run = tmp_path / "plain.h5"
    assert "generated" not in _cli("capture", "-m", "tiny-gpt2", "-p", "x", "-o", str(plain_run)).stdout
    assert "generated" not in json.loads(_cli("inspect", str(plain_run), "--json").stdout)["first_prompts"][0]


# --- SmolLM2 ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_predict_shows_chinese_and_emoji_pieces():
    for prompt, first, chars in (("你好", "<E4><BD>", "你 = tokens 0-1 · 好 = tokens 2-3"),
                                 ("🍕", "<F0><9F>", "🍕 = tokens 0-2")):
        result = _cli("predict", prompt, "-m", "smollm2-135m", "-k", "10")
        assert result.exit_code == 0, result.output
        assert "�" not in result.output, result.output
        assert first in result.output and f"characters {chars}" in result.output
    special = _cli("predict", "hi", "-m", "smollm2-135m", "--bos", "prepend", "--json")
    assert json.loads(special.stdout)["predictions"][0]["display_tokens"][0] == "<|im_start|>"
