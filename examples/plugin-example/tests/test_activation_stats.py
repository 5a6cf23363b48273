"""Tests of the example plugin, with the fixtures of workbench's pytest plugin."""

import numpy as np
import workbench_activation_stats as plugin

from workbench.registries import analyze, build_analyses


def test_stats_equal_a_direct_computation(workbench_run, workbench_register_plugin):
    if "activation-stats" not in build_analyses():  # not installed: register it for this test
        workbench_register_plugin(plugin, name="activation_stats_under_test")
    analysis = build_analyses().get("activation-stats")
    [outcome] = analyze(workbench_run, [analysis])
    rows = {r["hook"]: r for r in outcome.stored.data["hooks"]}
    name = "blocks.1.hook_resid_post"
    acts = np.concatenate([workbench_run.activation(name, i) for i in range(len(workbench_run))])
    assert np.isclose(rows[name]["mean"], acts.mean(dtype=np.float64))
    assert np.isclose(rows[name]["mean_norm"], np.linalg.norm(acts.astype(np.float64), axis=1).mean())
