"""`foxp2-localise`: Neural FOXP2 stages I–II for one target language (Hydra app).

    foxp2-localise target=es                                   # demo model, default paths
    foxp2-localise target=hi cache_dir=/data/cache sae_dir=/data/saes 'layers=[2,3,4,5,6,7]'
    foxp2-localise model=tiny_llama target=es lift.top_m=8 window.min_width=2 resume=true
    foxp2-localise -m target=es,hi                             # both languages, one job each

Reads an activation cache (``sae-cache``) and exported SAEs (``sae-train``); writes
``<out_dir>/localise/{summary,layers,token_sets}.json``, ``<out_dir>/directions.safetensors``
and ``<out_dir>/plots/*.png`` (formats: :mod:`steering.localise.run`). Settings:
:class:`steering.localise.config.LocaliseAppConfig`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sae_train.apps import report_user_errors
from steering.apps import config_dir
from steering.localise.config import register_localise_configs
from steering.localise.run import run_localise

register_localise_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="localise")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_localise(cfg)


if __name__ == "__main__":
    main()
