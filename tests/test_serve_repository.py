"""Triton model repository: config.pbtxt reading, model discovery, write_triton_repository, `reconkit serve` errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from reconkit.cli.serve import main as serve_main
from reconkit.errors import ConfigError, DataError, ReconkitError
from reconkit.export.triton_repository import write_triton_repository
from reconkit.serve import ServerConfig
from reconkit.serve.pbtxt import PbtxtError, parse_pbtxt
from reconkit.serve.repository import BatchingConfig, discover_models


def contract_graph(path, batch="batch", external_data: bool = False):
    """ONNX contract-shaped graph (image = sum over coils of masked_kspace * mask), built with onnx.helper."""
    kspace = helper.make_tensor_value_info("masked_kspace", TensorProto.FLOAT, [batch, "coils", "height", "width", 2])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 1, 1, "width", 1])
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, "height", "width"])
    axes = numpy_helper.from_array(np.array([1, 4], np.int64), "axes")  # raw_data: can move to external data
    scale = numpy_helper.from_array(np.ones(64, np.float32), "scale")
    nodes = [helper.make_node("Mul", ["masked_kspace", "mask"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axes"], ["image"], keepdims=0)]
    graph = helper.make_graph(nodes, "contract", [kspace, mask], [image], initializer=[axes, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="weights.bin", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def test_parse_pbtxt_triton_config():
    config = parse_pbtxt("""
        name: "varnet"  # comment
        platform: "onnxruntime_onnx"
        max_batch_size: 4
        input [ { name: "masked_kspace" data_type: TYPE_FP32 dims: [ -1, -1, -1, 2 ] },
                { name: "mask", data_type: TYPE_FP32, dims: [1, 1, -1, 1] } ]
        dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [ 2, 4 ]
                           default_queue_policy { max_queue_size: 16 } }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        parameters { key: "x" value: { string_value: "a\\"b" } }
        optimization { execution_accelerators { gpu_execution_accelerator: [] } }
    """)
    assert config["name"] == ["varnet"] and config["max_batch_size"] == [4]
    assert config["input"][0]["dims"] == [-1, -1, -1, 2] and config["input"][1]["data_type"] == ["TYPE_FP32"]
    assert config["dynamic_batching"][0]["preferred_batch_size"] == [2, 4]
    assert config["instance_group"][0]["kind"] == ["KIND_CPU"]
    assert config["parameters"][0]["value"][0]["string_value"] == ['a"b']


@pytest.mark.parametrize("text", ["max_batch_size: ", "input [ { name: 'a' ", "a: }", "x: @"])
def test_parse_pbtxt_rejects_malformed_text(text):
    with pytest.raises(PbtxtError):
        parse_pbtxt(text)


def test_write_triton_repository_layout_and_config(tmp_path):
    onnx_path = contract_graph(tmp_path / "m.onnx")
    model_dir = write_triton_repository(onnx_path, tmp_path / "repo", "varnet-small_v1.0", version=3, max_batch_size=4)
    assert model_dir == tmp_path / "repo" / "varnet-small_v1.0"
    assert (model_dir / "3" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["name"] == ["varnet-small_v1.0"] and config["backend"] == ["onnxruntime"]
    assert config["max_batch_size"] == [4]
    inputs = {i["name"][0]: (i["data_type"][0], i["dims"]) for i in config["input"]}
    assert inputs == {"masked_kspace": ("TYPE_FP32", [-1, -1, -1, 2]), "mask": ("TYPE_FP32", [1, 1, -1, 1])}
    assert config["output"][0]["name"] == ["image"] and config["output"][0]["dims"] == [-1, -1]
    assert config["dynamic_batching"][0]["max_queue_delay_microseconds"] == [0]
    (entry,) = discover_models(tmp_path / "repo")
    assert (entry.name, entry.version, entry.batching.max_batch_size, entry.batching.dynamic) == \
           ("varnet-small_v1.0", "3", 4, True)
    assert not list(model_dir.rglob("*.tmp"))


def triton_model_config_pb2():
    """Triton's own model_config protobuf module (ModelConfig, DataType), shipped in the tritonclient wheel."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:  # grpc extra not installed: the generated module itself only needs protobuf
        origin = Path(importlib.util.find_spec("tritonclient").origin).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location("model_config_pb2", origin)
        model_config_pb2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model_config_pb2)
    return model_config_pb2


@pytest.mark.parametrize("max_batch_size", [0, 4])
def test_written_config_is_a_valid_triton_model_config(tmp_path, max_batch_size):
    """config.pbtxt parses as Triton's ModelConfig (field names, enums, nesting), so Triton can load the repository."""
    from google.protobuf import text_format

    onnx_path = contract_graph(tmp_path / "m.onnx", batch="batch" if max_batch_size else 1)
    model_dir = write_triton_repository(onnx_path, tmp_path / "repo", "varnet", max_batch_size=max_batch_size)
    pb2 = triton_model_config_pb2()
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert config.name == "varnet" and config.backend == "onnxruntime" and config.max_batch_size == max_batch_size
    kspace = [list(t.dims) for t in config.input if t.name == "masked_kspace"]
    assert kspace == ([[-1, -1, -1, 2]] if max_batch_size else [[1, -1, -1, -1, 2]])
    assert {t.data_type for t in [*config.input, *config.output]} == {pb2.TYPE_FP32}
    assert config.HasField("dynamic_batching") == bool(max_batch_size)


def test_write_triton_repository_without_batching_keeps_full_dims(tmp_path):
    onnx_path = contract_graph(tmp_path / "m.onnx", batch=1)
    model_dir = write_triton_repository(onnx_path, tmp_path / "repo", "fixed", max_batch_size=0)
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["input"][1]["dims"] == [1, 1, 1, -1, 1] and "dynamic_batching" not in config
    with pytest.raises(ReconkitError, match="no dynamic batch axis"):
        write_triton_repository(onnx_path, tmp_path / "repo", "fixed", max_batch_size=8)


def test_write_triton_repository_copies_external_data(tmp_path):
    onnx_path = contract_graph(tmp_path / "m.onnx", external_data=True)
    model_dir = write_triton_repository(onnx_path, tmp_path / "repo", "ext")
    assert (model_dir / "1" / "weights.bin").read_bytes() == (tmp_path / "weights.bin").read_bytes()
    onnx.checker.check_model(str(model_dir / "1" / "model.onnx"))


def test_write_triton_repository_refuses_external_data_linked_out_of_the_folder(tmp_path):
    """A model folder from elsewhere whose data file is a link to a file outside it (``/etc/passwd``): the copy in
    the repository was a plain file, which ONNX Runtime then read as weights (it refuses the link itself)."""
    (tmp_path / "model").mkdir()
    onnx_path = contract_graph(tmp_path / "model" / "m.onnx", external_data=True)
    secret = tmp_path / "secret.bin"
    (tmp_path / "model" / "weights.bin").rename(secret)
    (tmp_path / "model" / "weights.bin").symlink_to(secret)
    with pytest.raises(ReconkitError, match="external data file 'weights.bin' is missing or outside the model's"):
        write_triton_repository(onnx_path, tmp_path / "repo", "ext")
    assert not (tmp_path / "repo" / "ext" / "1" / "weights.bin").exists()


@pytest.mark.parametrize("name,version", [("../evil", 1), ("a/b", 1), ("", 1), ("ok", 0), ("ok", "1")])
def test_write_triton_repository_rejects_bad_names_and_versions(tmp_path, name, version):
    onnx_path = contract_graph(tmp_path / "m.onnx")
    with pytest.raises(ReconkitError, match="invalid model"):
        write_triton_repository(onnx_path, tmp_path / "repo", name, version=version)
    assert not (tmp_path / "evil").exists()


def test_write_triton_repository_unreadable_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ReconkitError, match="bad.onnx: cannot read ONNX model"):
        write_triton_repository(bad, tmp_path / "repo", "m")


def test_discover_models_versions_defaults_and_skips(tmp_path):
    onnx_path = contract_graph(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    for version in ("1", "10", "2"):
        (repo / "plain" / version).mkdir(parents=True)
        (repo / "plain" / version / "model.onnx").write_bytes(onnx_path.read_bytes())
    (repo / "plain" / "latest").mkdir()  # not a version: ignored
    (repo / "plain" / "3").mkdir()  # no model.onnx: ignored
    (repo / "bad name!" / "1").mkdir(parents=True)
    (repo / "bad name!" / "1" / "model.onnx").write_bytes(onnx_path.read_bytes())
    defaults = BatchingConfig(max_batch_size=5, max_queue_delay_s=0.002, max_queue_size=7)
    entries = discover_models(repo, defaults)
    assert [(e.name, e.version) for e in entries] == [("plain", "1"), ("plain", "2"), ("plain", "10")]
    assert all(e.batching == defaults for e in entries)


def test_discover_models_reads_config_pbtxt(tmp_path):
    onnx_path = contract_graph(tmp_path / "m.onnx")
    model_dir = write_triton_repository(onnx_path, tmp_path / "repo", "m")
    (model_dir / "config.pbtxt").write_text(
        'name: "m" max_batch_size: 2 dynamic_batching { max_queue_delay_microseconds: 2500 '
        'default_queue_policy { max_queue_size: 3 } } instance_group [ { count: 2 }, { count: 1 } ]')
    (entry,) = discover_models(tmp_path / "repo", BatchingConfig(max_queue_size=99))
    assert entry.batching == BatchingConfig(max_batch_size=2, dynamic=True, max_queue_delay_s=0.0025,
                                            max_queue_size=3, instances=3)
    (model_dir / "config.pbtxt").write_text('name: "m" max_batch_size: 4')  # Triton: no block = no batching
    (entry,) = discover_models(tmp_path / "repo", BatchingConfig(max_queue_size=99))
    assert entry.batching == BatchingConfig(max_batch_size=4, dynamic=False, max_queue_delay_s=0.0,
                                            max_queue_size=99, instances=1)


@pytest.mark.parametrize("text,problem", [
    ('name: "other"', "config names model 'other' but its directory is 'm'"),
    ("max_batch_size: [", "cannot read Triton model configuration"),
    ("max_batch_size: -1", "max_batch_size must be a non-negative integer, got -1"),
    # each was a ValueError, TypeError or AttributeError traceback, or (count: 2.5) taken as 2
    ('instance_group [ { count: "two" } ]', "count must be a non-negative integer, got 'two'"),
    ("instance_group [ { count: 2.5 } ]", "count must be a non-negative integer, got 2.5"),
    ("instance_group [ { count: 0 } ]", "instance_group counts must add up to at least 1"),
    ("instance_group: 3", "instance_group must be a list of messages"),
    ("max_batch_size: 8 dynamic_batching: 5", r"dynamic_batching must be a message \(dynamic_batching \{ ... \}\), got 5"),
    ("max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: nan }",
     "max_queue_delay_microseconds must be a non-negative integer, got 'nan'"),
    ("max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: true }",
     "max_queue_delay_microseconds must be a non-negative integer, got True"),
    ("max_batch_size: 8 dynamic_batching { default_queue_policy: 3 }", "default_queue_policy must be a message"),
    # a model folder from elsewhere: a RecursionError traceback that stopped the server's start
    ("parameters " + "{ a " * 5000 + "}" * 5000, "messages or lists nested too deeply"),
    ("dims: " + "[" * 5000 + "]" * 5000, "messages or lists nested too deeply"),
])
def test_discover_models_bad_config_names_the_file(tmp_path, text, problem):
    model_dir = write_triton_repository(contract_graph(tmp_path / "m.onnx"), tmp_path / "repo", "m")
    (model_dir / "config.pbtxt").write_text(text)
    with pytest.raises(DataError, match=problem) as info:
        discover_models(tmp_path / "repo")
    assert info.value.path == str(model_dir / "config.pbtxt")


def test_discover_models_missing_or_empty_repository(tmp_path):
    with pytest.raises(ReconkitError, match="is not a directory"):
        discover_models(tmp_path / "nope")
    with pytest.raises(ReconkitError, match="no model found"):
        discover_models(tmp_path)


def test_discover_models_unreadable_folder_names_it(tmp_path, unlistable, capsys):
    """A model folder without read permission stopped ``reconkit serve`` with a PermissionError traceback."""
    model_dir = write_triton_repository(contract_graph(tmp_path / "m.onnx"), tmp_path / "repo", "m")
    unlistable(model_dir)  # a chmod 300 folder
    with pytest.raises(DataError, match="cannot read the folder: Permission denied") as info:
        discover_models(tmp_path / "repo")
    assert info.value.path == str(model_dir)
    assert serve_main(["--model-repository", str(tmp_path / "repo")]) == 1
    assert f"reconkit serve: {model_dir}: cannot read the folder: Permission denied" in capsys.readouterr().err


def test_cli_serve_reports_bad_repository_and_options(tmp_path, capsys):
    assert serve_main(["--model-repository", str(tmp_path)]) == 1
    assert "no model found" in capsys.readouterr().err
    bad = tmp_path / "m" / "1"
    bad.mkdir(parents=True)
    (bad / "model.onnx").write_bytes(b"garbage")
    assert serve_main(["--model-repository", str(tmp_path)]) == 1
    assert "model.onnx: cannot load ONNX model" in capsys.readouterr().err
    assert serve_main(["--model-repository", str(tmp_path), "--max-queue-size", "0"]) == 2
    assert serve_main(["--model-repository", str(tmp_path), "--device", "cpu", "--request-timeout-s", "0"]) == 2
    # NaN passed every comparison: a NaN size was a ValueError traceback, a NaN timeout made every request time out
    for option, field in (("--max-request-mb", "--max-request-mb"), ("--request-timeout-s", "request_timeout_s"),
                          ("--client-timeout-s", "client_timeout_s"), ("--max-queue-delay-ms", "max_queue_delay_s")):
        for value in ("nan", "inf"):
            assert serve_main(["--model-repository", str(tmp_path), option, value]) == 2, (option, value)
            err = capsys.readouterr().err
            assert field in err and "must be a finite number" in err, (option, err)


@pytest.mark.parametrize("make, problem", [
    # instances=0 was ValueError("max_workers must be greater than 0") from the thread pool when the server started
    (lambda: BatchingConfig(instances=0), r"BatchingConfig.instances must be an integer >= 1, got 0"),
    (lambda: BatchingConfig(max_batch_size=-1), r"BatchingConfig.max_batch_size must be an integer >= 0, got -1"),
    (lambda: BatchingConfig(max_batch_size=2.5), r"max_batch_size must be an integer >= 0, got 2.5"),
    (lambda: BatchingConfig(max_queue_delay_s=-0.1), r"max_queue_delay_s must be a finite number >= 0, got -0.1"),
    (lambda: BatchingConfig(max_queue_delay_s=float("nan")), r"max_queue_delay_s must be a finite number >= 0"),
    (lambda: BatchingConfig(max_queue_size=0), r"BatchingConfig.max_queue_size must be an integer >= 1, got 0"),
    (lambda: ServerConfig(Path("m"), request_timeout_s=0), r"ServerConfig.request_timeout_s must be a finite number > 0"),
    (lambda: ServerConfig(Path("m"), client_timeout_s=float("inf")), r"client_timeout_s must be a finite number > 0"),
    (lambda: ServerConfig(Path("m"), max_request_bytes=0), r"max_request_bytes must be an integer >= 1, got 0"),
    (lambda: ServerConfig(Path("m"), intra_op_threads=-1), r"intra_op_threads must be an integer >= 0, got -1"),
    (lambda: ServerConfig(Path("m"), grpc_max_concurrent_rpcs=0), r"grpc_max_concurrent_rpcs must be an integer >= 1"),
    (lambda: ServerConfig(Path("m"), max_connections=0), r"max_connections must be an integer >= 1, got 0"),
    # an unknown device was served on the CPU without a word (select_providers took it for "auto")
    (lambda: ServerConfig(Path("m"), device="tpu"), r"ServerConfig.device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
])
def test_serve_configs_refuse_values_that_cannot_work(make, problem):
    """Only the CLI checked these; the library API took them and failed when the server started (or served on)."""
    with pytest.raises(ConfigError, match=problem):
        make()


@pytest.mark.parametrize("token, problem", [("s3cret\n", "starts or ends with whitespace"),
                                            ("s\u00e9cret", "not printable ASCII")])
def test_server_config_refuses_a_token_no_client_can_send(token, problem):
    """Only the CLI checked the token: through the Python API a token ending in a newline made every request a 401
    without a word. The message never shows the secret."""
    with pytest.raises(ConfigError, match=f"ServerConfig.auth_token: the bearer token .*{problem}") as info:
        ServerConfig(Path("m"), auth_token=token)
    assert token.strip() not in str(info.value)


def test_cli_serve_refuses_zero_instances_naming_the_field(tmp_path, capsys):
    assert serve_main(["--model-repository", str(tmp_path), "--instances", "0"]) == 2
    assert "reconkit serve: BatchingConfig.instances must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("token, problem", [("s3cret\n", "ends with whitespace"),
                                            ("s\u00e9cret", "not printable ASCII"),
                                            ("s\udcc3\udca9cret", "not printable ASCII")])  # the C locale's é
def test_cli_serve_refuses_a_token_no_client_can_send(tmp_path, capsys, monkeypatch, token, problem):
    """A token ending in a newline (a Kubernetes secret made from a file) made every request a 401, a non-ASCII one
    too (a 500 where the locale could not decode it), with no word at start-up; the error names the variable."""
    monkeypatch.setenv("MY_TOKEN", token)
    assert serve_main(["--model-repository", str(tmp_path), "--auth-token-env", "MY_TOKEN"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reconkit serve: environment variable MY_TOKEN: the bearer token ") and problem in err
    assert token.strip() not in err  # a secret: never printed


def test_cli_serve_refuses_port_numbers_beyond_65535(tmp_path, capsys):
    """--port 70000 was a bind() OverflowError traceback; --grpc-port 70000 served gRPC on port 4464 (modulo 65536)
    without a word. Both are refused before any model loads (the repository here is empty)."""
    for option, value in (("--port", "70000"), ("--port", "-1"), ("--grpc-port", "70000"), ("--grpc-port", "-1")):
        assert serve_main(["--model-repository", str(tmp_path), option, value]) == 2, (option, value)
        assert "must be port numbers from 0 to 65535" in capsys.readouterr().err


def test_cli_serve_port_in_use_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """A REST port already in use was found only when uvicorn bound it, after every model had loaded (minutes for
    large models), and ended in uvicorn's bare exit status 3. The port is bound first now: exit 1, naming it."""
    import socket

    import reconkit.serve.server as server_module

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded although the port is in use")

    monkeypatch.setattr(server_module, "create_app", no_loading)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve_main(["--model-repository", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"REST: cannot bind 127.0.0.1:{port}" in err and "in use" in err, err
    with pytest.raises(ReconkitError, match="REST: cannot bind 127.0.0.1:70000: the port must be a number"):
        server_module.serve(ServerConfig(tmp_path), "127.0.0.1", 70000)  # the library API (the CLI refuses it)
