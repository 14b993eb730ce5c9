"""`foxp2-steer`: Neural FOXP2 stage III for one target (Hydra app).

    foxp2-steer target=es                                  # after foxp2-localise target=es
    foxp2-steer target=hi 'methods=[foxp2,caa_layer]' evaluation.n_prompts=64
    foxp2-steer -m target=es,hi                            # one job per language

Builds every method's steer from the localisation, tunes (λ, β) on the tuning split, evaluates
on the evaluation split and writes ``<out_dir>/artifacts/<method>/`` and
``<out_dir>/report/{report.json, report.md, plots/}`` (see :mod:`steering.evaluate.pipeline`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sae_train.apps import report_user_errors
from steering.apps import config_dir
from steering.evaluate.config import register_steer_configs
from steering.evaluate.pipeline import run_steer

register_steer_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="steer")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_steer(cfg)


if __name__ == "__main__":
    main()
