#!/usr/bin/env bash
# Builds the JavaScript and Python example plugins into <out-dir>:
#
#   <out-dir>/chatbot_card.wasm     js/chatbot-card          (componentize-js, SpiderMonkey)
#   <out-dir>/cloudevents.wasm      python/cloudevents       (componentize-py, world formatter)
#   <out-dir>/archive_filter.wasm   python/archive-filter    (componentize-py, world filter)
#   <out-dir>/role_targets.wasm     python/role-targets      (componentize-py, world control)
#
#   example-plugins/build-nonrust.sh <out-dir>
#
# A plugin whose output is newer than all of its sources, the WIT files and
# this script is skipped. Progress goes to stderr; stdout gets the path of each
# component, one a line (built or already up to date).
#
# All are built as pure components: they import plugboard:plugin/host and
# nothing from WASI (componentize-js with every WASI feature disabled,
# componentize-py with --stub-wasi). In the Python plugins a WASI call such as
# print() therefore traps; log through host.log instead.
#
# The toolchains come from scripts/install-plugin-toolchains.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 <out-dir>" >&2
  exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
root=$(dirname "$here")
wit_dir="$root/wit"
js_dir="$here/js/chatbot-card"
py_dir="$here/python/cloudevents"
archive_dir="$here/python/archive-filter"
roles_dir="$here/python/role-targets"
COMPONENTIZE_PY_VERSION=0.25.1

mkdir -p "$1"
out=$(cd "$1" && pwd)

say() { printf 'build-nonrust: %s\n' "$*" >&2; }
missing() {
  say "$1 is missing: run scripts/install-plugin-toolchains (in $root) first"
  exit 1
}

log=$(mktemp)
tmp_outputs=()
cleanup() {
  rm -f "$log"
  if [ ${#tmp_outputs[@]} -gt 0 ]; then rm -f "${tmp_outputs[@]}"; fi
}
trap cleanup EXIT

# up_to_date OUTPUT SOURCE...: OUTPUT exists and no file among the sources is newer.
up_to_date() {
  local output=$1
  shift
  [ -f "$output" ] || return 1
  local newer
  newer=$(find "$@" -type f \
    -not -path '*/node_modules/*' -not -path '*/__pycache__/*' -not -path '*/.venv/*' \
    -newer "$output" -print -quit)
  [ -z "$newer" ]
}

# Prints the path of a componentize-py that reports $COMPONENTIZE_PY_VERSION,
# or nothing. Same search order as scripts/install-plugin-toolchains.
find_componentize_py() {
  local candidates=("$here/python/.venv/bin/componentize-py")
  local found
  if found=$(command -v componentize-py 2>/dev/null); then candidates+=("$found"); fi
  if command -v python3 >/dev/null 2>&1; then
    found=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
    [ -n "$found" ] && candidates+=("$found/componentize-py")
    found=$(python3 -m site --user-base 2>/dev/null || true)
    [ -n "$found" ] && candidates+=("$found/bin/componentize-py")
  fi
  local c
  for c in "${candidates[@]}"; do
    if [ -x "$c" ] && "$c" --version 2>/dev/null | grep -qw "$COMPONENTIZE_PY_VERSION"; then
      printf '%s\n' "$c"
      return 0
    fi
  done
  return 0
}

# build NAME OUTPUT COMMAND...: runs COMMAND (which writes $tmp_output), then
# moves the result into place, so that a failed build never leaves an output
# that looks up to date.
build() {
  local name=$1 output=$2
  shift 2
  local started=$EPOCHREALTIME
  if ! "$@" >"$log" 2>&1; then
    say "$name: build FAILED:"
    cat "$log" >&2
    exit 1
  fi
  [ -s "$tmp_output" ] || { say "$name: the build wrote no component"; cat "$log" >&2; exit 1; }
  mv -f "$tmp_output" "$output"
  say "$name: built $output ($(stat -c %s "$output") bytes) in $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
  echo "$output"
}

# JavaScript: chatbot-card.
js_out="$out/chatbot_card.wasm"
if up_to_date "$js_out" "$js_dir/src" "$js_dir/package.json" "$js_dir/package-lock.json" "$wit_dir" "$self"; then
  say "chatbot-card: up to date: $js_out"
  echo "$js_out"
else
  command -v node >/dev/null 2>&1 || missing "Node.js (node)"
  componentize_js="$js_dir/node_modules/.bin/componentize-js"
  [ -x "$componentize_js" ] || missing "componentize-js (example-plugins/js/chatbot-card/node_modules)"
  if [ "$js_dir/package-lock.json" -nt "$js_dir/node_modules" ]; then
    say "warning: package-lock.json is newer than node_modules; scripts/install-plugin-toolchains updates it"
  fi
  tmp_output="$out/.chatbot_card.wasm.tmp.$$"
  tmp_outputs+=("$tmp_output")
  # Same flags as `npm run build` in js/chatbot-card/package.json.
  build chatbot-card "$js_out" \
    env -C "$js_dir" "$componentize_js" \
    --wit "$wit_dir" --world-name formatter \
    --disable stdio random clocks http fetch-event \
    --out "$tmp_output" src/chatbot-card.js
fi

# build_python NAME DIR WORLD MODULE OUTPUT: one componentize-py plugin,
# skipped when OUTPUT is up to date.
build_python() {
  local name=$1 dir=$2 world=$3 module=$4 output=$5
  if up_to_date "$output" "$dir" "$wit_dir" "$self"; then
    say "$name: up to date: $output"
    echo "$output"
    return 0
  fi
  local componentize_py other
  componentize_py=$(find_componentize_py)
  if [ -z "$componentize_py" ]; then
    if other=$(command -v componentize-py 2>/dev/null); then
      missing "componentize-py $COMPONENTIZE_PY_VERSION (found $other: $("$other" --version 2>/dev/null || echo 'version unknown'))"
    fi
    missing "componentize-py $COMPONENTIZE_PY_VERSION"
  fi
  tmp_output="$out/.$(basename "$output").tmp.$$"
  tmp_outputs+=("$tmp_output")
  build "$name" "$output" \
    env -C "$dir" "$componentize_py" \
    -d "$wit_dir" -w "$world" \
    componentize "$module" -p "$dir" --stub-wasi \
    -o "$tmp_output"
}

# Python: cloudevents (a webhook formatter), archive-filter (a
# conversation filter) and role-targets (a control handler).
build_python cloudevents "$py_dir" formatter cloudevents_formatter "$out/cloudevents.wasm"
build_python archive-filter "$archive_dir" filter archive_filter "$out/archive_filter.wasm"
build_python role-targets "$roles_dir" control role_targets "$out/role_targets.wasm"
