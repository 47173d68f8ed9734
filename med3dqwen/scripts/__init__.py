"""The command-line programs behind the console scripts (``med3dqwen-build-<name>``) and ``datasets_scripts/``.

Each module has a usage docstring (its ``--help``), ``main(config, build_args)``, ``make_parser()`` and ``cli()``,
the console script's entry point, as TRL's ``trl/scripts/`` do.
"""
