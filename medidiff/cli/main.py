"""The ``medidiff`` command.

Each sub-command lives in ``medidiff/cli/commands/<name>.py`` with two functions:
``add_arguments(parser)`` (argparse only, so ``--help`` stays instant) and
``run(args) -> int`` (heavy imports happen inside). Errors a user can fix are
:class:`~medidiff.errors.MedidiffError` and are printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (name, module, one-line help) in the order of DESIGN.md's CLI.
COMMANDS: list[tuple[str, str, str]] = [
    ("info", "medidiff.cli.commands.info", "print a volume's shape, spacing, orientation, affine and range"),
    ("train", "medidiff.cli.commands.train", "train a diffusion U-Net (or a latent model's autoencoder) from a YAML config"),
    ("synthesize", "medidiff.cli.commands.synthesize", "generate new scans from a checkpoint"),
    ("inpaint", "medidiff.cli.commands.inpaint",
     "paint lesions into scans: image + label pairs (RePaint, mask-conditioned models)"),
    ("calibrate", "medidiff.cli.commands.calibrate", "anomaly thresholds from healthy scans at a target FPR"),
    ("anomaly", "medidiff.cli.commands.anomaly", "score scans for anomalies (maps, segmentations, scores)"),
    ("evaluate", "medidiff.cli.commands.evaluate", "voxel/scan metrics of anomaly maps against masks"),
    ("evaluate-synthesis", "medidiff.cli.commands.evaluate_synthesis",
     "quality, diversity and memorisation metrics of synthetic scans"),
    ("export-bundle", "medidiff.cli.commands.export_bundle",
     "package a checkpoint as a MONAI bundle (python -m monai.bundle run)"),
    ("demo", "medidiff.cli.commands.demo", "the main job on the bundled model and sample_data"),
]


def build_parser() -> argparse.ArgumentParser:
    from medidiff import __version__

    parser = argparse.ArgumentParser(
        prog="medidiff",
        description=(
            "Denoising-diffusion models for medical volumes (MRI, CT): train, synthesise "
            "new scans, and detect anomalies by partial diffusion. Run "
            "'medidiff COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"medidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def _error(message: str) -> None:
    # One line, no traceback: newlines inside a message are folded.
    print(f"medidiff: error: {' '.join(str(message).split())}", file=sys.stderr)


_INTERRUPTED = "interrupted (Ctrl-C); finished outputs are kept, unfinished ones were not written"


def main(argv: list[str] | None = None) -> int:
    """Run ``medidiff ARGV``; returns the exit status (130 after Ctrl-C, at any moment).

    Called without ``argv`` (the ``medidiff`` command itself), a Ctrl-C ends the process
    right after its one-line message: an interrupt can leave a library's lock or thread in
    a state that blocks the interpreter's shutdown (atexit handlers, thread joins), and
    everything medidiff writes is complete or already removed by then.
    """
    try:
        code = _main(argv)
        if argv is None:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is handled below
    except KeyboardInterrupt:  # e.g. while the parser or a command module is imported
        _error(_INTERRUPTED)
        code = 130
    except BrokenPipeError:
        code = _stdout_closed()
    if code == 130 and argv is None:
        # Collect what the interrupted work left in reference cycles (a worker pool and its
        # semaphores): os._exit runs no finalizers, and multiprocessing's resource tracker
        # would otherwise warn about "leaked semaphore objects" after our one line.
        import gc

        gc.collect()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        os._exit(130)
    return code


def _main(argv: list[str] | None) -> int:
    from medidiff.errors import MedidiffError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except MedidiffError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error(_INTERRUPTED)
        return 130
    except MemoryError:
        _error("out of memory; try a smaller --batch-size or a smaller input")
        return 1
    except BrokenPipeError:  # the reader went away, e.g. ``medidiff info F | head -2``
        return _stdout_closed()
    except Exception as exc:  # noqa: BLE001 - last line of defence; MEDIDIFF_DEBUG shows the trace
        if os.environ.get("MEDIDIFF_DEBUG"):
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (set MEDIDIFF_DEBUG=1 for a traceback)")
        return 1


def _stdout_closed() -> int:
    """Stop quietly, as a program killed by SIGPIPE would (status 141): point stdout at
    /dev/null so that the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (already closed, or not a file)
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
