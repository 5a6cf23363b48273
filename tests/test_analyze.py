"""Running analyses and storing their results beside the run; the first-party analyses against
independent computations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench
from tests.clitools import run_cli as _cli
from workbench import Analysis, Param, hookimpl
from workbench.analysis import missing_inputs
from workbench.errors import UserError
from workbench.registries import analyze, build_analyses
from workbench.store.results import list_results, results_dir

REPO = Path(__file__).resolve().parents[1]




def _hf_logits(model, tokens):
    """The Hugging Face model's own forward pass (no TransformerLens hooks in the way)."""
    with torch.inference_mode():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
        return model.bridge.original_model(input_ids=ids).logits[0].double()


def test_next_token_equals_the_models_own_loss_and_argmax(workbench_run, workbench_tiny_model):
    [o] = analyze(workbench_run, [build_analyses().get("next-token")])
    assert o.status == "computed" and o.stored.ok
    total, hits, n = 0.0, 0, 0
    for i, rec in enumerate(o.stored.data["prompts"]):
        tokens = workbench_run.tokens(i)
        logits = _hf_logits(workbench_tiny_model, tokens)
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.as_tensor(tokens[1:], dtype=torch.long),
                                                 reduction="none")
        assert rec["mean_loss"] == pytest.approx(float(loss.mean()), rel=1e-5)
        assert rec["top1_accuracy"] == pytest.approx(
            float((logits[:-1].argmax(-1).numpy() == tokens[1:]).mean()))
        total, n = total + float(loss.sum()), n + len(loss)
        hits += int((logits[:-1].argmax(-1).numpy() == tokens[1:]).sum())
    assert o.stored.data["mean_loss"] == pytest.approx(total / n, rel=1e-5)
    assert o.stored.data["top1_accuracy"] == pytest.approx(hits / n)
    assert o.stored.arrays["prompt_mean_loss"].shape == (3,)


def test_answer_equals_the_models_logits(workbench_run, workbench_tiny_model):
    [o] = analyze(workbench_run, [build_analyses().get("answer")], model=workbench_tiny_model)
    data = o.stored.data
    assert data["n_with_answer"] == 2  # the third default prompt has no answer
    tok = workbench_tiny_model.tokenizer
    for rec in data["prompts"]:
        logits = _hf_logits(workbench_tiny_model, workbench_run.tokens(rec["index"]))[-1]
        a = tok(rec["answer"], add_special_tokens=False)["input_ids"][0]
        w = tok(rec["wrong"], add_special_tokens=False)["input_ids"][0]
        assert rec["logit"] == pytest.approx(float(logits[a]), abs=1e-4)
        assert rec["logit_diff"] == pytest.approx(float(logits[a] - logits[w]), abs=1e-4)
        assert rec["prob"] == pytest.approx(float(torch.softmax(logits, -1)[a]), rel=1e-4)
        assert rec["rank"] == int((logits > logits[a]).sum()) + 1


def test_results_are_keyed_reused_and_forced(workbench_run):
    nt = build_analyses().get("next-token")
    [first] = analyze(workbench_run, [nt])
    [again] = analyze(workbench_run, [nt])
    assert (first.status, again.status) == ("computed", "reused")
    assert again.stored.path == first.stored.path and again.stored.data == first.stored.data
    [forced] = analyze(workbench_run, [nt], force=True)
    assert forced.status == "computed"
    [other] = analyze(workbench_run, [nt], {"next-token": {"worst": "2"}})
    assert other.status == "computed" and other.stored.path != first.stored.path
    assert len(other.stored.data["hardest"]) == 2
    folder = results_dir(workbench_run)
    assert folder == workbench_run.final_path.with_name(workbench_run.final_path.name + ".results")
    assert sorted(p.name for p in folder.iterdir()) == sorted({first.stored.path.name, other.stored.path.name})
    assert workbench.result(workbench_run, "next-token", worst=2).data == other.stored.data
    # the run file itself is untouched by analyses
    assert workbench_run.path.stat().st_mtime < first.stored.path.stat().st_mtime + 1


def test_a_failing_analysis_is_recorded_and_the_others_kept(workbench_run, workbench_register_plugin,
                                                            monkeypatch, capsys):
    def fail(ctx):
        raise ValueError("bad input")

    class Plugin:
        @hookimpl
        def register_analyses(self, register):
            register(Analysis(name="fails", description="raises", version="1", compute=fail))

    workbench_register_plugin(Plugin(), name="failing")
    registry = build_analyses()
    outcomes = analyze(workbench_run, [registry.get("fails"), registry.get("next-token")])
    assert [o.status for o in outcomes] == ["error", "computed"]
    assert outcomes[0].stored.error == "ValueError: bad input"
    assert "ValueError: bad input" in outcomes[0].stored.meta["traceback"]
    assert "analysis 'fails' (plugin 'failing') failed: ValueError: bad input" in capsys.readouterr().err
    assert {r.analysis: r.ok for r in list_results(workbench_run)} == {"fails": False, "next-token": True}
    # an error is not reused: the next call tries again
    assert analyze(workbench_run, [registry.get("fails")])[0].status == "error"
    monkeypatch.setenv("WORKBENCH_STRICT_PLUGINS", "1")
    with pytest.raises(ValueError, match="bad input"):
        analyze(workbench_run, [registry.get("fails")])


def test_params_are_typed_and_checked(workbench_run):
    nt = build_analyses().get("next-token")
    with pytest.raises(UserError, match="parameter 'worst' needs an int, not 'many'"):
        analyze(workbench_run, [nt], {"next-token": {"worst": "many"}})
    with pytest.raises(UserError, match="has no parameter 'best' .parameters: worst"):
        analyze(workbench_run, [nt], {"next-token": {"best": "1"}})
    with pytest.raises(UserError, match="is at least 0"):
        analyze(workbench_run, [nt], {"next-token": {"worst": -1}})
    p = Param("flag", bool, False)
    assert p.parse("yes") is True and p.parse("0") is False
    with pytest.raises(UserError):
        p.parse("maybe")


def test_inputs_are_checked_and_capture_for_captures_exactly_them(workbench_make_run, tmp_path):
    class Needs:
        @hookimpl
        def register_analyses(self, register):
            register(Analysis(name="needs-patterns", description="", version="1", compute=lambda c: {},
                              needs=("blocks.*.attn.hook_pattern", "ln_final.hook_scale")))

    from workbench.plugins import extra_plugins

    with extra_plugins(("needs", Needs())):
        analysis = build_analyses().get("needs-patterns")
        residual_only = workbench_make_run(hooks=["residual"])
        missing = missing_inputs(residual_only, analysis)
        assert missing == ["blocks.*.attn.hook_pattern (blocks.0.attn.hook_pattern, blocks.1.attn.hook_pattern)",
                           "ln_final.hook_scale (ln_final.hook_scale)"]
        with pytest.raises(UserError, match="needs .* which run1.h5 lacks .capture with --for needs-patterns"):
            analyze(residual_only, [analysis])
        half = workbench_make_run(hooks=["blocks.0.attn.hook_pattern", "ln_final.hook_scale"])
        assert missing_inputs(half, analysis) == ["blocks.*.attn.hook_pattern (blocks.1.attn.hook_pattern)"]
        from workbench.cli import main

        out = tmp_path / "for.h5"
        with pytest.raises(SystemExit) as exit_info:
            main(["capture", "-m", "tiny-gpt2", "-p", "abc", "--for", "needs-patterns", "-o", str(out)])
        assert exit_info.value.code == 0
        run = workbench.open_run(out)
        assert sorted(run.hooks) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern",
                                     "ln_final.hook_scale"]
        assert missing_inputs(run, analysis) == []


def test_stale_results_of_an_earlier_run_are_not_reused(workbench_make_run, tmp_path):
    nt = build_analyses().get("next-token")
    run = workbench_make_run(prompts=["abc def"])
    [first] = analyze(run, [nt])
    path = run.final_path
    run.close()
    workbench.capture(workbench.load_model("tiny-gpt2", device="cpu", progress=False), ["something else"],
                      hooks=[], out=path, overwrite=True, progress=False)
    rerun = workbench.open_run(path)
    assert not first.stored.current(rerun)
    [second] = analyze(rerun, [nt])
    assert second.status == "computed" and second.stored.data != first.stored.data


def test_reloading_a_model_whose_weights_changed_is_an_error(workbench_register_plugin, tmp_path):
    from workbench_plugins.tiny_models import build_hf_model

    from workbench.models import LoadedParts, ModelSource, Provenance

    seed = [0]

    def load(request):
        hf, tok, folder = build_hf_model("gpt2")
        return LoadedParts(provenance=Provenance(source="test", location="here", sha256=f"sha-{seed[0]}"),
                           hf_model=hf, tokenizer=tok, tokenizer_path=str(folder))

    class Models:
        @hookimpl
        def register_models(self, register):
            register(ModelSource(name="shifting", description="", family="decoder", load=load,
                                 default_bos="none"))

    workbench_register_plugin(Models(), name="shifting")
    model = workbench.load_model("shifting", device="cpu", progress=False)
    out = tmp_path / "s.h5"
    workbench.capture(model, [workbench.Prompt("abc", "p0", {"answer": "d"})],
                      hooks=[], out=out, progress=False)
    run = workbench.open_run(out)
    answer = build_analyses().get("answer")
    assert analyze(run, [answer])[0].ok  # same weights: reloads fine
    seed[0] = 1
    with pytest.raises(UserError, match=r"shifting now loads different weights than s.h5 was captured with "
                                        r"\(sha256: run 'sha-0', now 'sha-1'\)"):
        analyze(run, [answer], force=True)


def test_analyze_works_while_the_capture_is_still_writing(tmp_path):
    out = tmp_path / "live.h5"
    code = ("import workbench, sys\n"
            "m = workbench.load_model('tiny-gpt2', device='cpu', progress=False)\n"
            "workbench.capture(m, ['prompt number %d ' % i * 3 for i in range(300)], hooks=['residual'],"
            f" out={str(out)!r}, batch_size=1, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        partial = out.with_name(out.name + ".partial")
        deadline = time.time() + 120
        run = None
        while time.time() < deadline:
            if partial.exists():
                try:
                    run = workbench.open_run(out)
                    if len(run) > 0:
                        break
                    run.close()
                except UserError:
                    pass
            time.sleep(0.2)
        assert run is not None and run.is_partial
        also_open = workbench.open_run(out)  # as the terminal UI would hold it
        [o] = analyze(run, [build_analyses().get("next-token")])
        n = o.stored.meta["n_prompts"]
        assert o.ok and 0 < n < 300 and o.stored.data["n_prompts"] == n
        assert o.stored.path.parent == tmp_path / "live.h5.results"
        also_open.close()
        run.close()
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = workbench.open_run(out)
    [old] = workbench.results(final)
    assert old.meta["run_id"] == final.run_id and not old.current(final)  # covers fewer prompts
    [o] = analyze(final, [build_analyses().get("next-token")])
    assert o.status == "computed" and o.stored.data["n_prompts"] == 300


def test_cli_analyze_text_json_and_errors(workbench_make_run):
    run = workbench_make_run(hooks=[])
    path = str(run.final_path)
    proc = _cli("analyze", path)
    assert proc.returncode == 0, proc.stderr
    assert "== next-token 1" in proc.stdout and "== answer 1" in proc.stdout
    assert "== distribution 1" in proc.stdout  # needs nothing captured, like answer
    proc = _cli("analyze", path, "next-token", "--json", "--param", "next-token.worst=1")
    [rec] = json.loads(proc.stdout)
    assert rec["analysis"] == "next-token" and rec["outcome"] == "computed" and rec["status"] == "ok"
    assert rec["params"] == {"worst": 1} and len(rec["result"]["data"]["hardest"]) == 1
    assert rec["result"]["arrays"]["prompt_mean_loss"] == pytest.approx(
        [p["mean_loss"] for p in rec["result"]["data"]["prompts"]])
    again = json.loads(_cli("analyze", path, "next-token", "--json", "--param", "next-token.worst=1").stdout)
    assert again[0]["outcome"] == "reused"
    inspect = _cli("inspect", path, "--json")
    assert {r["analysis"] for r in json.loads(inspect.stdout)["results"]} == {"next-token", "answer", "distribution",
                                                                            "embeddings", "matrices"}
    assert "next-token 1  worst=1 ok" in _cli("inspect", path).stdout
    for args, message in [
        (("nope",), "no analysis named 'nope'"),
        (("next-tokn",), "did you mean next-token"),
        (("next-token", "--param", "worst=1"), "--param 'worst=1': write ANALYSIS.KEY=VALUE"),
        (("next-token", "--param", "next-token.worst=x"), "parameter 'worst' needs an int"),
        (("next-token", "--param", "next-token.x=1"), "has no parameter 'x'"),
        (("next-token", "--param", "answer.x=1"), "--param for 'answer', which is not among the analyses run"),
    ]:
        proc = _cli("analyze", path, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("workbench: error: ") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("analyze", str(Path(path).with_name("missing.h5")))
    assert proc.returncode == 2 and "no such run" in proc.stderr
    listing = _cli("analyze", "--list", "--json")
    assert {a["name"] for a in json.loads(listing.stdout)} >= {"next-token", "answer"}


def test_analyze_list_states_exactly_what_each_analysis_reads():
    from click.testing import CliRunner

    from workbench.cli import cli
    from workbench.hooknames import preset_patterns

    listing = CliRunner().invoke(cli, ["analyze", "--list", "--json"], prog_name="workbench")
    assert listing.exit_code == 0, listing.output
    described = {a["name"]: a for a in json.loads(listing.output)}
    for a in build_analyses():  # every analysis: presets expanded into their patterns
        reads = described[a.name]["reads"]
        assert reads["hooks"] == list(dict.fromkeys(p for n in a.needs for p in (preset_patterns(n) or (n,))))
        assert reads["lm_outputs"] == a.needs_lm_outputs and reads["model"] == a.needs_model
        assert reads["task"] == list(a.needs_task)
    lens = described["logit-lens"]["reads"]
    assert lens == {"hooks": ["blocks.*.hook_resid_post"], "optional_hooks": ["blocks.0.hook_resid_pre"],
                    "presets": {}, "lm_outputs": False, "task": [], "model": True}
    assert described["dla"]["reads"]["presets"] == {"lens": list(preset_patterns("lens"))}
    assert described["next-token"]["reads"] == {"hooks": [], "optional_hooks": [], "presets": {},
                                                "lm_outputs": True, "task": [], "model": False}
    assert described["answer"]["reads"]["task"] == ["answer"]
    assert described["distribution"]["reads"]["hooks"] == [] and described["distribution"]["reads"]["lm_outputs"]

    text = CliRunner().invoke(cli, ["analyze", "--list"], prog_name="workbench").output
    by_name: dict[str, list[str]] = {}  # analysis -> its indented lines
    for line in text.splitlines():
        if not line.startswith(" "):
            by_name[line.split(" ", 1)[0]] = []
        else:
            by_name[list(by_name)[-1]].append(line.strip())
    assert by_name["logit-lens"][:4] == ["hooks:      blocks.*.hook_resid_post",
                                         "if stored:  blocks.0.hook_resid_pre  (read where the run holds them; "
                                         "--for captures them)",
                                         "also reads: the model (reloaded by the run's provenance)",
                                         "models:     decoder"]
    assert by_name["dla"][0].startswith("hooks:      preset lens (" + ", ".join(preset_patterns("lens")) + ")")
    assert "LM outputs" in by_name["next-token"][1] and "'answer' field" in by_name["answer"][1]
    assert by_name["attends-to"][1] == "also reads: nothing else (the stored tokens)"
    assert "named only" in by_name["direction"][2]


def test_a_result_that_does_not_fit_leaves_nothing_and_keeps_the_old_one(tmp_path, monkeypatch):
    """Fault injection: the result file's write fails with ENOSPC (as h5py reports it)."""
    import errno

    import h5py

    from workbench.errors import UserError
    from workbench.registries import analyze, build_analyses
    from workbench.store.synthetic import write_synthetic_run

    run = workbench.open_run(write_synthetic_run(tmp_path / "r.h5", n_prompts=3))
    a = build_analyses().get("next-token")
    [old] = analyze(run, [a])
    before = old.stored.path.read_bytes()
    real = h5py.Group.create_dataset

    def full(self, name, *args, **kwargs):
        if name == "data":
            raise OSError(errno.ENOSPC, "[Errno 28] No space left on device")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(UserError, match="no space left on .*the result of 'next-token' was not stored"):
        analyze(run, [a], force=True)
    monkeypatch.undo()
    folder = old.stored.path.parent
    assert sorted(p.name for p in folder.iterdir()) == [old.stored.path.name]  # no temporary left
    assert old.stored.path.read_bytes() == before


def test_an_analysis_killed_while_storing_its_result_leaves_none(tmp_path):
    """SIGKILL while the result file is written (the moment is arranged: the child's h5py pauses
    after writing the result's meta, tells the test, and waits to be killed): no result file, so
    the next ``analyze`` computes it again, and that write removes the dead one's temporary."""
    import signal

    from workbench.store.synthetic import write_synthetic_run

    path = write_synthetic_run(tmp_path / "r.h5", n_prompts=3)
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", f"""
import time, h5py
real = h5py.Group.create_dataset
def slow(self, name, *a, **k):
    if name == "data":
        open({str(marker)!r}, "w").close()
        time.sleep(600)
    return real(self, name, *a, **k)
h5py.Group.create_dataset = slow
from workbench.cli import main
main(["analyze", {str(path)!r}, "next-token"])
"""], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the analysis never reached its result write"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    folder = results_dir(path)
    [tmp] = folder.iterdir()  # the dead write's temporary, and no result
    assert tmp.name.startswith(".next-token--") and tmp.name.endswith(".tmp")
    with workbench.open_run(path) as run:
        assert list_results(run) == []
    out = _cli("analyze", str(path), "next-token", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "computed in" in out.stdout
    [final] = folder.iterdir()
    assert final.name.startswith("next-token--") and final.suffix == ".h5"
    with workbench.open_run(path) as run:
        [r] = list_results(run)
        assert r.ok and r.analysis == "next-token"
