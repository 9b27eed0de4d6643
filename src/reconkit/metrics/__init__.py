"""Image-quality metrics equal to fastMRI's (``fastmri.evaluate``) and the SSIM training loss."""

from reconkit.metrics.image import MetricTable, nmse, psnr, psnr_torch, ssim, ssim_torch, volume_metrics
from reconkit.metrics.losses import SSIMLoss, ssim_map
from reconkit.metrics.spectral import band_energies, band_index, band_nmse

__all__ = ["MetricTable", "SSIMLoss", "band_energies", "band_index", "band_nmse", "nmse", "psnr", "psnr_torch", "ssim",
           "ssim_map", "ssim_torch", "volume_metrics"]
