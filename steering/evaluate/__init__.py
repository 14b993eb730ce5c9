"""Stage III, the measurement: tune every method on the tuning split, score it on the
evaluation split, report.

``config``     the ``foxp2-steer`` schema (SteerAppConfig)
``judge``      language ID, fluency guards, bootstrap / Wilson intervals
``harness``    generation, ΔM, KL and NLL under a steer; the strength tuner
``native``     the native reference row (the model asked in the target language)
``tuning``     the steer stage's searches: the window scan and each method's tuning
``report``     report.json / report.md / PNGs / wandb
``pipeline``   the orchestrator of ``foxp2-steer`` (run_steer): build → tune → evaluate → report

Tuning is an evaluation on the tuning split, so the orchestrator of foxp2-steer lives here.
May import ``language``, ``localise`` and ``steer``; nothing of ``apps``.
"""
