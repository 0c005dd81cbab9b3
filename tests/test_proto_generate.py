"""proto/generate.py: stubs land under services.pb with imports rewritten to match."""

import importlib
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
generate = runpy.run_path(str(ROOT / "proto" / "generate.py"))["generate"]

COMMON = """
syntax = "proto3";
package demo.v1;
// A tensor as raw bytes.
message Blob { bytes data = 1; }
"""

SERVICE = """
syntax = "proto3";
package demo.v1;
import "demo/v1/common.proto";
import "google/protobuf/empty.proto";
message EchoRequest { Blob blob = 1; }
message EchoResponse { Blob blob = 1; }
service Echo {
  rpc Echo(EchoRequest) returns (EchoResponse);
  rpc Ping(google.protobuf.Empty) returns (google.protobuf.Empty);
}
"""


def test_generates_importable_stubs_with_cross_file_imports(tmp_path, monkeypatch):
    protos, out = tmp_path / "proto", tmp_path / "gen_pkg"
    (protos / "demo" / "v1").mkdir(parents=True)
    (protos / "demo" / "v1" / "common.proto").write_text(COMMON)
    (protos / "demo" / "v1" / "echo.proto").write_text(SERVICE)
    (out / "stale" / "v0").mkdir(parents=True)
    (out / "stale" / "v0" / "old_pb2.py").write_text("raise ImportError")
    out.joinpath("__init__.py").touch()

    modules = generate(protos, out, "gen_pkg")

    assert {m.name for m in modules} >= {"common_pb2.py", "echo_pb2.py", "echo_pb2_grpc.py"}
    assert not (out / "stale").exists()  # output of deleted protos is removed
    text = (out / "demo" / "v1" / "echo_pb2_grpc.py").read_text()
    assert "from gen_pkg.demo.v1 import echo_pb2" in text and "\nfrom demo.v1" not in text
    monkeypatch.syspath_prepend(str(tmp_path))
    echo_pb2 = importlib.import_module("gen_pkg.demo.v1.echo_pb2")
    grpc_stubs = importlib.import_module("gen_pkg.demo.v1.echo_pb2_grpc")
    message = echo_pb2.EchoRequest(blob={"data": b"\x00\x01"})
    assert echo_pb2.EchoRequest.FromString(message.SerializeToString()).blob.data == b"\x00\x01"
    assert hasattr(grpc_stubs, "EchoStub") and hasattr(grpc_stubs, "add_EchoServicer_to_server")
    for name in [m for m in sys.modules if m.startswith("gen_pkg")]:
        del sys.modules[name]


def test_no_protos_generates_nothing(tmp_path):
    (tmp_path / "proto").mkdir()
    assert generate(tmp_path / "proto", tmp_path / "out", "out") == []
