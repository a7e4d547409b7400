"""From scan files to what a model sees.

=========================  ==========================================================
module                     holds
=========================  ==========================================================
:mod:`~.datalist`          datalists: folder, glob, CSV, Decathlon ``dataset.json``
                           (imports neither torch nor MONAI)
:mod:`~.preprocessing`     :class:`~.preprocessing.Preprocessing`, the settings a
                           checkpoint stores
:mod:`~.transforms`        ``preprocess`` onto the model grid and back (``to_native``)
:mod:`~.compose`           the same preprocessing as an invertible MONAI ``Compose``
                           of dictionary transforms
:mod:`~.datasets`          cached torch datasets: 2D slices, 3D volumes or patches
=========================  ==========================================================

Nothing is imported here, so ``import medidiff.data.datalist`` stays light.
"""
