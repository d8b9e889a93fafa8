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

# Test peers the agent itself does not need: a failed install only warns, and the test that
# needs it then skips (and fails under CI=1).
#   test_peer COMMAND "WHAT NEEDS IT" [--no-install-recommends] PACKAGE...
test_peer() {
  local cmd=$1 what=$2
  shift 2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  echo "setup: installing ${*#--no-install-recommends} ($what)"
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null; } ||
    echo "setup: WARNING: could not install ${*#--no-install-recommends}: $what will skip" \
      "(and fail in CI)" >&2
}
# Headless Chromium: the live view's browser test (tests/test_liveview.py).
test_peer chromium "the live view's browser test" chromium chromium-driver
# Eclipse Tahu's JavaScript Sparkplug codec: tests/test_sparkplug_decoders.py, an independent
# reading of every metric the node publishes. A NodeSource nodejs already brings npm (and
# conflicts with Debian's npm package): installed only when npm is missing.
test_peer npm "the Sparkplug decoder test" --no-install-recommends nodejs npm
if ! npm ci --ignore-scripts --no-audit --no-fund --prefix tests/sparkplug_decoder >/dev/null; then
  echo "setup: WARNING: could not install tests/sparkplug_decoder; its test will skip" \
    "(and fail in CI)" >&2
fi
# Debian's mbpoll (libmodbus): the independent Modbus master of tests/test_modbus.py.
test_peer mbpoll "the Modbus test with mbpoll" --no-install-recommends mbpoll
# GenICam cameras (edge_agent/capture/genicam.py): Aravis 0.8, its GObject bindings and the
# simulated GigE camera of tests/test_genicam.py are Debian packages; without them the agent
# runs as before and refuses a genicam: camera with the install line.
genicam=(aravis-tools gir1.2-aravis-0.8 python3-gi)
if ! dpkg -s "${genicam[@]}" >/dev/null 2>&1; then
  echo "setup: installing ${genicam[*]} (GenICam cameras)"
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${genicam[@]}" >/dev/null; } ||
    echo "setup: WARNING: could not install ${genicam[*]}: GenICam cameras and their" \
      "tests will not work (and CI fails)" >&2
fi

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu,train,demo,dev,opcua,modbus,docs]'
# The venv sees the system's `gi` (python3-gi, built against this Debian's GLib and
# girepository) through one link, not the whole of dist-packages: only where it was built
# for the venv's Python (same extension suffix).
gi=/usr/lib/python3/dist-packages/gi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if [ -e "$gi/_gi$suffix" ] && { [ -L "$site/gi" ] || [ ! -e "$site/gi" ]; }; then
  ln -sfn "$gi" "$site/gi"
elif [ -d "$gi" ] && [ ! -e "$site/gi" ]; then
  echo "setup: WARNING: python3-gi is not built for .venv's Python ($suffix): GenICam" \
    "cameras cannot load (docs/integrators/cameras.md)" >&2
fi
echo "setup: ready (.venv)"
