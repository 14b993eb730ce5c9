# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Neural FOXP2 walkthrough: a finished `foxp2-demo` run
#
# `foxp2-demo` runs the whole pipeline for one model and one or more target languages:
#
# 1. **cache** — residual-stream and MLP activations of a parallel corpus (`cache/`);
# 2. **train** — one sparse autoencoder (SAE) per layer (`saes/layers.{i}.resid/`);
# 3. **localise** — per target *t*: which SAE features separate *t* from English, how low-rank
#    the paired differences are, and which contiguous layers (the **window**) carry the
#    language shift (`localise-<t>/`);
# 4. **steer** — steering artifacts built from the window (Neural FOXP2 and baselines), tuned
#    and evaluated on held-out prompts (`steer-<t>/`).
#
# This notebook only *reads* those outputs (plus, optionally, loads the model to generate a
# few base-vs-steered continuations). It also runs as a plain script:
# `python notebooks/walkthrough.py`.

# %% [markdown]
# ## Parameters
#
# * `FOXP2_DEMO_RUN` — the run folder (`<root>/demo/<model>`), default
#   `foxp2_runs/demo/gemma3_270m`;
# * `FOXP2_NOTEBOOK_GENERATE=0` skips the part that loads the model.

# %%
import json
import math
import os
from pathlib import Path

RUN = os.environ.get("FOXP2_DEMO_RUN", "foxp2_runs/demo/gemma3_270m")
MODEL_GENERATION = os.environ.get("FOXP2_NOTEBOOK_GENERATE", "1") == "1"


def _resolve_run(run: str) -> Path:
    """The run folder, also when the notebook's working directory is `notebooks/`."""
    path = Path(run).expanduser()
    if path.is_absolute() or path.is_dir():
        return path
    for base in (Path.cwd().parent, Path(__file__).resolve().parents[1]
                 if "__file__" in globals() else Path.cwd()):
        if (base / path).is_dir():
            return base / path
    return path


RUN = _resolve_run(RUN)
if not RUN.is_dir():
    raise SystemExit(f"{RUN} does not exist: run `foxp2-demo` first or set FOXP2_DEMO_RUN")

SUMMARY = json.loads((RUN / "demo_summary.json").read_text()) \
    if (RUN / "demo_summary.json").is_file() else {}
TARGETS = list(SUMMARY.get("targets") or
               sorted(p.name[len("localise-"):] for p in RUN.glob("localise-*") if p.is_dir()))
MODEL_NAME = SUMMARY.get("model", RUN.name)  # a conf/model/ choice, e.g. gemma3_270m
print(f"run: {RUN}\nmodel config: {MODEL_NAME}\ntargets: {TARGETS}\n"
      f"generation: {MODEL_GENERATION}")
for stage in SUMMARY.get("stages", []):
    print(f"  stage {stage['stage']:<12} {stage['seconds']:8.1f} s"
          + ("  (skipped: outputs existed)" if stage.get("skipped") else ""))

# %% [markdown]
# Small helpers: a plain-text table (no pandas needed) and image display that works both in
# Jupyter (inline) and as a script (prints the path).

# %%
try:
    from IPython import get_ipython
    from IPython.display import Image, display
    IN_IPYTHON = get_ipython() is not None
except ImportError:
    IN_IPYTHON = False


def fmt(x, digits=3):
    """Numbers for tables; JSON `null` (a non-finite value in the run) prints as `nan`."""
    if x is None:
        return "nan"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def print_table(header, rows):
    cells = [[str(h) for h in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def show(path):
    path = Path(path)
    if not path.is_file():
        print(f"[missing plot] {path}")
    elif IN_IPYTHON:
        display(Image(filename=str(path)))
    else:
        print(f"[plot] {path}")


def ci(metric, digits=3, signed=False):
    """`mean [low, high]` of one report metric (a dict with mean/low/high)."""
    if not isinstance(metric, dict):
        return "–"
    f = (lambda v: "nan" if v is None else f"{v:+.{digits}f}") if signed else \
        (lambda v: fmt(v, digits))
    return f"{f(metric.get('mean'))} [{f(metric.get('low'))}, {f(metric.get('high'))}]"


# %% [markdown]
# ## Stages I–II: localisation
#
# For every analysed layer ℓ the localise stage
#
# * ranks SAE features by **selectivity** (target vs English activation on translation pairs)
#   times their **lift** (how much pushing the feature raises target-language mass);
#   **K** features are kept;
# * traces those features to MLP neurons: **|N_t|** target and **|N_en|** English neurons;
# * takes the spectrum of the paired code differences ΔZ (target − English) on the selected
#   support: **rank** (the eigengap index), the eigengap ratio, **r_eff** (effective rank),
#   **Mass** (share of energy in the top-r subspace) and **Stab** (bootstrap stability of that
#   subspace).
#
# The **window** is the contiguous run of layers with the highest mean Mass·Stab: the layers
# where the language shift is a compact, stable, low-rank direction. Steering acts only there.

# %%
def localise_summary(target):
    path = RUN / f"localise-{target}" / "localise" / "summary.json"
    return json.loads(path.read_text())


for target in TARGETS:
    loc = localise_summary(target)
    win = loc["window"]
    print(f"=== target {target} vs {loc['english']}")
    print(f"window: layers {win['layers']} (start {win['start']}, end {win['end']}), "
          f"score {fmt(win['score'])} = {win['rule']['score']}"
          + ("  FLAGGED" if win.get("flagged") else ""))
    print(f"token sets: {loc['token_sets']['sizes']}; tracing source: {loc['tracing_source']}; "
          f"baseline ΔM {fmt(loc['baseline'].get('mean_delta_m'))}")
    rows = []
    for layer, r in sorted(loc["layers"].items(), key=lambda kv: int(kv[0])):
        rows.append(["*" if int(layer) in win["layers"] else "", layer, r.get("k"),
                     r.get("n_target_neurons"), r.get("n_english_neurons"), r.get("rank"),
                     r.get("eigengap_ratio"), r.get("r_eff"), r.get("mass"), r.get("stability"),
                     r.get("mass_stab"), r.get("causal_gain"), r.get("essentially_rank1")])
    print_table(["win", "layer", "K", "|N_t|", "|N_en|", "rank", "eigengap", "r_eff", "Mass",
                 "Stab", "Mass·Stab", "causal gain", "rank-1"], rows)
    print("\nwindow candidates (best first):")
    cands = sorted(win.get("candidates", []), key=lambda c: -(c.get("score") or -math.inf))
    print_table(["layers", "score", "mean causal gain"],
                [[str(c["layers"]), c.get("score"), c.get("mean_causal_gain")]
                 for c in cands[:6]])
    print("\nfindings:", *(loc.get("findings") or ["(none)"]), sep="\n  ")
    for w in loc.get("warnings", []) + win.get("warnings", []):
        print("  warning:", w)
    print()

# %% [markdown]
# **Spectra** (σ_i/σ_1 per layer with a shuffled-pair null: a steep first drop means the shift
# is few-dimensional; "essentially rank 1" means it is the mean language shift),
# **eigengap / r_eff** per layer, and the **window scores** of every candidate.

# %%
for target in TARGETS:
    plots = RUN / f"localise-{target}" / "plots"
    print(f"=== target {target}")
    for name in ("spectra", "eigengap_reff", "window_scores", "neuron_spectra"):
        show(plots / f"{name}.png")

# %% [markdown]
# ### Top features of the window layers
#
# Each selected feature with its selectivity (Sel), lift slope, Score = Sel·slope, and the
# tokens it most promotes (decoder row through the unembedding).

# %%
for target in TARGETS:
    loc = localise_summary(target)
    print(f"=== target {target}")
    for layer in loc["window"]["layers"]:
        feats = loc["layers"][str(layer)].get("top_features", [])
        print(f"layer {layer}:")
        print_table(["feature", "sel.", "Sel", "slope", "Score", "top tokens"],
                    [[f["feature"], f.get("selected"), f.get("sel"), f.get("slope"),
                      fmt(f.get("score"), 5),
                      " ".join(repr(t) for t in f.get("top_tokens", [])[:8])]
                     for f in feats])
    show(RUN / f"localise-{target}" / "plots" / "top_features.png")

# %% [markdown]
# ## Stage III: steering report
#
# Every method is tuned (λ: push strength, β: English removal) on a tuning split to maximise
# ΔM under a KL budget, then evaluated on held-out neutral English prompts:
#
# * **DEFAULT** — the share of prompts whose greedy continuation is in the target language
#   *and* passes the fluency guards (no looping, no English leak, right script, …). This is
#   the headline number: "does the model now answer in *t* by default?" The table after
#   the bars says which condition the other prompts fail.
# * **KL gen / ΔNLL gen** — the cost: KL to the unsteered next-token distribution and the
#   increase of NLL of held-out target-language sentences, measured with the steering applied
#   **as in generation** (prompt end + the first decode steps). The `all` variants steer every
#   position — a stricter, pessimistic view; `gen` is what a user of the artifact experiences.
#
# 95% bootstrap confidence intervals in brackets. `none` is the unsteered model, `prompting`
# an instruction prefix; `caa_*`, `lape`, `random` are baselines. `native` is a reference, not
# a steer: the unsteered model asked the same questions in the target language, judged the
# same way. Its DEFAULT is the most the guards allow this model, so read every other row
# against it.

# %%
def steer_report(target):
    return json.loads((RUN / f"steer-{target}" / "report" / "report.json").read_text())


for target in TARGETS:
    rep = steer_report(target)
    print(f"=== steering English → {target} on {rep['model']}: window {rep['window']}, "
          f"primary {rep['primary']}, KL budget {rep['kl_budget']}, "
          f"{rep['n_prompts']} prompts / {rep['n_sentences']} sentences")
    rows = []
    for method, m in rep["methods"].items():
        s, mt = m.get("strengths", {}), m.get("metrics", {})
        rows.append([method, fmt(s.get("lam"), 2) if s else "–",
                     fmt(s.get("beta"), 2) if s else "–",
                     ci(mt.get("default"), 2), ci(mt.get("nll_change_gen"), signed=True),
                     ci(mt.get("kl_gen")), ci(mt.get("delta_m"))])
    print_table(["method", "λ", "β", "DEFAULT", "ΔNLL gen", "KL gen", "ΔM"], rows)
    print("\nbars:")
    for bar in rep.get("bars", []):
        print(f"  {'MET    ' if bar['met'] else 'NOT MET'}  {bar['text']}")
    print("findings:", *(rep.get("findings") or ["(none)"]), sep="\n  ")
    failures = {n: m["metrics"]["default_failures"] for n, m in rep["methods"].items()
                if m.get("metrics", {}).get("default_failures")}
    if failures:
        reasons = list(next(iter(failures.values())))
        print("\nwhy DEFAULT fails (fraction of prompts failing each condition):")
        print_table(["method", *reasons],
                    [[n, *(fmt(f[r], 2) for r in reasons)] for n, f in failures.items()])
    print()

# %% [markdown]
# The **frontier**: DEFAULT against KL gen while the strength γ (scaling λ and β together) is
# swept. A method is better when its curve lies up and to the left.

# %%
for target in TARGETS:
    plots = RUN / f"steer-{target}" / "report" / "plots"
    print(f"=== target {target}")
    for name in ("frontier", "default_by_method", "default_failures", "default_vs_gamma",
                 "layer_gains"):
        show(plots / f"{name}.png")

# %% [markdown]
# ## Base vs steered generations
#
# Load the model and the primary artifact (`steer-<t>/artifacts/<primary>/`) and generate a
# few greedy continuations with and without steering. `steering.steer.runtime.steer` is a context
# manager that adds the artifact's hooks and removes them on exit. (Set
# `FOXP2_NOTEBOOK_GENERATE=0` to skip; the same thing from the command line:
# `foxp2-generate artifact=<run>/steer-<t>/artifacts/foxp2 model=<model>`.)

# %%
PROMPTS = ["Why is the sky blue?", "What is the best way to learn to cook?",
           "Describe your favourite season."]
MAX_NEW_TOKENS = 24


def model_config(name):
    """conf/model/<name>.yaml merged into the ModelConfig schema (what Hydra composes)."""
    from omegaconf import OmegaConf

    from sae_train.config import ModelConfig
    from steering.apps import config_dir

    node = OmegaConf.load(Path(config_dir()) / "model" / f"{name}.yaml")
    node.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


if MODEL_GENERATION:
    import torch

    from sae_train.models.loading import load_model
    from steering.steer.artifact import SteeringArtifact
    from steering.language.defaultness import DEFAULT_TEMPLATE, left_pad
    from steering.steer.runtime import prompt_with_prefix, steer

    model, tokenizer, info = load_model(model_config(MODEL_NAME))
    device = next(model.parameters()).device
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    print(f"loaded {info.name} ({info.n_layers} layers) on {device}")

    @torch.no_grad()
    def generate(texts, artifact=None):
        ids, attn = left_pad([tokenizer(t)["input_ids"] for t in texts], pad)
        ctx = steer(model, artifact) if artifact is not None else torch.no_grad()
        with ctx:
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
        return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    for target in TARGETS:
        primary = steer_report(target)["primary"]
        art = SteeringArtifact.load(RUN / f"steer-{target}" / "artifacts" / primary)
        base = generate([DEFAULT_TEMPLATE.format(prompt=p) for p in PROMPTS])
        steered = generate([DEFAULT_TEMPLATE.format(prompt=prompt_with_prefix(art, p))
                            for p in PROMPTS], art)
        print(f"\n##### {art.method} → {target}  "
              f"(λ={art.lam:g}, β={art.beta:g}, γ={art.gamma:g}, "
              f"layers {[e.layer for e in art.edits]}, position {art.position})")
        for p, b, s in zip(PROMPTS, base, steered):
            print(f"\n=== {p}\n  base   : {b.strip()!r}\n  steered: {s.strip()!r}")
else:
    print("FOXP2_NOTEBOOK_GENERATE=0: skipping generation")

# %% [markdown]
# ## Where next
#
# * `localise-<t>/localise/layers.json` — the full per-layer records (selectivity, lift,
#   ranking, tracing, spectra with their nulls);
# * `steer-<t>/report/report.md` — the report as markdown, with example continuations of every
#   method;
# * `foxp2-generate artifact=... 'prompts=[...]' gamma=1.5` — your own prompts, other strengths.
