"""Check a running `reconkit serve` with KServe's own Python clients (``kserve.InferenceRESTClient`` / ``InferenceGRPCClient``).

The test suite talks to the server with Triton's clients (``tritonclient.http`` / ``tritonclient.grpc``). The
``kserve`` package pins ``protobuf<7`` and pulls in Kubernetes and pandas, so it is not a test dependency. Run
this script by hand, in a virtual environment of its own::

    python -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve numpy   # + onnxruntime for --onnx
    reconkit export --checkpoint checkpoints/varnet_small.ckpt --output /tmp/v.onnx --size 192 112 \\
        --triton-repository /tmp/repo --model-name varnet
    reconkit serve --model-repository /tmp/repo --port 8000 --grpc-port 8001 &
    /tmp/kserve-venv/bin/python deploy/kserve/client_check.py --height 192 --width 112 --onnx /tmp/v.onnx

What it checks:

* health: server live, server ready, model ready, over REST and over gRPC;
* one batch of random line-masked k-space sent four ways: REST with JSON data, REST with binary data, gRPC with
  typed contents, gRPC with raw buffers. The four images must be bit-identical. With ``--onnx`` (and onnxruntime
  installed) they must also equal a direct ONNX Runtime run of that file to 1e-6 of the maximum.
* two bad requests must be refused with the server's reason: a mask of the wrong width over REST (400), and
  FP64 k-space over gRPC (INVALID_ARGUMENT).

It prints one line per check and exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np

try:  # not a reconkit dependency (see above): --help works without it
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
except ImportError as error:
    KSERVE_MISSING: ImportError | None = error
else:
    KSERVE_MISSING = None


def sample(batch: int, coils: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Random k-space ``(B, C, H, W, 2)`` under a 4x equispaced line mask ``(B, 1, 1, W, 1)`` with 10 centre lines."""
    rng = np.random.default_rng(0)
    mask = np.zeros((batch, 1, 1, width, 1), np.float32)
    mask[..., ::4, :] = 1
    mask[..., width // 2 - 5 : width // 2 + 5, :] = 1
    return rng.standard_normal((batch, coils, height, width, 2)).astype(np.float32) * mask, mask


def request(model: str, kspace: np.ndarray, mask: np.ndarray, binary: bool, kspace_dtype: str = "FP32") -> InferRequest:
    tensors = []
    for name, array, datatype in (("masked_kspace", kspace, kspace_dtype), ("mask", mask, "FP32")):
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array.astype(np.float64) if datatype == "FP64" else array, binary_data=binary)
        tensors.append(tensor)
    return InferRequest(model_name=model, infer_inputs=tensors, request_id="client-check")


def image_of(response) -> np.ndarray:
    output = response.outputs[0]
    return output.as_numpy().reshape(output.shape)


def ok(label: str, condition: bool, detail: str = "") -> None:
    print(f"{'ok  ' if condition else 'FAIL'} {label}{': ' + detail if detail else ''}")
    if not condition:
        sys.exit(1)


async def check(args: argparse.Namespace) -> None:
    kspace, mask = sample(args.batch, args.coils, args.height, args.width)
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=args.timeout))
    grpc = InferenceGRPCClient(args.grpc_url, timeout=args.timeout)
    ok("REST live / ready / model ready", await rest.is_server_live(args.url) and await rest.is_server_ready(args.url)
       and await rest.is_model_ready(args.url, args.model))
    ok("gRPC live / ready / model ready", await grpc.is_server_live() and await grpc.is_server_ready()
       and await grpc.is_model_ready(args.model))
    images = {
        "REST JSON": image_of(await rest.infer(args.url, request(args.model, kspace, mask, False), args.model)),
        "REST binary": image_of(await rest.infer(args.url, request(args.model, kspace, mask, True), args.model)),
        "gRPC typed contents": image_of(await grpc.infer(request(args.model, kspace, mask, False))),
        "gRPC raw buffers": image_of(await grpc.infer(request(args.model, kspace, mask, True))),
    }
    first = images["REST JSON"]
    ok("image shape", first.shape == (args.batch, args.height, args.width), str(first.shape))
    for label, image in list(images.items())[1:]:
        ok(f"{label} equals REST JSON", np.array_equal(image, first))
    if args.onnx:
        import onnxruntime as ort

        session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
        reference = session.run(None, {"masked_kspace": kspace, "mask": mask})[0]
        error = float(np.abs(first - reference).max() / np.abs(reference).max())
        ok("equals direct ONNX Runtime", error <= 1e-6, f"max |difference| / max = {error:.1e}")

    wrong_mask = request(args.model, kspace, np.ones((args.batch, 1, 1, args.width - 2, 1), np.float32), False)
    try:
        await rest.infer(args.url, wrong_mask, args.model)
        ok("REST wrong mask width refused", False, "the server answered")
    except Exception as exc:  # kserve raises httpx.HTTPStatusError carrying the server's message
        ok("REST wrong mask width refused", "400" in str(exc) and "width" in str(exc), str(exc).splitlines()[0][:160])
    try:
        await grpc.infer(request(args.model, kspace, mask, True, kspace_dtype="FP64"))
        ok("gRPC FP64 refused", False, "the server answered")
    except Exception as exc:  # grpc.aio.AioRpcError
        details = exc.details() if hasattr(exc, "details") else str(exc)
        ok("gRPC FP64 refused", "INVALID_ARGUMENT" in str(exc) and "FP64" in details, details)
    await rest.close()
    await grpc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="REST base URL")
    parser.add_argument("--grpc-url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--model", default="varnet", help="model name in the repository")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--height", type=int, default=640, help="k-space height (readout) the graph serves")
    parser.add_argument("--width", type=int, default=368, help="k-space width (phase encode) the graph serves")
    parser.add_argument("--onnx", default=None, help="the served .onnx file: also compare with direct ONNX Runtime")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    args = parser.parse_args()
    if KSERVE_MISSING is not None:
        sys.exit(f"client_check.py needs KServe's Python SDK ({KSERVE_MISSING}); install it in a virtual "
                 "environment of its own, as the docstring says")
    asyncio.run(check(args))


if __name__ == "__main__":
    main()
