"""Command-line plumbing of the build commands (``med3dqwen-build-<name>``, ``datasets_scripts/build_<name>.py``).

Each build setting is declared once, as a field of the builder's ``*BuildConfig`` dataclass with
``field(metadata={"help": ...})``; :class:`DataclassArgumentParser` turns those fields into options with the same
names (``--output_dir``, ``--split_ratios 0.8 0.1 0.1``, ``--no_validate_files``), as transformers'
``HfArgumentParser`` does, and also reads the fixed-length tuples the configs use (``shape: tuple[int, int, int]``
takes exactly three values). It imports neither torch nor transformers, so a build starts fast and its worker
processes stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from med3dqwen.builders.engine import BuildArguments, BuildError, BuildSummary
from med3dqwen.processing.ct_io import CTInputError


__all__ = [
    "DataclassArgumentParser",
    "make_build_parser",
    "print_summary",
    "run_build_command",
    "string_to_bool",
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The command's docstring as written, and every option's default."""


def string_to_bool(value: str | bool) -> bool:
    """``yes/true/t/y/1`` → True, ``no/false/f/n/0`` → False (any case), for ``--flag False`` on the command line."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` → ``X``; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


class DataclassArgumentParser(argparse.ArgumentParser):
    """An argument parser whose options are the fields of dataclasses (one option per field that has a ``help``).

    Types: ``str``, ``int``, ``float``, ``bool`` (``--flag``, ``--flag false``, and ``--no_flag`` when the default is
    True), ``X | None``, ``list[X]`` and ``tuple[X, ...]`` (one or more values), ``tuple[X, X, X]`` (exactly three)
    and ``Literal[...]`` (choices). A field without ``help`` metadata is not an option (it keeps its default); one
    without a default is a required option.

    Args:
        dataclass_types: the dataclasses to fill, in the order :meth:`parse_args_into_dataclasses` returns them.
        **kwargs: passed to ``argparse.ArgumentParser`` (``description``, ``formatter_class``, ...).
    """

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)
        self.dataclass_types = tuple(dataclass_types)
        self._tuple_fields: set[str] = set()
        for dtype in self.dataclass_types:
            hints = typing.get_type_hints(dtype)
            for f in dataclasses.fields(dtype):
                if f.init and "help" in f.metadata:
                    self._add_field(f, hints[f.name])
                elif f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise TypeError(f"{dtype.__name__}.{f.name} has neither a default nor a help text (an option)")

    def _add_field(self, f: dataclasses.Field, annotation: Any) -> None:
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        kind = _strip_optional(annotation)
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            kwargs.update(type=string_to_bool, nargs="?", const=True)
            kwargs.setdefault("default", False)
        elif origin is typing.Literal:
            kwargs.update(choices=args, type=type(args[0]))
        elif origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            kwargs.update(type=args[0], nargs="+")
            self._tuple_fields.update([f.name] if origin is tuple else [])
        elif origin is tuple:
            if len(set(args)) != 1:
                raise TypeError(f"field {f.name}: a tuple option needs one element type, got {kind}")
            kwargs.update(type=args[0], nargs=len(args))
            self._tuple_fields.add(f.name)
        elif kind in (str, int, float):
            kwargs["type"] = kind
        else:
            raise TypeError(f"field {f.name}: type {annotation} cannot be read from the command line")
        self.add_argument(*names, **kwargs)
        if kind is bool and f.default is True:
            self.add_argument(
                f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false", dest=f.name,
                help=f"Set {f.name} to False.",
            )  # fmt: skip

    def parse_args_into_dataclasses(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``args`` (default ``sys.argv[1:]``) into one instance of each dataclass; a value the dataclass
        rejects (its ``__post_init__`` raises ``ValueError``) is reported as a usage error, not a traceback."""
        namespace = vars(self.parse_args(args))
        for name in self._tuple_fields:
            if namespace.get(name) is not None:
                namespace[name] = tuple(namespace[name])
        outputs = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init and "help" in f.metadata}
            try:
                outputs.append(dtype(**{k: v for k, v in namespace.items() if k in names}))
            except ValueError as e:
                self.error(str(e))
        return tuple(outputs)


def make_build_parser(config_class: type, description: str | None) -> DataclassArgumentParser:
    """The parser of a build command: the options of ``config_class`` (what to build) then those of
    :class:`BuildArguments` (how to run); ``--help`` shows ``description`` (the command's docstring) as written and
    every default."""
    return DataclassArgumentParser((config_class, BuildArguments), description=description)


def run_build_command(
    make_parser: Callable[[], DataclassArgumentParser],
    main: Callable[[Any, BuildArguments], Any],
    argv: Sequence[str] | None = None,
) -> None:
    """What a console script (``med3dqwen-build-<name>``) and ``python datasets_scripts/build_<name>.py`` do: log
    to the terminal, parse ``argv`` (default the command line) and call ``main(config, build_args)``.

    A build that cannot go on (:class:`~med3dqwen.builders.engine.BuildError`: a folder that is not ours, a changed
    configuration, ``--strict`` meeting a bad row) or bad input (:class:`~med3dqwen.processing.ct_io.CTInputError`)
    ends with its one-line message and exit status 1, not a traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = make_parser()
    config, build_args = parser.parse_args_into_dataclasses(argv)
    try:
        main(config, build_args)
    except (BuildError, CTInputError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")


def print_summary(
    summary: BuildSummary,
    args: BuildArguments,
    split_line: str,
    *,
    units: str = "volumes",
    rate_units: str | None = None,
    question_types: bool = False,
    notes: Iterable[str] = (),
) -> None:
    """Print what a build command's run did: how many units it built and how fast; then, if it merged, the output
    folder, one line per split, the question types, ``notes``, the skipped rows per reason and how to load it.

    Args:
        summary: what :func:`run_build` returned. args: the run's :class:`BuildArguments`.
        split_line: the line of a split after its name, a format string with the fields ``questions``, ``volumes``
            and ``patients`` (the split's counts), e.g. ``"{questions:8d} questions from {volumes:6d} volumes"``.
        units: what a unit is called (``volumes``, ``images``, ...). rate_units: the same in the rate (default
            ``units``).
        question_types: print the number of questions per type.
        notes: builder-specific lines (e.g. what was left out on purpose), printed after the question types.
    """
    if summary.units_processed:
        print(
            f"built {summary.units_processed} {units} in {summary.seconds:.1f} s "
            f"({summary.volumes_per_minute:.1f} {rate_units or units}/min, {args.num_proc} processes)"
        )
    if not summary.merged:
        print(f"shard {args.shard_index}/{args.num_shards} done; merge with --merge_only when all are")
        return
    print(f"wrote {summary.output_dir}")
    for split, n in summary.questions.items():
        counts = {"questions": n, "volumes": summary.volumes[split], "patients": summary.patients[split]}
        print(f"  {split:<10} " + split_line.format(**counts))
    if question_types:
        print("  question types: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.question_types.items())))
    for note in notes:
        print(f"  {note}")
    if summary.skipped:
        print("  skipped rows: " + ", ".join(f"{k} {v}" for k, v in summary.skipped.items()) + " (skipped.jsonl)")
    folder = summary.output_dir
    print(f'load it with: ds = datasets.load_dataset("{folder}"); ds = med3dqwen.data.resolve_media(ds, "{folder}")')
