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

    def test_interpreter_mode_is_fixed_at_import(monkeypatch) -> None:
        """Setting TRITON_INTERPRET after the kernels were compiled for CUDA must not let CPU tensors through
        (they would fail deep in Triton's driver with "0 active drivers")."""
        if not triton_available():
            pytest.skip("Triton is not installed")
        from reconkit.ops import triton_kernels

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not triton_kernels.interpreted()
        image, sens_maps = torch.randn(1, 1, 4, 4, 2), torch.randn(1, 2, 4, 4, 2)
        with pytest.raises(RuntimeError, match="image: the Triton backend needs CUDA tensors"):
            sens_expand(image, sens_maps, backend="triton")


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

    # ------------------------------------------------------------------------------------------------ launch

    def test_grids_put_the_coil_planes_on_the_axis_without_cudas_65535_limit(monkeypatch) -> None:
        """CUDA launches at most 65535 programs along grid axes 1 and 2 (2³¹ − 1 along axis 0): batch × coils
        planes on axis 1, as the kernels once had them, failed to launch on a GPU past 65535 planes. The
        interpreter has no such limit, so the grids are recorded (kernels stubbed) for 70000 planes."""
        grids = []

        class Recorder:
            def __getitem__(self, grid):
                grids.append(grid)
                return lambda *args, **kwargs: None

        for name in ("_expand_kernel", "_sign_kernel", "_reduce_kernel"):
            monkeypatch.setattr(triton_kernels, name, Recorder())
        image, sens_maps = randn(1, 1, 2, 2, 2, seed=1), randn(2, 35000, 2, 2, 2, seed=2)
        triton_kernels.sens_expand(image, sens_maps)
        triton_kernels.sens_reduce(sens_maps, sens_maps)
        assert len(grids) >= 4 and all(len(grid) == 2 and grid[1] <= 65535 for grid in grids), grids
        assert max(grid[0] for grid in grids) == 70000

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

    def test_double_backward_equals_torch_path() -> None:
        """Hessian-vector products (``create_graph=True``) through all three ops: the kernels' backward was
        once-differentiable, so ``torch.autograd.functional.hvp`` returned zeros and a second ``autograd.grad``
        raised (gradient audit)."""
        f64 = torch.float64
        image, sens_maps = randn(2, 1, 6, 4, 2, seed=70, dtype=f64), randn(1, 3, 6, 4, 2, seed=71, dtype=f64)
        ref, mask = randn(2, 3, 6, 4, 2, seed=72, dtype=f64), line_mask(2, 4, 73)
        weight = torch.tensor([0.3], dtype=f64, device=KERNEL_DEVICE)
        vectors = [randn(*t.shape, seed=74 + i, dtype=f64) for i, t in enumerate((image, sens_maps, ref, weight))]

        def products(backend: str) -> tuple[torch.Tensor, ...]:
            def loss(x, s, k0, w):
                kspace = data_consistency(sens_expand(x, s, backend=backend), k0, mask, w, backend=backend)
                return sens_reduce(kspace.square(), s, backend=backend).square().sum()

            return torch.autograd.functional.hvp(loss, (image, sens_maps, ref, weight), tuple(vectors))[1]

        expected = products("torch")
        assert all(p.abs().max() > 0 for p in expected)
        torch.testing.assert_close(products("triton"), expected)


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

    # ------------------------------------------------------------------------------- parity with the torch path

    def test_batch_of_one_broadcasts_as_on_the_torch_path() -> None:
        """MultiCoilMRI allows one set of maps for a batch of images (and the reverse); so must the kernels."""
        from reconkit.ops import MultiCoilMRI

        sens_1, image_2 = randn(1, 3, 7, 6, 2, seed=30), randn(2, 1, 7, 6, 2, seed=31).requires_grad_()
        kspace_2 = randn(2, 3, 7, 6, 2, seed=32)
        torch.testing.assert_close(
            triton_kernels.sens_expand(image_2, sens_1), sens_expand(image_2, sens_1, backend="torch")
        )
        torch.testing.assert_close(
            triton_kernels.sens_reduce(kspace_2, sens_1), sens_reduce(kspace_2, sens_1, backend="torch")
        )
        torch.testing.assert_close(triton_kernels.sens_expand(image_2[:1], randn(2, 3, 7, 6, 2, seed=33)),
                                   sens_expand(image_2[:1], randn(2, 3, 7, 6, 2, seed=33), backend="torch"))
        mask = line_mask(1, 6, 34).float()
        weight = torch.tensor(0.5, device=KERNEL_DEVICE)
        torch.testing.assert_close(triton_kernels.data_consistency(kspace_2, kspace_2[:1], mask, weight),
                                   data_consistency(kspace_2, kspace_2[:1], mask, weight, backend="torch"))
        op = MultiCoilMRI(mask, sens_1)
        (grad,) = torch.autograd.grad(op.A(image_2).square().sum(), image_2)
        torch.testing.assert_close(grad, 2 * op.normal(image_2.detach()), rtol=1e-5, atol=1e-5)

    def test_dtypes_follow_the_torch_path() -> None:
        """A float32 / float64 mix is computed in float64; half-precision DC stays half precision."""
        image, sens_maps = randn(1, 1, 5, 6, 2, seed=35, dtype=torch.float64), randn(1, 2, 5, 6, 2, seed=36)
        out = triton_kernels.sens_expand(image, sens_maps)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, sens_expand(image, sens_maps, backend="torch"))
        kspace = randn(1, 2, 5, 6, 2, seed=37)
        assert triton_kernels.sens_reduce(kspace.double(), sens_maps).dtype == torch.float64
        mask, weight = line_mask(1, 6, 38), torch.tensor(0.25, device=KERNEL_DEVICE)
        for half in (torch.float16, torch.bfloat16):
            ours = data_consistency(kspace.to(half), kspace.flip(1).to(half), mask, weight, backend="triton")
            expected = data_consistency(kspace.to(half), kspace.flip(1).to(half), mask, weight, backend="torch")
            assert ours.dtype == expected.dtype == half
            torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-2)  # ours rounds once, from float32
            ours = sens_expand(image.to(half), sens_maps.to(half), backend="triton")
            expected = sens_expand(image.to(half), sens_maps.to(half), backend="torch")
            assert ours.dtype == expected.dtype == torch.float32
            torch.testing.assert_close(ours, expected)  # the torch path also multiplies in float32 now
            ours = sens_expand(image.to(half), sens_maps.double(), backend="triton")
            expected = sens_expand(image.to(half), sens_maps.double(), backend="torch")
            assert ours.dtype == expected.dtype == torch.float64  # half with float64 is float64 on both paths
            torch.testing.assert_close(ours, expected)

    @pytest.mark.parametrize("size", [(6, 4), (5, 7)])
    def test_empty_batch_or_coils_give_empty_results_as_on_the_torch_path(size) -> None:
        """No values: the FFT between the kernels is skipped (torch's MKL FFT raised 'Inconsistent configuration
        parameters' on it); no coils give a zero image. An empty H or W is the FFTs' ValueError."""
        for batch, coils in [(0, 3), (2, 0)]:
            image = randn(batch, 1, *size, 2, seed=60).requires_grad_()
            sens_maps = randn(batch, coils, *size, 2, seed=61).requires_grad_()
            kspace = triton_kernels.sens_expand(image, sens_maps)
            assert kspace.shape == sens_maps.shape
            combined = triton_kernels.sens_reduce(kspace, sens_maps)
            torch.testing.assert_close(combined, sens_reduce(kspace, sens_maps, backend="torch"))
            combined.sum().backward()
            assert image.grad.shape == image.shape and sens_maps.grad.shape == sens_maps.shape
        with pytest.raises(ValueError, match="length 0"):
            triton_kernels.sens_expand(randn(1, 1, 0, 4, 2, seed=62), randn(1, 2, 0, 4, 2, seed=63))

    @pytest.mark.parametrize("size", [(6, 4), (5, 7)])
    def test_forward_mode_ad_equals_torch_path(size) -> None:
        """torch.func.jvp (reconkit.training.regime's linearisation error) runs through the kernels."""
        height, width = size
        f64 = torch.float64
        image = randn(2, 1, height, width, 2, seed=40, dtype=f64)
        sens_maps = randn(2, 3, height, width, 2, seed=41, dtype=f64)
        kspace = randn(2, 3, height, width, 2, seed=42, dtype=f64)
        ref = randn(2, 3, height, width, 2, seed=43, dtype=f64)
        mask = torch.rand(2, 1, 1, width, 1, dtype=f64, generator=torch.Generator().manual_seed(44)).to(KERNEL_DEVICE)
        weight = torch.tensor(0.3, dtype=f64, device=KERNEL_DEVICE)
        cases = [
            (lambda b: lambda x, s: sens_expand(x, s, backend=b), (image, sens_maps)),
            (lambda b: lambda k, s: sens_reduce(k, s, backend=b), (kspace, sens_maps)),
            (lambda b: lambda k, k0, m, w: data_consistency(k, k0, m, w, backend=b), (kspace, ref, mask, weight)),
        ]
        for make, primals in cases:
            tangents = tuple(randn(*p.shape, 1, seed=50 + i, dtype=f64).reshape(p.shape) for i, p in enumerate(primals))
            ours = torch.func.jvp(make("triton"), primals, tangents)
            expected = torch.func.jvp(make("torch"), primals, tangents)
            torch.testing.assert_close(ours, expected)

    def test_export_path_wins_over_the_triton_backend(monkeypatch) -> None:
        from reconkit.ops import fft_impl

        monkeypatch.setenv("RECONKIT_OPS_BACKEND", "triton")
        monkeypatch.setattr(triton_kernels, "sens_expand", lambda *a: pytest.fail("Triton kernel used on export path"))
        image, sens_maps = randn(1, 1, 4, 4, 2, seed=45), randn(1, 2, 4, 4, 2, seed=46)
        with fft_impl("matmul"):
            out = sens_expand(image, sens_maps)
        torch.testing.assert_close(out, sens_expand(image, sens_maps, backend="torch"), rtol=1e-5, atol=1e-5)
