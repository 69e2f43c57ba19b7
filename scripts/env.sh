# Source this: creates or reuses .venv and installs what shardfn, its tests and demo need.
# On CPU machines torch is pinned to the CPU build 2.13.0 so pip never pulls a CUDA build.
set -e
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_venv="$_root/.venv"
_reqs="$_root/scripts/requirements-cpu.txt"
if [ ! -x "$_venv/bin/python" ]; then
  python3 -m venv "$_venv"
fi
_stamp="$_venv/.shardfn-reqs"
if ! cmp -s "$_reqs" "$_stamp"; then
  _links=()
  # this machine class keeps the CPU torch wheel on disk; point pip at it explicitly
  [ -d /opt/wheels ] && _links=(--find-links /opt/wheels)
  "$_venv/bin/python" -m pip install -q --disable-pip-version-check "${_links[@]}" -r "$_reqs"
  cp "$_reqs" "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
cd "$_root"
set +e
