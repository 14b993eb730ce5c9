"""Stage III, the edit itself: turn a localisation into steering artifacts and apply them.

``artifact``      SteeringArtifact / LayerEdit: one safetensors + json per (model, language)
``runtime``       steer(model, artifact, gamma=…): the forward hooks on any HF causal LM
``localisation``  Localisation: the files of one foxp2-localise run, read once
``build``         the pieces every method builds from (pushes, gates, English terms, CAA means)
``methods``       the method registry: one module per family, one MethodSpec per method
``export``        steers outside the library: a llama.cpp control vector, a plain HF folder

May import ``steering.language`` and ``steering.localise``; nothing of ``evaluate`` or ``apps``.
"""
