"""The `eft` command, run as a user runs it: the installed console script, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EFT = str(Path(sys.executable).parent / "eft")


def eft(*args: str, env_home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="250", **({"EFT_HOME": str(env_home)} if env_home else {}))
    return subprocess.run([EFT, *args], capture_output=True, text=True, timeout=300, env=env)


def test_help_explains_the_commands():
    result = eft("--help")
    assert result.returncode == 0 and "family" in result.stdout and "eval" in result.stdout
    build_help = eft("family", "build", "--help").stdout
    assert "--out" in build_help and "--seed" in build_help and "EFT_HOME" in build_help


def test_default_family_folder_follows_eft_home(tmp_path):
    assert str(tmp_path / "demo-family") in eft("family", "build", "--help", env_home=tmp_path).stdout


def test_the_bpe_preset_builds_a_byte_level_family_in_its_own_folder(tmp_path):
    built = eft("family", "build", "--preset", "bpe", env_home=tmp_path)
    assert built.returncode == 0, built.stderr
    family = tmp_path / "bpe-family"
    manifest = json.loads((family / "family.json").read_text())
    assert manifest["recipe"]["tokenizer"] == "byte-level-bpe" and not (tmp_path / "demo-family").exists()
    tokenizer = json.loads((family / "small-tuned" / "tokenizer.json").read_text())
    assert tokenizer["pre_tokenizer"]["type"] == "ByteLevel" and tokenizer["decoder"]["type"] == "ByteLevel"


def test_build_then_eval_writes_json_and_plot(tmp_path):
    family = tmp_path / "family"
    built = eft("family", "build", "--preset", "quick", "--out", str(family))
    assert built.returncode == 0, built.stderr
    assert (family / "family.json").is_file() and (family / "large-tuned" / "model.safetensors").is_file()
    again = eft("family", "build", "--preset", "quick", "--out", str(family))
    assert "up to date" in again.stdout

    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    result = eft("eval", "--family", str(family), "--limit", "2", "--sample", "2", "--json", str(out_json), "--plot", str(out_png))
    assert result.returncode == 0, result.stderr
    data = json.loads(out_json.read_text())
    names = [row["name"] for row in data["rows"]]
    assert names[:5] == ["small-tuned", "large-base", "large-tuned", "upscaled", "upscaled x1.5"]
    assert any(name.endswith("(T=1)") for name in names)
    assert all(set(row) == {"name", "format", "facts", "both", "n"} and row["n"] > 0 for row in data["rows"])
    assert [p["lambda"] for p in data["mixing"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert 0.0 <= data["upscaled_small_tuned_mean_tv"] <= 1.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "upscaled" in result.stdout and "mixed lambda=0.5" in result.stdout


def test_missing_family_is_a_clear_error(tmp_path):
    result = eft("eval", "--family", str(tmp_path / "none"))
    assert result.returncode == 1 and "eft family build" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["eval", "--limit", "0"], ["eval", "--sample", "-1"], ["family", "build", "--preset", "huge"]])
def test_bad_arguments_are_refused_before_any_work(args):
    result = eft(*args)
    assert result.returncode == 2 and "error" in result.stderr


OUT_OF_RANGE = [
    ["generate", "hi", "--seed", "-1"],
    ["generate", "hi", "--seed", str(2**64)],
    ["generate", "hi", "--max-tokens", "0"],
    ["generate", "hi", "--max-tokens", str(2**31)],
    ["serve", "--grpc-port", "70000"],
    ["serve", "--http-port", "-1"],
    ["serve", "--metrics-port", "65536"],
    ["serve", "--num-cpus", "0"],
    ["drain", "--metrics-port", "99999"],
]


@pytest.mark.parametrize("args", OUT_OF_RANGE, ids=[" ".join(a[:1] + a[-2:]) for a in OUT_OF_RANGE])
def test_out_of_range_flag_values_get_one_line_not_a_traceback(args, capsys):
    """The parser the eft command runs (the subprocess tests above show its exit path)."""
    from cluster.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(args)
    said = capsys.readouterr().err
    assert exited.value.code == 2 and said.count("error:") == 1
    assert f"argument {args[-2]}: must be in [" in said or f"argument {args[-2]}: must be >= 1" in said, said


def test_eft_drain_asks_the_local_gateway_until_it_has_drained(capsys):
    """`eft drain` (the chart's preStop hook) against a scrape server whose drain route says
    202 twice, then 200; the route answers loopback clients only."""
    import socket

    from cluster.client import drain_command
    from services.metrics import ServingMetrics
    from services.security import DRAIN_PATH

    answers = iter([(202, "draining: 2 requests running"), (202, "draining: 1 requests running"), (200, "drained")])
    server, port = ServingMetrics().serve("0.0.0.0", 0, local_routes={DRAIN_PATH: lambda: next(answers)})
    try:
        assert drain_command(port, timeout_s=30) == 0
        assert capsys.readouterr().out.splitlines() == ["draining: 2 requests running", "draining: 1 requests running", "drained"]
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0)) as sock:  # another address: not this pod's own hook
            sock.sendall(f"GET {DRAIN_PATH} HTTP/1.0\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.0 403")
    finally:
        server.shutdown()
        server.server_close()
    assert drain_command(port, timeout_s=5) == 0  # nothing listens any more: nothing to drain
