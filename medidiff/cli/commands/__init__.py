"""Sub-commands of the ``medidiff`` CLI, one module each (argparse set-up + ``run``)."""
