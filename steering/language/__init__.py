"""The shared base: what "the target language" means to a model, used by every stage.

``token_sets``   V_t, V_en: which decoded token ids belong to each language.
``defaultness``  ΔM: how much next-token mass the model puts on V_t rather than V_en.

Imports nothing from ``steering`` outside this package.
"""
