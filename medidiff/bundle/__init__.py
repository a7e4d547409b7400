"""MONAI bundles of medidiff anomaly models (``medidiff export-bundle``).

A `MONAI bundle <https://docs.monai.io/en/latest/mb_specification.html>`_ is a folder that
packages a model with its metadata and a config-driven inference workflow, so that MONAI's
own tools (``python -m monai.bundle run``, MONAI Label, the model zoo) can run it:

=========================  ==========================================================
module                     holds
=========================  ==========================================================
:mod:`~.export`            :func:`export_bundle`: a checkpoint (+ thresholds) -> a bundle
                           folder, written to a temporary name and renamed
:mod:`~.contents`          what the bundle's files say: ``metadata.json``,
                           ``inference.json``, ``logging.conf``, ``docs/README.md``,
                           ``LICENSE``, and the equivalent ``medidiff anomaly`` command
:mod:`~.inference`         the objects ``inference.json`` instantiates (``_target_``):
                           :func:`load_inputs` and :class:`AnomalyEvaluator`, which scores
                           through :func:`medidiff.anomaly.runner.score_folder`, the code
                           path of ``medidiff anomaly``
=========================  ==========================================================

Running a bundle needs medidiff installed (its README and ``required_packages_version``
say so): the workflow is medidiff's detector, not a re-implementation in MONAI transforms,
so a bundle run writes the same maps as ``medidiff anomaly`` with the same settings.
"""

from medidiff.bundle.export import BundleExport, export_bundle

__all__ = ["BundleExport", "export_bundle"]
