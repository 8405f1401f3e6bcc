"""Generate the Python protobuf/gRPC modules and their typed stubs from proto/.

The protos are wire contracts: they import each other by their path under
proto/ (`istio/workload/workload.proto`), so `protoc -I proto` works from any
language. protoc then writes Python modules as top-level packages (`istio`,
`envoy`, ...); this script generates into a scratch directory, moves the tree
under the agent's package (`eztunnel_plugin.pb`) and rewrites the imports
between generated modules to match. Stubs come from mypy-protobuf, so the
messages and gRPC stubs are fully typed for mypy --strict.

Usage: python tools/gen_pb.py PROTO_DIR OUT_PACKAGE_DIR
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "eztunnel_plugin.pb"
SUFFIXES = (".py", ".pyi")
INIT = '''"""Generated protobuf and gRPC modules (built by `make build`, never edited)."""\n'''


def _plugin(name: str) -> str:
    path = Path(sys.executable).parent / f"protoc-gen-{name}"
    if not path.exists():
        sys.exit(f"gen_pb: {path} is missing (pip install mypy-protobuf)")
    return f"--plugin=protoc-gen-{name}={path}"


def generate(proto_dir: Path, out: Path) -> None:
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
            f"--python_out={scratch}", f"--grpc_python_out={scratch}",
            f"--mypy_out={scratch}", f"--mypy_grpc_out={scratch}",
            _plugin("mypy"), _plugin("mypy_grpc"), *protos,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"gen_pb: protoc failed:\n{done.stderr}")
        # Packages protoc wrote modules into: the only imports that move
        # (google.rpc is ours, google.protobuf is the library's).
        generated = sorted(p for p in scratch.rglob("*") if p.suffix in SUFFIXES)
        packages = {".".join(p.parent.relative_to(scratch).parts) for p in generated}
        alternatives = "|".join(map(re.escape, sorted(packages, key=len, reverse=True)))
        imports = re.compile(rf"^from ({alternatives}) import ", re.M)
        for path in generated:
            path.write_text(imports.sub(rf"from {PACKAGE}.\1 import ", path.read_text()))
        for directory in (d for d in scratch.rglob("*") if d.is_dir()):
            (directory / "__init__.py").touch()
        (scratch / "__init__.py").write_text(INIT)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(scratch, out)
        out.chmod(0o755)  # the scratch dir was 0700: the package must be readable by all


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    generate(Path(sys.argv[1]), Path(sys.argv[2]))
