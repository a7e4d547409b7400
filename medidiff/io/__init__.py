"""Reading and writing medical volumes without losing their geometry.

=========================  ==========================================================
module                     holds
=========================  ==========================================================
:mod:`~.volume`            the :class:`Volume` type, :func:`load_volume` (dispatch by
                           format) and :func:`save_volume`
:mod:`~.nifti`             NIfTI-1/2 and MGH through nibabel; the NIfTI writer
:mod:`~.itk`               NRRD and MetaImage through SimpleITK (LPS -> RAS)
:mod:`~.dicom`             DICOM files and series folders (SimpleITK/GDCM)
:mod:`~.reading`           what the readers share: reason-coded errors, the read plan
:mod:`~.atomic`            atomic writes (temporary file + rename), JSON writing
=========================  ==========================================================

Only numpy is imported here; nibabel and SimpleITK load on first use.

Example:
    >>> from medidiff.io import load_volume, save_volume, Volume
"""

from medidiff.io.atomic import (
    atomic_path,
    atomic_write,
    check_writable_folder,
    json_default,
    write_json_atomic,
    write_text_atomic,
)
from medidiff.io.dicom import has_dicom_marker, is_dicom_folder
from medidiff.io.itk import sitk_geometry_to_ras
from medidiff.io.reading import ERROR_REASONS, max_voxel_bytes
from medidiff.io.volume import (
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    Volume,
    check_same_grid,
    is_volume_path,
    load_volume,
    save_volume,
    scan_name,
    strip_volume_suffix,
)

__all__ = [
    "ERROR_REASONS",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Volume",
    "atomic_path",
    "atomic_write",
    "check_same_grid",
    "check_writable_folder",
    "has_dicom_marker",
    "is_dicom_folder",
    "is_volume_path",
    "json_default",
    "load_volume",
    "max_voxel_bytes",
    "save_volume",
    "scan_name",
    "sitk_geometry_to_ras",
    "strip_volume_suffix",
    "write_json_atomic",
    "write_text_atomic",
]
