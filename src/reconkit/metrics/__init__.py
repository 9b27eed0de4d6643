"""Image-quality metrics equal to fastMRI's (``fastmri.evaluate``) and the SSIM training loss."""

from reconkit.metrics.image import MetricTable, nmse, psnr, psnr_torch, ssim, ssim_torch, volume_metrics
from reconkit.metrics.losses import SSIMLoss, ssim_map

__all__ = ["MetricTable", "SSIMLoss", "nmse", "psnr", "psnr_torch", "ssim", "ssim_map", "ssim_torch", "volume_metrics"]
