"""The method registry (steering/steer/methods): every method declares how it is built and how
it is tuned, and a new method is one MethodSpec plus one registry entry, picked up by the
config check, the builder and the tuner without other edits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from steering.evaluate.config import FrontierConfig, SteerAppConfig
from steering.evaluate.tuning import tune_method
from steering.localise.config import LocaliseConfigError
from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.methods import (METHODS, REGISTRY, TUNED, BuildRequest, MethodSpec, Tuned,
                                    Tuning, build_method, strengths_of)
from steering.steer.methods.spec import STRENGTHS


def test_every_method_is_registered_once_with_its_tuning():
    assert METHODS == ("none", "prompting", "foxp2", "foxp2_neurons", "foxp2_replace",
                       "foxp2_pos", "foxp2_neg", "caa_layer", "caa_window", "lape", "random",
                       "foxp2_learned", "foxp2_learned_random", "foxp2_learned_dense", "lineas")
    for name, spec in REGISTRY.items():
        assert spec.name == name and callable(spec.build) and spec.summary
        assert spec.tuning.strengths in STRENGTHS
    assert TUNED == {"none": "none", "prompting": "none", "foxp2": "both",
                     "foxp2_neurons": "both", "foxp2_replace": "both", "foxp2_pos": "lam",
                     "foxp2_neg": "beta", "caa_layer": "lam", "caa_window": "lam",
                     "lape": "both", "random": "both", "foxp2_learned": "lam",
                     "foxp2_learned_random": "lam", "foxp2_learned_dense": "lam", "lineas": "lam"}
    assert REGISTRY["caa_layer"].tuning.search is not None  # its layer scan
    # learned steers train, then search γ (their λ) on the tuning split
    assert all(REGISTRY[m].tuning.search is not None for m in METHODS if "learn" in m
               or m == "lineas")
    with pytest.raises(ValueError, match="strengths"):
        Tuning("gamma")


def _localisation():
    return SimpleNamespace(target="es", english="en", window=[1, 2], layers=[0, 1, 2, 3],
                           provenance=lambda: {"localise": "nowhere", "window": [1, 2]})


def _build_shift(request: BuildRequest) -> SteeringArtifact:
    edits = [LayerEdit(layer=l, space="resid", add=torch.ones(4) * request.seed)
             for l in request.window]
    return request.artifact("shift", edits, beta=0.0, note="a test method")


class _Tuner:
    """Stands for the evaluate stage's tuner: records what it was asked to tune."""

    config = SimpleNamespace(caa_layer_stride=None)

    def __init__(self):
        self.calls = []

    def tune(self, artifact, strengths):
        self.calls.append((artifact.method, strengths))
        return Tuned(artifact.with_strengths(lam=2.0, beta=0.0, gamma=1.0), ["p"], True)

    def best(self, points):
        return points[0]


def test_a_new_method_is_one_spec_and_one_registry_entry(monkeypatch):
    def search(request, tuner):  # the method's own tuning: two windows, the later one wins
        tuned = [tuner.tune(_build_shift(BuildRequest(request.localisation, w)), "lam")
                 for w in ([1], [2])]
        return Tuned(tuned[1].artifact, tuned[1].points, True, {"window_scan": [[1], [2]]})

    monkeypatch.setitem(REGISTRY, "shift", MethodSpec("shift", _build_shift,
                                                      Tuning("lam", search=search), "a shift"))
    art = build_method("shift", _localisation(), seed=3, decode_steps=2)
    assert art.method == "shift" and [e.layer for e in art.edits] == [1, 2]
    assert art.beta == 0.0 and art.decode_steps == 2 and float(art.edits[0].add[0]) == 3.0
    assert art.provenance["note"] == "a test method" and art.provenance["window_split"] == 2
    assert strengths_of("shift") == "lam"
    tuner = _Tuner()
    tuned = tune_method("shift", BuildRequest(_localisation(), [1, 2]), tuner)
    assert tuner.calls == [("shift", "lam"), ("shift", "lam")]
    assert tuned.artifact.lam == 2.0 and tuned.record == {"window_scan": [[1], [2]]}
    cfg = SteerAppConfig(methods=["shift"], primary="shift", frontier=FrontierConfig(methods=[]))
    assert cfg.methods == ["shift"]  # the config check knows it


def test_methods_without_a_search_are_built_then_tuned_on_their_grid():
    tuner = _Tuner()
    tuned = tune_method("prompting", BuildRequest(_localisation(), [1, 2]), tuner)
    assert tuner.calls == [("prompting", "none")]
    assert tuned.artifact.prompt_prefix == "Answer in Spanish. "


def test_unknown_methods_fail_at_the_config_and_at_the_builder():
    with pytest.raises(LocaliseConfigError, match="unknown \\['shift'\\]"):
        SteerAppConfig(methods=["foxp2", "shift"])
    with pytest.raises(ValueError, match="unknown method 'shift'"):
        build_method("shift", _localisation())


def test_a_learned_methods_stored_result_depends_on_the_learn_settings():
    import dataclasses
    from types import SimpleNamespace

    from steering.evaluate.config import SteerAppConfig
    from steering.evaluate.pipeline import method_key

    from steering.evaluate.config import FrontierConfig

    cfg = SteerAppConfig(methods=["foxp2_neurons", "foxp2_learned"], primary="foxp2_learned",
                         frontier=FrontierConfig(methods=[]))
    other = dataclasses.replace(cfg, learn=dataclasses.replace(cfg.learn, steps=7))
    keys = {name: [method_key(SimpleNamespace(cfg=c), {"base": 1}, name) for c in (cfg, other)]
            for name in ("foxp2_neurons", "foxp2_learned")}
    assert keys["foxp2_neurons"][0] == keys["foxp2_neurons"][1]
    assert keys["foxp2_learned"][0] != keys["foxp2_learned"][1]


def test_localise_plots_setting_reads_booleans_and_refuses_other_values():
    from steering.localise.config import LocaliseConfigError, LocaliseAppConfig

    assert LocaliseAppConfig(plots="summary").plots == "summary"
    assert LocaliseAppConfig(plots=True).plots == "all"
    assert LocaliseAppConfig(plots="false").plots == "none"
    with pytest.raises(LocaliseConfigError, match="plots='some'"):
        LocaliseAppConfig(plots="some")


def test_roles_keep_controls_out_of_the_best_baseline():
    """Each method says what it is to a reader; the demo's "best baseline" is never a FOXP2
    variant or a control (the dense ablation beat the traced support on Hindi once and was
    shown as the best baseline)."""
    from steering.apps.demo_app import best_baseline

    roles = {name: spec.role for name, spec in REGISTRY.items()}
    assert {n for n, r in roles.items() if r == "baseline"} == {
        "prompting", "caa_layer", "caa_window", "lape", "lineas"}
    assert {n for n, r in roles.items() if r == "foxp2"} == {
        "foxp2", "foxp2_neurons", "foxp2_replace", "foxp2_learned"}
    with pytest.raises(ValueError, match="role"):
        MethodSpec("odd", _build_shift, Tuning("lam"), role="rival")

    def result(default, kl):
        return {"metrics": {"default": {"mean": default}, "kl_gen": {"mean": kl}}}

    report = {"primary": "foxp2_learned", "kl_budget": 0.5,
              "methods": {"none": result(0.0, 0.0), "native": result(0.96, 0.0),
                          "foxp2_learned": result(0.29, 0.2),
                          "foxp2_learned_dense": result(0.44, 0.3), "random": result(0.5, 0.1),
                          "caa_window": result(0.0, 0.28), "caa_layer": result(0.04, 0.3),
                          "lape": result(0.9, 0.9)}}
    assert best_baseline(report) == "caa_layer"  # lape is over the KL budget
    report["methods"] = {k: v for k, v in report["methods"].items()
                         if k not in ("caa_window", "caa_layer")}
    assert best_baseline(report) == "lape"  # none within budget: any baseline
