"""Stage I–II (``foxp2-localise``): find the language features and neurons of one target.

``config``       the app's schema (LocaliseAppConfig, one dataclass per step)
``selectivity``  Sel_j on the cache's parallel pairs
``lift``         the logit-mass lift of a feature push, the ranking, K
``tracing``      resid features → the MLP neurons that write them (N_t, N_en)
``lape``         LAPE's language-specific neurons (a baseline's neuron finder)
``spectra``      difference spectra per layer (σ, eigengap, r_eff, Mass, Stab, nulls)
``window``       the contiguous window of layers that maximises Σ Mass·Stab
``plots``        the localisation's PNGs
``inputs``       the checked inputs: cache, languages, layers and SAEs, corpus texts
``layer``        one layer's analysis, as named steps (analyse_layer)
``ledger``       seconds and forward passes per step; JSON writing and digests
``outputs``      directions.safetensors and the plots
``run``          the orchestrator (run_localise) and the output formats it writes

May import ``steering.language``; nothing of ``steer``, ``evaluate`` or ``apps``.
"""
