"""Numerical core: centred FFTs, complex arithmetic, coil operators and the multi-coil MRI forward model.

Everything here works on fastMRI's real layout ``(..., H, W, 2)`` (last axis = real, imag) and is differentiable.
"""

from reconkit.ops.backend import resolve_backend, triton_available
from reconkit.ops.coils import (
    data_consistency,
    planar_sens_expand,
    planar_sens_reduce,
    sampling_mask,
    sens_expand,
    sens_reduce,
    stacked_sens_expand,
    stacked_sens_reduce,
)
from reconkit.ops.complex import (
    as_complex,
    complex_abs,
    complex_abs_sq,
    complex_conj,
    complex_mul,
    native_complex_ok,
    pair_factor,
    power_of_two_scale,
    rss,
    rss_complex,
)
from reconkit.ops.fft import (
    centering_modulation,
    centering_signs,
    current_fft_impl,
    fft2c,
    fft_impl,
    fftc,
    ifft2c,
    ifftc,
)
from reconkit.ops.operators import MultiCoilMRI, accurate_sum, conjugate_gradient, fista, real_inner
from reconkit.ops.sampled_lines import zero_filled_rss_sampled_lines
from reconkit.ops.wavelet import haar_soft_threshold, wavelet_shifts

__all__ = [
    "MultiCoilMRI",
    "accurate_sum",
    "as_complex",
    "centering_modulation",
    "centering_signs",
    "complex_abs",
    "complex_abs_sq",
    "complex_conj",
    "complex_mul",
    "conjugate_gradient",
    "current_fft_impl",
    "data_consistency",
    "fft2c",
    "fft_impl",
    "fftc",
    "fista",
    "haar_soft_threshold",
    "ifft2c",
    "ifftc",
    "native_complex_ok",
    "pair_factor",
    "planar_sens_expand",
    "planar_sens_reduce",
    "power_of_two_scale",
    "real_inner",
    "resolve_backend",
    "rss",
    "rss_complex",
    "sampling_mask",
    "sens_expand",
    "sens_reduce",
    "stacked_sens_expand",
    "stacked_sens_reduce",
    "triton_available",
    "wavelet_shifts",
    "zero_filled_rss_sampled_lines",
]
