"""Hydra entry points (`sae-cache`, ...)."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the Hydra configs: the repository's ``conf/`` in a checkout or an
    editable install, else the copy shipped in the wheel as ``sae_train/_conf``."""
    repo_conf = Path(__file__).resolve().parents[2] / "conf"
    if (repo_conf / "cache.yaml").is_file():
        return str(repo_conf)
    packaged = Path(__file__).resolve().parents[1] / "_conf"
    if (packaged / "cache.yaml").is_file():
        return str(packaged)
    raise FileNotFoundError(f"Hydra configs not found at {repo_conf} or {packaged}")


# `--help` of every app renders from its structured config (conf/hydra/help/foxp2.yaml).
from sae_train.apps.help import register_help_resolver  # noqa: E402

register_help_resolver()
# User errors: wrong paths, values, files or caches. The apps print them as one line.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def report_user_errors(task):
    """Wrap a Hydra task function: a user error (``USER_ERRORS``, which includes CacheError,
    SAEFormatError, SAEConfigError, SiteError, ...) prints ``error: <message>`` on one line to
    stderr and exits with status 2 instead of a traceback. ``HYDRA_FULL_ERROR=1`` re-raises it
    (Hydra's own switch for full stack traces)."""
    import functools
    import os
    import sys

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except USER_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
