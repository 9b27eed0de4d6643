"""Output writers, all atomic (:func:`reconkit.atomic.atomic_path`: temporary file in the destination directory,
then ``os.replace``).

* :func:`write_fastmri_h5` – fastMRI submission layout (``reconstruction`` float32 ``(slices, h, w)``)
* :func:`write_nifti` – NIfTI-1 with an affine from pixel spacing and slice thickness
* :func:`write_dicom_series` – DICOM MR Image Storage, one file per slice (:func:`new_study` groups series)
* :func:`write_png_panel` / :func:`write_png_panels` – zero-filled | reconstruction | reference | error panels
* :func:`write_metrics_csv` – per-volume NMSE / PSNR / SSIM (and per-band NMSE) rows
* :func:`write_metrics_plot` – the same rows drawn in one PNG figure
"""

from reconkit.io.dicom import Study, new_study, sequence_attributes, write_dicom_series
from reconkit.io.geometry import ImageGeometry, PatientFrame, acquisition_frame, fixed_frame, geometry_from_header
from reconkit.io.hdf5 import write_fastmri_h5
from reconkit.io.metrics_csv import write_metrics_csv
from reconkit.io.metrics_plot import write_metrics_plot
from reconkit.io.nifti import nifti_affine, write_nifti
from reconkit.io.png import write_png_panel, write_png_panels

__all__ = [
    "ImageGeometry",
    "PatientFrame",
    "Study",
    "acquisition_frame",
    "fixed_frame",
    "geometry_from_header",
    "new_study",
    "nifti_affine",
    "sequence_attributes",
    "write_dicom_series",
    "write_fastmri_h5",
    "write_metrics_csv",
    "write_metrics_plot",
    "write_nifti",
    "write_png_panel",
    "write_png_panels",
]
