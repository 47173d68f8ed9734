"""Diagnostics that look inside a trained Med3DQwen: where its answers attend (:mod:`.grounding`), on which parts of
the volume its image tokens rest (:mod:`.footprints`).

Run them as modules, e.g. ``python -m med3dqwen.diagnostics.grounding --help`` (see ``docs/grounding.md``).
"""
