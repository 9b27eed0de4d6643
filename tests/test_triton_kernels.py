"""Fused Triton kernels (reconkit.ops.triton_kernels) against reconkit's torch path and fastmri, forward and backward.

Without a GPU the kernels run under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before Triton is imported. So that this does not leak into other test modules, a plain ``pytest`` run of this
file runs one test that starts a fresh process with ``TRITON_INTERPRET=1`` running this module's kernel tests and
fails if any of them fails (its output is shown then). With ``TRITON_INTERPRET=1`` already set, or on a CUDA
machine, the kernel tests are collected directly (on CPU tensors resp. CUDA tensors).

    .venv/bin/pytest -q tests/test_triton_kernels.py                       # driver + dispatch tests
    TRITON_INTERPRET=1 .venv/bin/pytest -q tests/test_triton_kernels.py    # the kernel tests, one by one
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from reconkit.ops import data_consistency, sens_expand, sens_reduce, triton_available

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNEL_DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() and triton_available() else None)

# (H, W): H/2 + W/2 odd, H/2 + W/2 even, both odd, odd × even, even × odd
SIZES = [(8, 6), (6, 10), (5, 7), (7, 4), (4, 5)]


def test_triton_available_is_a_bool() -> None:
    assert isinstance(triton_available(), bool)


if not INTERPRETED:  # the interpreter accepts CPU tensors

    def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch) -> None:
        if not triton_available():
            pytest.skip("Triton is not installed")
        image, sens_maps = torch.randn(1, 1, 4, 4, 2), torch.randn(1, 2, 4, 4, 2)
        with pytest.raises(RuntimeError, match="image: the Triton backend needs CUDA tensors"):
            sens_expand(image, sens_maps, backend="triton")
        monkeypatch.setenv("RECONKIT_OPS_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="kspace: the Triton backend needs CUDA tensors"):
            sens_reduce(sens_maps, sens_maps)


if KERNEL_DEVICE is None:

    def test_kernels_under_triton_interpreter() -> None:
        """This module's kernel tests, run in a fresh process with ``TRITON_INTERPRET=1``; all must pass."""
        if not triton_available():
            pytest.skip("Triton is not installed")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env.pop("RECONKIT_OPS_BACKEND", None)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            check=False, env=env, capture_output=True, text=True, timeout=900,
        )
        report = proc.stdout[-8000:] + proc.stderr[-4000:]
        assert proc.returncode == 0, report
        passed = re.search(r"(\d+) passed", proc.stdout)
        assert passed and int(passed.group(1)) > 40, report
        assert "skipped" not in proc.stdout.splitlines()[-1], report

else:
    import fastmri
    from fastmri.models.varnet import VarNetBlock

    from reconkit.models import VarNet
    from reconkit.ops import triton_kernels

    def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(KERNEL_DEVICE)

    def line_mask(batch: int, width: int, seed: int) -> torch.Tensor:
        return randn(batch, 1, 1, width, 1, seed=seed) > 0

    def mask_2d(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        return randn(batch, 1, height, width, 1, seed=seed) > 0

    # ------------------------------------------------------------------------------------------------ forward

    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("coils", [1, 3, 8])
    def test_sens_expand_and_reduce_equal_torch_path(size, coils) -> None:
        height, width = size
        image = randn(2, 1, height, width, 2, seed=1)
        sens_maps, kspace = randn(2, coils, height, width, 2, seed=2), randn(2, coils, height, width, 2, seed=3)
        torch.testing.assert_close(
            triton_kernels.sens_expand(image, sens_maps), sens_expand(image, sens_maps, backend="torch"),
            rtol=1e-5, atol=1e-5,
        )
        torch.testing.assert_close(
            triton_kernels.sens_reduce(kspace, sens_maps), sens_reduce(kspace, sens_maps, backend="torch"),
            rtol=1e-5, atol=1e-5,
        )

    @pytest.mark.parametrize("size", [(8, 6), (5, 7)])
    def test_sens_expand_and_reduce_equal_fastmri(size) -> None:
        height, width = size
        image, sens_maps = randn(2, 1, height, width, 2, seed=4), randn(2, 3, height, width, 2, seed=5)
        kspace = randn(2, 3, height, width, 2, seed=6)
        block = VarNetBlock(torch.nn.Identity())
        torch.testing.assert_close(
            sens_expand(image, sens_maps, backend="triton"), block.sens_expand(image, sens_maps), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            sens_reduce(kspace, sens_maps, backend="triton"), block.sens_reduce(kspace, sens_maps), rtol=1e-5, atol=1e-5
        )
        unit_maps = torch.zeros_like(image)
        unit_maps[..., 0] = 1.0  # sens_expand with unit maps is fastmri's centred FFT
        torch.testing.assert_close(
            triton_kernels.sens_expand(image, unit_maps), fastmri.fft2c(image), rtol=1e-5, atol=1e-5
        )

    @pytest.mark.parametrize("layout", ["line", "2d"])
    @pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
    @pytest.mark.parametrize("coils", [1, 3])
    def test_data_consistency_equals_torch_path(layout, mask_dtype, coils) -> None:
        height, width = 6, 5
        kspace, ref = randn(2, coils, height, width, 2, seed=7), randn(2, coils, height, width, 2, seed=8)
        mask = line_mask(2, width, 9) if layout == "line" else mask_2d(2, height, width, 9)
        mask = mask.to(mask_dtype)
        weight = torch.tensor(0.37, device=KERNEL_DEVICE)
        expected = data_consistency(kspace, ref, mask, weight, backend="torch")
        torch.testing.assert_close(triton_kernels.data_consistency(kspace, ref, mask, weight), expected)
        # fastmri's VarNetBlock DC term: k - where(mask, k - k0, 0) * dc_weight
        fastmri_dc = kspace - torch.where(mask.bool(), kspace - ref, torch.zeros_like(kspace)) * 0.37
        torch.testing.assert_close(data_consistency(kspace, ref, mask, weight, backend="triton"), fastmri_dc)

    # ------------------------------------------------------------------------------------------------ backward

    @pytest.mark.parametrize("size", [(4, 6), (4, 4), (3, 5), (4, 3)])
    @pytest.mark.parametrize("coils", [1, 3])
    def test_sens_ops_gradcheck_float64(size, coils) -> None:
        height, width = size
        image = randn(2, 1, height, width, 2, seed=10, dtype=torch.float64).requires_grad_()
        sens_maps = randn(2, coils, height, width, 2, seed=11, dtype=torch.float64).requires_grad_()
        kspace = randn(2, coils, height, width, 2, seed=12, dtype=torch.float64).requires_grad_()
        assert triton_kernels.sens_expand(image, sens_maps).dtype == torch.float64
        assert torch.autograd.gradcheck(triton_kernels.sens_expand, (image, sens_maps), fast_mode=True)
        assert torch.autograd.gradcheck(triton_kernels.sens_reduce, (kspace, sens_maps), fast_mode=True)

    @pytest.mark.parametrize("layout", ["line", "2d"])
    @pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64])
    def test_data_consistency_gradcheck_float64(layout, mask_dtype) -> None:
        height, width = 3, 4
        kspace = randn(2, 2, height, width, 2, seed=13, dtype=torch.float64).requires_grad_()
        ref = randn(2, 2, height, width, 2, seed=14, dtype=torch.float64).requires_grad_()
        mask = (line_mask(2, width, 15) if layout == "line" else mask_2d(2, height, width, 15)).to(mask_dtype)
        weight = torch.tensor(0.6, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda k, k0, w: triton_kernels.data_consistency(k, k0, mask, w), (kspace, ref, weight), fast_mode=True
        )

    @pytest.mark.parametrize("size", [(8, 6), (5, 7)])
    def test_gradients_equal_torch_path_float32(size) -> None:
        """One VarNet-like cascade (reduce → expand → DC) in float32: every input's gradient as the torch path's."""
        height, width = size

        def cascade(backend: str) -> list[torch.Tensor]:
            kspace = randn(2, 3, height, width, 2, seed=16).requires_grad_()
            ref = randn(2, 3, height, width, 2, seed=17).requires_grad_()
            sens_maps = randn(2, 3, height, width, 2, seed=18).requires_grad_()
            weight = torch.tensor(0.4, device=KERNEL_DEVICE, requires_grad=True)
            mask = line_mask(2, width, 19).float()
            image = sens_reduce(kspace, sens_maps, backend=backend)
            model_term = sens_expand(image * 0.5, sens_maps, backend=backend)
            out = data_consistency(kspace, ref, mask, weight, backend=backend) - model_term
            (out * randn(*out.shape, seed=20)).sum().backward()
            return [out.detach(), kspace.grad, ref.grad, sens_maps.grad, weight.grad]

        for ours, expected in zip(cascade("triton"), cascade("torch")):
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)

    # ------------------------------------------------------------------------------------------------ dispatch

    def test_varnet_with_triton_backend_equals_torch_backend(monkeypatch) -> None:
        """Models need no change: RECONKIT_OPS_BACKEND=triton routes VarNet's ops through the kernels."""
        calls = {"sens_expand": 0, "sens_reduce": 0, "data_consistency": 0}
        for name in calls:
            original = getattr(triton_kernels, name)

            def spy(*args, _name=name, _original=original):
                calls[_name] += 1
                return _original(*args)

            monkeypatch.setattr(triton_kernels, name, spy)
        torch.manual_seed(0)
        net = VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=2, pools=1).to(KERNEL_DEVICE)
        kspace, mask = randn(1, 3, 16, 10, 2, seed=21), line_mask(1, 10, 22).float()
        mask[..., 4:6, :] = 1.0
        kspace = kspace * mask
        results = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("RECONKIT_OPS_BACKEND", backend)
            net.zero_grad()
            image = net(kspace, mask)
            image.sum().backward()
            results[backend] = (image.detach(), net.cascades[0].dc_weight.grad.clone())
        assert calls == {"sens_expand": 2, "sens_reduce": 2, "data_consistency": 2}
        torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-3, atol=1e-5)

    def test_bad_inputs_name_the_tensor() -> None:
        image, sens_maps = randn(1, 1, 4, 4, 2, seed=23), randn(1, 2, 4, 4, 2, seed=24)
        with pytest.raises(ValueError, match=r"image \(1, 1, 4, 4, 2\) and sens_maps \(1, 2, 4, 6, 2\) differ"):
            triton_kernels.sens_expand(image, randn(1, 2, 4, 6, 2, seed=25))
        with pytest.raises(ValueError, match="kspace: expected shape"):
            triton_kernels.sens_reduce(sens_maps[..., 0], sens_maps)
        with pytest.raises(ValueError, match=r"mask: expected a shape broadcasting.*got \(1, 1, 1, 3, 1\)"):
            triton_kernels.data_consistency(sens_maps, sens_maps, torch.ones(1, 1, 1, 3, 1), torch.tensor(1.0))
        with pytest.raises(ValueError, match="weight: expected one element"):
            triton_kernels.data_consistency(sens_maps, sens_maps, torch.ones(1, 1, 1, 4, 1), torch.ones(2))
