"""Generate the Python gRPC stubs of proto/**/*.proto into services/pb/ (build output).

protoc names generated imports after the proto package path (``from eft.v1 import
worker_pb2``); they are rewritten to live under ``services.pb`` (``from services.pb.eft.v1
import worker_pb2``), the one place hand-written code imports stubs from. Stale stubs of
deleted protos are removed. Run by ``make`` and by the package build (setup.py).

Usage: python proto/generate.py
"""

import re
import shutil
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
OUT_DIR = PROTO_ROOT.parent / "services" / "pb"
OUT_PACKAGE = "services.pb"


def proto_files(proto_root: Path) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def generate(proto_root: Path = PROTO_ROOT, out_dir: Path = OUT_DIR, out_package: str = OUT_PACKAGE) -> list[Path]:
    """Regenerate every stub from scratch; returns the generated module paths.

    Protos live in package folders (``eft/v1/x.proto``); every folder under ``out_dir`` is
    generated output and is replaced.
    """
    for child in out_dir.iterdir() if out_dir.is_dir() else ():
        if child.is_dir():
            shutil.rmtree(child)
    protos = proto_files(proto_root)
    if not protos:
        return []
    _run_protoc(proto_root, out_dir, protos)
    generated = sorted(out_dir.rglob("*_pb2*.py"))
    top_packages = sorted({p.relative_to(proto_root).parts[0] for p in protos})
    for module in generated:
        _rewrite_imports(module, top_packages, out_package)
        for folder in module.relative_to(out_dir).parents[:-1]:
            (out_dir / folder / "__init__.py").touch()
    return generated


def _run_protoc(proto_root: Path, out_dir: Path, protos: list[Path]) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[str(p) for p in protos]}")


def _rewrite_imports(module: Path, top_packages: list[str], out_package: str) -> None:
    names = "|".join(re.escape(p) for p in top_packages)
    pattern = re.compile(rf"^(\s*)(from|import) ((?:{names})(?:\.\w+)*) ", re.MULTILINE)
    text = module.read_text()
    module.write_text(pattern.sub(rf"\1\2 {out_package}.\3 ", text))


if __name__ == "__main__":
    modules = generate()
    print(f"proto/generate.py: {len(modules)} stub modules in {OUT_DIR}", file=sys.stderr)
