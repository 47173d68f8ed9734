"""The browser viewer ``med3dqwen-app`` (Gradio; the ``app`` extra): see ``docs/app.md``.

- :mod:`med3dqwen.app.cases`: cases (uploads, phantoms), ROI masks and rendered slices, no Gradio;
- :mod:`med3dqwen.app.ui`: ``build_app(model, adapter=None)``, the page;
- :mod:`med3dqwen.app.cli`: the command line and ``launch``.

Nothing is imported here, so ``import med3dqwen.app.cases`` works without Gradio installed.
"""
