"""``--help`` of every Hydra app, generated from its structured config so that it cannot drift.

The help lists the app's config groups with their options, then every key of the composed
config as ``key=default  (type)`` with a one-line description: the first sentence of the comment
above the field in its dataclass (``# Tokens per batch on each rank ...``), or of a
``metadata={"help": ...}`` entry. Defaults are the composed config's values (interpolations left
as written), so ``sae-train sae=relu --help`` shows the ReLU SAE's keys.

Wiring: ``conf/hydra/help/foxp2.yaml`` sets ``template: ${foxp2_help:}``; the resolver is
registered when :mod:`sae_train.apps` is imported (every app imports it for its config folder)
and renders :func:`app_help` on the root of the config Hydra composed for ``--help``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

RESOLVER = "foxp2_help"
WIDTH = 100

# Descriptions of fields that carry no comment in their dataclass, by field name.
FALLBACK_HELP = {
    "seed": "Random seed.",
    "progress": "Show progress bars (log lines are always written).",
    "num_threads": "torch intra-op threads (null: torch's default).",
    "target": "Target language: a language code of the cache (e.g. es, hi).",
    "targets": "Target languages; localise and steer run once per target.",
    "english": "The language the target replaces (a language code of the cache).",
    "root": "Everything this app writes goes under <root>/demo/<model>/.",
    "cache_dir": "The activation cache written by sae-cache.",
    "localise_dir": "The output folder of foxp2-localise for this target.",
    "out_dir": "Where this app writes its outputs.",
    "template": "Prompt template of a base model; {prompt} is replaced by each prompt.",
    "prompts": "Prompts to continue, base and steered.",
    "gamma": "Strength multiplier γ of the steer (null: the artifact's tuned value).",
    "position": "Steered positions, prompt_end or all (null: the artifact's setting).",
    "max_new_tokens": "Tokens generated per prompt.",
    "batch_size": "Rows per forward pass.",
    "out_file": "Also write the generations to this JSONL file.",
    "enabled": "Turn this part on or off.",
    "mode": "wandb mode: offline, online or disabled.",
    "project": "wandb project.",
    "kind": "Which variant to use.",
}


# ------------------------------------------------------------------ field descriptions
@functools.lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the ``#`` lines directly above each field of ``cls`` (or the
    comment at the end of the field's line), read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    trailing = {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}
    field_line = re.compile(r"^    ([A-Za-z_][A-Za-z0-9_]*)\s*:")
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#:").strip())
            continue
        match = field_line.match(line)
        if match:
            inline = trailing.get(number) if not stripped.startswith("#") else None
            text = " ".join(pending) or (inline.lstrip("#").strip() if inline else "")
            if text:
                found.setdefault(match.group(1), text)
        pending = []
    return found


def field_help(cls: type, name: str) -> str:
    """One-line description of field ``name`` of dataclass ``cls`` ('' when it has none)."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        for f in dataclasses.fields(klass):
            if f.name == name and f.metadata.get("help"):
                return first_sentence(f.metadata["help"])
        text = _comments(klass).get(name)
        if text:
            return first_sentence(text)
    if _has_target(cls):
        return f"Argument of {_target_default(cls)}."
    return FALLBACK_HELP.get(name, "")


def first_sentence(text: str) -> str:
    """The text up to its first full stop that ends a sentence (not "e.g." or "1.5")."""
    text = " ".join(text.split())
    for match in re.finditer(r"\.(\s+|$)", text):
        before = text[:match.start()]
        if re.search(r"(\be\.g|\bi\.e|\bcf|\bvs|\betc)$", before):
            continue
        return text[:match.start() + 1]
    return text


def _has_target(cls: type) -> bool:
    return any(f.name == "_target_" for f in dataclasses.fields(cls))


def _target_default(cls: type) -> str:
    return next(str(f.default) for f in dataclasses.fields(cls) if f.name == "_target_")


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                  str(annotation))
    text = re.sub(r"^Optional\[(.*)\]$", r"\1 | None", text)
    return text.replace("typing.", "")


# ------------------------------------------------------------------ rendering
def _value(raw: Any) -> str:
    """A default as it would be written on the command line."""
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return str(raw).lower()
    if isinstance(raw, (list, dict)):
        text = OmegaConf.to_yaml(OmegaConf.create({"v": raw})).strip()[3:].strip()
        text = re.sub(r"\s*\n\s*", " ", text) if "\n" in text else text
        if isinstance(raw, list):
            text = "[" + ",".join(_value(v) for v in raw) + "]"
    else:
        text = str(raw)
        if any(c in text for c in "\n ") or text == "":
            text = repr(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _node_type(node: DictConfig) -> type | None:
    kind = OmegaConf.get_type(node)
    return kind if kind is not None and dataclasses.is_dataclass(kind) else None


def _key_lines(node: DictConfig, prefix: str) -> list[str]:
    """Lines for the keys of ``node`` (a typed config), its nested sections after its own keys."""
    cls = _node_type(node)
    names = [f.name for f in dataclasses.fields(cls)] if cls else list(node.keys())
    types = {f.name: f.type for f in dataclasses.fields(cls)} if cls else {}
    own: list[str] = []
    sections: list[str] = []
    for name in names:
        child = node._get_node(name)  # (`name in node` is False for a required "???" key)
        if name == "_target_" or child is None or (not prefix and name == "hydra"):
            continue
        key = f"{prefix}{name}"
        if isinstance(child, DictConfig) and _node_type(child) is not None:
            kind = _node_type(child)
            doc = first_sentence(inspect.getdoc(kind) or "") if kind.__doc__ else ""
            title = f"[{key}]" + (f" {doc}" if doc and not doc.startswith(kind.__name__ + "(")
                                   else "")
            if _has_target(kind):
                title += f" (_target_: {child.get('_target_', _target_default(kind))})"
            sections += ["", textwrap.shorten(title, WIDTH * 2, placeholder="…")]
            sections += _key_lines(child, f"{key}.")
            continue
        raw = OmegaConf.to_container(child, resolve=False) \
            if isinstance(child, (DictConfig, ListConfig)) else child._value()
        if isinstance(raw, str) and raw == "???":
            shown = "???  (required)"
        else:
            shown = _value(raw)
        type_name = _type_name(types[name]) if name in types else ""
        own.append(f"  {key}={shown}" + (f"  ({type_name})" if type_name else ""))
        description = field_help(cls, name) if cls else FALLBACK_HELP.get(name, "")
        if description:
            own.append(f"      {description}")
    return own + sections


def _primary_comment(config_name: str | None) -> list[str]:
    """The comment block at the top of the primary YAML (the app's one-line purpose and usage
    examples)."""
    from sae_train.apps import config_dir

    if not config_name:
        return []
    path = Path(config_dir()) / f"{config_name}.yaml"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    return lines


def _group_options(group: str) -> list[str]:
    """The options of config group ``group`` (schemas left out)."""
    names: set[str] = set()
    try:
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            names |= set(GlobalHydra.instance().config_loader().get_group_options(group))
    except Exception:  # noqa: BLE001 - the folder scan below still lists ours
        pass
    from sae_train.apps import config_dir

    names |= {p.stem for p in (Path(config_dir()) / group).glob("*.yaml")}
    return sorted(n for n in names if not n.endswith("_schema"))


def app_help(cfg: DictConfig) -> str:
    """The help text of the app whose composed config (with its ``hydra`` node, as Hydra builds
    it for ``--help``) is ``cfg``."""
    hydra = cfg.get("hydra") if "hydra" in cfg else None
    config_name = hydra.job.config_name if hydra is not None else None
    choices = dict(hydra.runtime.choices) if hydra is not None else {}
    out: list[str] = []
    header = _primary_comment(config_name)
    cls = _node_type(cfg)
    if not header and cls is not None and cls.__doc__:
        header = [first_sentence(inspect.getdoc(cls) or "")]
    app = Path(sys.argv[0]).name
    if not app or app == "-c" or app.endswith(".py"):  # python -c / -m: the header names it
        app = header[0].split(":")[0].strip("` ") if header and ":" in header[0] else "app"
    out += header or [app]
    out += ["", f"Usage: {app} [key=value ...] [group=option ...] [-m: sweep over a,b,c values]"
                " [--cfg job: print the composed config]"]

    groups = [g for g in choices if not g.startswith("hydra/")] + ["hydra/launcher"]
    out += ["", "== Config groups (group=option; * marks the current choice) =="]
    for group in groups:
        current = choices.get(group)
        if group == "hydra/launcher" and current == "basic":
            current = None
        options = [f"*{o}" if o == current else o for o in _group_options(group)]
        note = "   (for -m sweeps; default: basic, in-process)" if group == "hydra/launcher" \
            else ""
        out.append(f"  {group:<16}{', '.join(options)}{note}")

    out += ["", "== Keys (key=default  (type), then what it means; override any: key=value) =="]
    out += _key_lines(cfg, "")
    out += ["", "Defaults shown are after the overrides given before --help. Hydra: "
                "-m/--multirun sweeps, --cfg job prints the config, --info defaults-tree shows "
                "where it came from, --hydra-help lists Hydra's own flags."]
    return "\n".join(out)


def _render(*, _root_: DictConfig) -> str:
    # Hydra passes the template through string.Template: keep every "$" literal.
    return app_help(_root_).replace("$", "$$")


def register_help_resolver() -> None:
    """Make ``${foxp2_help:}`` (used by ``conf/hydra/help/foxp2.yaml``) render :func:`app_help`."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _render, use_cache=False)
