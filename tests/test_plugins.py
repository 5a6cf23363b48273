"""The plugin layer: discovery, isolation, misspellings, duplicates, restriction, commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench import Analysis, hookimpl, hookspecs
from workbench.registries import build_analyses
from workbench.errors import UserError
from workbench.plugins import HOOK_NAMES, make_plugin_manager, plugin_manager, report_of

REPO = Path(__file__).resolve().parents[1]


def _analysis(name: str, value: int = 1) -> Analysis:
    return Analysis(name=name, description="test", version="1", compute=lambda ctx: {"value": value})


def _cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True,
                          text=True, env=full, check=check, cwd=REPO)


def test_every_hookspec_is_typed_and_documented():
    docs = (REPO / "docs" / "writing-plugins.md").read_text()
    assert set(HOOK_NAMES) == {"register_models", "register_analyses", "register_views", "register_commands"}
    for name in HOOK_NAMES:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and ":param" in fn.__doc__, f"{name} has no docstring with :param"
        assert fn.__annotations__, f"{name} is not typed"
        args = ", ".join(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        assert re.search(rf"^### `{name}\({args}\)`", docs, re.MULTILINE), f"docs/writing-plugins.md lacks ### `{name}({args})`"



def test_every_public_name_of_the_view_kit_is_documented():
    import workbench.kit as kit

    docs = (REPO / "docs" / "writing-plugins.md").read_text()
    assert "\n## The view kit\n" in docs, "docs/writing-plugins.md lacks the section '## The view kit'"
    section = docs.split("\n## The view kit\n", 1)[1].split("\n## ", 1)[0]
    assert len(set(kit.__all__)) == len(kit.__all__)
    for name in kit.__all__:
        assert getattr(kit, name) is not None
        assert re.search(rf"^- `{re.escape(name)}\b", section, re.MULTILINE), \
            f"docs/writing-plugins.md, 'The view kit', lacks an item - `{name}...`"


def test_importing_the_view_kit_loads_neither_torch_nor_textual():
    code = ("import sys, workbench.kit\n"
            "print(sorted(m for m in ('torch', 'textual', 'workbench.tui') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_our_plugins_load_through_entry_points_like_anyone_elses():
    report = report_of(plugin_manager())
    build_analyses()
    for name, analysis in (("next_token", "next-token"), ("answer", "answer")):
        info = report.plugins[name]
        assert info.source == "entry point" and info.loaded and info.version
        assert analysis in info.analyses


def test_plugins_json_lists_everything_without_importing_torch():
    code = textwrap.dedent("""
        import sys
        from workbench.cli import main
        try:
            main(["plugins", "--json"])
        except SystemExit as e:
            assert e.code == 0, e.code
        heavy = [m for m in ("torch", "transformer_lens", "transformers") if m in sys.modules]
        print("HEAVY", heavy, file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["workbench.builtin_models"]["source"] == "core"
    assert plugins["tiny_models"]["models"] == ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"]
    assert plugins["next_token"]["hooks"] == ["register_analyses"]
    assert plugins["answer"]["analyses"] == ["answer"]
    assert all(p["errors"] == [] for p in plugins.values())


def test_a_misspelt_hook_is_caught_and_the_plugin_not_loaded(workbench_register_plugin, capsys):
    class Misspelt:
        @hookimpl
        def register_analysis(self, register):  # missing the final "es"
            register(_analysis("never"))

    workbench_register_plugin(Misspelt(), name="misspelt")
    registry = build_analyses()
    info = report_of(plugin_manager()).plugins["misspelt"]
    assert not info.loaded
    assert info.errors == [("implements unknown hook 'register_analysis' (did you mean register_analyses?); "
                            "plugin not loaded")]
    assert "never" not in registry and "next-token" in registry
    assert "plugin 'misspelt': implements unknown hook" in capsys.readouterr().err


def test_strict_mode_turns_plugin_problems_into_errors(workbench_register_plugin, monkeypatch):
    class Misspelt:
        @hookimpl
        def regster_models(self):
            pass

    workbench_register_plugin(Misspelt(), name="misspelt")
    monkeypatch.setenv("WORKBENCH_STRICT_PLUGINS", "1")
    from workbench.plugins import PluginError, reset_plugin_manager

    reset_plugin_manager()
    with pytest.raises(PluginError, match="unknown hook 'regster_models'.*did you mean register_models"):
        plugin_manager()


def test_two_analyses_with_one_name_are_both_rejected_naming_both_plugins(workbench_register_plugin, capsys):
    class A:
        @hookimpl
        def register_analyses(self, register):
            register(_analysis("same", 1))
            register(_analysis("only-a"))

    class B:
        @hookimpl
        def register_analyses(self, register):
            register(_analysis("same", 2))

    workbench_register_plugin(A(), name="plugin-a")
    workbench_register_plugin(B(), name="plugin-b")
    registry = build_analyses()
    assert "same" not in registry and "only-a" in registry
    err = capsys.readouterr().err
    assert "analysis 'same' is registered by both 'plugin-a' and 'plugin-b'; neither is used" in err
    with pytest.raises(UserError, match="no analysis named 'same'"):
        registry.get("same")


def test_a_hook_that_raises_is_reported_and_the_rest_still_register(workbench_register_plugin, capsys):
    class Broken:
        @hookimpl
        def register_analyses(self, register):
            register(_analysis("half-done"))
            raise RuntimeError("boom")

    class Fewer:  # pluggy: an implementation may take fewer arguments than the spec
        @hookimpl
        def register_analyses(self):
            pass

    workbench_register_plugin(Broken(), name="broken")
    workbench_register_plugin(Fewer(), name="fewer")
    registry = build_analyses()
    assert "next-token" in registry and "answer" in registry
    assert "plugin 'broken': failed in register_analyses (RuntimeError: boom)" in capsys.readouterr().err
    assert report_of(plugin_manager()).plugins["broken"].errors


def test_plugins_dir_loads_loose_files_and_the_env_var_restricts(tmp_path):
    (tmp_path / "loose_one.py").write_text(textwrap.dedent("""
        from workbench import Analysis, hookimpl

        @hookimpl
        def register_analyses(register):
            register(Analysis(name="loose", description="from a file", version="2",
                              compute=lambda ctx: {}))
    """))
    (tmp_path / "broken_file.py").write_text("raise ImportError('no such thing')\n")
    (tmp_path / "answer.py").write_text("")  # the name of one of our plugins
    proc = _cli("--plugins-dir", str(tmp_path), "--plugins-dir", str(tmp_path / "absent"), "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins[str(tmp_path / "answer.py")]["errors"] == ["not loaded: a plugin named 'answer' already exists"]
    assert plugins["answer"]["loaded"] and plugins["answer"]["errors"] == []
    assert plugins[str(tmp_path / "absent")]["errors"] == [f"plugins folder {tmp_path / 'absent'} does not exist"]
    assert plugins["loose_one"]["source"] == "file" and plugins["loose_one"]["analyses"] == ["loose"]
    assert plugins["broken_file"]["errors"] == ["failed to load (ImportError: no such thing)"]
    assert "plugin 'broken_file': failed to load (ImportError: no such thing)" in proc.stderr
    # the same through the environment, restricted to one plugin
    proc = _cli("plugins", "--json", env={"WORKBENCH_PLUGINS_DIR": str(tmp_path), "WORKBENCH_PLUGINS": "loose_one"})
    names = [p["name"] for p in json.loads(proc.stdout)]
    assert names == ["workbench.builtin_models", "loose_one"]  # the restriction applies to files too
    proc = _cli("plugins", env={"WORKBENCH_PLUGINS_DIR": str(tmp_path), "WORKBENCH_STRICT_PLUGINS": "1"})
    assert proc.returncode != 0 and "a plugin named 'answer' already exists" in proc.stderr


def test_plugins_add_commands_and_cannot_replace_ours(tmp_path):
    (tmp_path / "cmds.py").write_text(textwrap.dedent("""
        import click
        from workbench import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command("hello")
            def hello():
                "Say hello."
                click.echo("hello from a plugin")

            @cli.command("inspect")
            def fake():
                click.echo("hijacked")
    """))
    proc = _cli("--plugins-dir", str(tmp_path), "hello")
    assert proc.stdout == "hello from a plugin\n"
    assert "plugin 'cmds': command 'inspect' already exists; not replaced" in proc.stderr
    proc = _cli("--plugins-dir", str(tmp_path), "inspect", "/nonexistent.h5")
    assert proc.returncode == 2 and "no such run" in proc.stderr


def test_make_plugin_manager_is_a_factory():
    a, b = make_plugin_manager(), make_plugin_manager()
    assert a is not b and a.get_plugins() and len(a.get_plugins()) == len(b.get_plugins())
