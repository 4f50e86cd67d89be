#!/usr/bin/env bash
# Build (once) Flux's source-controller and kustomize-controller for the GitOps tier, from their
# Go modules (the Go module proxy serves them), and take their CRDs and RBAC from the same modules:
#
#   source-controller      github.com/fluxcd/source-controller     (GitRepository -> artifact)
#   kustomize-controller   github.com/fluxcd/kustomize-controller  (Kustomization: apply, prune, health)
#   crds/*.yaml            each module's config/crd/bases
#   rbac/<controller>.yaml each module's config/rbac/role.yaml (the ClusterRole it runs with)
#
# Everything lands in ${OMNI_CACHE:-$HOME/.cache/qwen3-omni}/bin/<version-key>/, outside the
# repository; a second run with everything present exits at once.
#
# Each controller's go.mod replaces its /api module with ./api, which the module zip leaves out:
# the controller is built in a writable copy of its module with the /api module (at the version
# its go.mod requires) copied into ./api. v1.9.x builds with Go 1.26 (v1.10 would need 1.27).
#
#   bash e2e/build-flux.sh             build what is missing
#   bash e2e/build-flux.sh --print-dir print the directory and exit
#   bash e2e/build-flux.sh --check     exit 0 when everything is present, 1 otherwise
set -euo pipefail

SOURCE_CONTROLLER_VERSION="v1.9.6"    # github.com/fluxcd/source-controller (Flux v2.9)
KUSTOMIZE_CONTROLLER_VERSION="v1.9.6" # github.com/fluxcd/kustomize-controller (Flux v2.9)
# The module proxy refuses source-controller v1.9.6's github.com/fluxcd/pkg/artifact v0.18.3 (403,
# "not available"), and every other v0.18 patch release but v0.18.0: built with that one instead.
SOURCE_CONTROLLER_REPLACE="github.com/fluxcd/pkg/artifact=github.com/fluxcd/pkg/artifact@v0.18.0"
KUSTOMIZE_CONTROLLER_REPLACE=""

CACHE="${OMNI_CACHE:-$HOME/.cache/qwen3-omni}"
KEY="flux-source-${SOURCE_CONTROLLER_VERSION}_kustomize-${KUSTOMIZE_CONTROLLER_VERSION}"
BIN_DIR="$CACHE/bin/$KEY"
WORK_DIR="$CACHE/build/$KEY"
CONTROLLERS=(source-controller kustomize-controller)

all_present() {
  local c
  for c in "${CONTROLLERS[@]}"; do
    [[ -x "$BIN_DIR/$c" && -s "$BIN_DIR/rbac/$c.yaml" && -s "$BIN_DIR/.$c.crds" ]] || return 1
  done
}

case "${1:-}" in
  --print-dir) echo "$BIN_DIR"; exit 0 ;;
  --check) all_present; exit $? ;;
  "") ;;
  *) echo "usage: $0 [--print-dir|--check]" >&2; exit 2 ;;
esac

log() { printf '[build-flux %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if all_present; then
  log "all present in $BIN_DIR"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found on PATH"; exit 1; }
mkdir -p "$BIN_DIR/crds" "$BIN_DIR/rbac" "$WORK_DIR"

# One build at a time per cache (the test fixture and `make flux` may race).
exec 9>"$CACHE/bin/.$KEY.lock"
log "waiting for the build lock"; flock 9
if all_present; then
  log "all present in $BIN_DIR"
  exit 0
fi

export GOFLAGS="-buildvcs=false -mod=mod" CGO_ENABLED=0

module_dir() {  # module@version -> its extracted (read-only) directory in the module cache
  (cd "$WORK_DIR" && go mod download -json "$1") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p'
}

build_controller() {  # name version [old=new@version: a module replaced]
  local name="$1" version="$2" replace="${3:-}" module="github.com/fluxcd/$1" src api_version api_dir
  local tree="$WORK_DIR/$1"
  log "$name $version: downloading the module"
  src="$(module_dir "$module@$version")"
  [[ -f "$src/go.mod" ]] || { log "error: could not download $module@$version"; return 1; }
  api_version="$(sed -n "s#^[[:space:]]*$module/api \(v[^[:space:]]*\).*#\1#p" "$src/go.mod" | head -n1)"
  [[ -n "$api_version" ]] || { log "error: $module@$version does not require its /api module"; return 1; }
  api_dir="$(module_dir "$module/api@$api_version")"
  [[ -f "$api_dir/go.mod" ]] || { log "error: could not download $module/api@$api_version"; return 1; }

  rm -rf "$tree" && cp -r "$src" "$tree" && chmod -R u+w "$tree"
  cp -r "$api_dir" "$tree/api" && chmod -R u+w "$tree/api"
  [[ -z "$replace" ]] || (cd "$tree" && go mod edit -replace "$replace")
  log "$name $version: compiling (a few minutes on few cores)"
  (cd "$tree" && go build -trimpath "-ldflags=-s -w" -o "$tree/$name.bin" .) >&2

  install -m 0644 "$src"/config/crd/bases/*.yaml "$BIN_DIR/crds/"  # writable copies of the read-only module files
  install -m 0644 "$src/config/rbac/role.yaml" "$BIN_DIR/rbac/$name.yaml"
  (cd "$src/config/crd/bases" && ls ./*.yaml) >"$BIN_DIR/.$name.crds"
  chmod +x "$tree/$name.bin"
  cp "$tree/$name.bin" "$BIN_DIR/.$name.tmp" && mv -f "$BIN_DIR/.$name.tmp" "$BIN_DIR/$name"
  log "installed $name ($(du -h "$BIN_DIR/$name" | cut -f1))"
  rm -rf "$tree"
}

start=$SECONDS
log "building into $BIN_DIR"
[[ -x "$BIN_DIR/source-controller" && -s "$BIN_DIR/.source-controller.crds" ]] ||
  build_controller source-controller "$SOURCE_CONTROLLER_VERSION" "$SOURCE_CONTROLLER_REPLACE"
[[ -x "$BIN_DIR/kustomize-controller" && -s "$BIN_DIR/.kustomize-controller.crds" ]] ||
  build_controller kustomize-controller "$KUSTOMIZE_CONTROLLER_VERSION" "$KUSTOMIZE_CONTROLLER_REPLACE"
all_present || { log "error: something is still missing in $BIN_DIR"; exit 1; }
log "done in $((SECONDS - start))s: $BIN_DIR"
