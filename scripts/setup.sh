#!/usr/bin/env bash
# Set up a fresh machine for edge-agent: system tools (Mosquitto, ffmpeg, openssl), a virtual
# environment in .venv and the package with the extras named on its pip line (README.md repeats
# that list; tests/test_layout.py keeps the two equal). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# A tiny RTSP relay, so the tests can serve a real RTSP stream with ffmpeg on loopback.
command -v rtsp-server-perl >/dev/null 2>&1 || missing+=(rtsp-server-perl)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# Headless Chromium for the live view's browser test (tests/test_liveview.py). Not needed to
# run the agent, so a failed install only warns: the test then skips (and fails under CI=1).
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing chromium chromium-driver (live view browser test)"
  if ! { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver \
      >/dev/null; }; then
    echo "setup: WARNING: could not install chromium; tests/test_liveview.py's browser test" \
      "will skip (and fail in CI)" >&2
  fi
fi

# Eclipse Tahu's JavaScript Sparkplug decoder for tests/test_sparkplug_decoders.py (an
# independent reading of every metric the node publishes). Not needed to run the agent: a
# failed install only warns; the test then skips (and fails under CI=1). A NodeSource nodejs
# already brings npm (and conflicts with Debian's npm package): only install it when missing.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs npm (Sparkplug decoder test)"
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      nodejs npm >/dev/null; } || echo "setup: WARNING: could not install nodejs/npm" >&2
fi
if ! npm ci --ignore-scripts --no-audit --no-fund --prefix tests/sparkplug_decoder >/dev/null; then
  echo "setup: WARNING: could not install tests/sparkplug_decoder; its test will skip" \
    "(and fail in CI)" >&2
fi

# Debian's mbpoll (libmodbus): the independent Modbus master of tests/test_modbus.py. Not
# needed to run the agent: a failed install only warns; the test then skips (fails under CI=1).
if ! command -v mbpoll >/dev/null 2>&1; then
  echo "setup: installing mbpoll (Modbus test master)"
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      mbpoll >/dev/null; } || echo "setup: WARNING: could not install mbpoll" >&2
fi

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu,train,demo,dev,opcua,modbus]'
echo "setup: ready (.venv)"
