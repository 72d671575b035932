"""Generate the Python API code (and its typed stubs) from proto/voxauth/v1/*.proto.

The generated files are checked in beside the .proto files, so an installed voxauth needs no
compiler. `python scripts/gen_protos.py --check` (run by .ci/run) fails when they are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
API_DIR = PROTO_ROOT / "voxauth" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in API_DIR.glob("*.proto"))
    bin_dir = Path(sys.executable).parent
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        # The mypy-protobuf plugins sit beside the interpreter, which may not be on PATH.
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    # The plugins chat on stderr ("Writing mypy to ..."); show it only when protoc fails.
    done = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"protoc failed with exit code {done.returncode}")


def generated_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated_files(out / "voxauth" / "v1")
        if args.check:
            stale = [
                p.name
                for p in fresh
                if not (API_DIR / p.name).exists() or not filecmp.cmp(p, API_DIR / p.name, False)
            ]
            extra = {p.name for p in generated_files(API_DIR)} - {p.name for p in fresh}
            if stale or extra:
                print(
                    f"generated API code is stale: {sorted(stale) + sorted(extra)}; "
                    "run: python scripts/gen_protos.py",
                    file=sys.stderr,
                )
                return 1
            print("generated API code is current")
            return 0
        for p in fresh:
            shutil.copyfile(p, API_DIR / p.name)
    print(f"wrote {len(fresh)} files to {API_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
