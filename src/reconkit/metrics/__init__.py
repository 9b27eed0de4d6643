"""Image-quality metrics equal to fastMRI's (``fastmri.evaluate``) and the SSIM training loss."""

from reconkit.metrics.image import MetricTable, nmse, psnr, psnr_torch, ssim, ssim_torch, volume_metrics
from reconkit.metrics.losses import SSIMLoss, ssim_map

__all__ = ["nmse", "psnr", "ssim", "psnr_torch", "ssim_torch", "volume_metrics", "MetricTable", "SSIMLoss", "ssim_map"]
