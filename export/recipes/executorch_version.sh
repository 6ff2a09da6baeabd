# Sourced by the device build scripts: the ExecuTorch release tag (vX.Y.Z) the library is built against — the venv's
# executorch wheel if there is one (the runtime is tested with it), else pyproject.toml's executorch== pin.
# Usage: ET_TAG=$(executorch_tag "$ROOT") || die "..."
executorch_tag() {
  local root=$1 version=""
  if [ -x "$root/.venv/bin/python" ]; then
    version=$("$root/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("executorch"))' \
      2> /dev/null || true)
  fi
  [ -n "$version" ] || version=$(sed -n 's/^ *"executorch==\([^"]*\)".*/\1/p' "$root/pyproject.toml" 2> /dev/null | head -n1)
  version=${version%%+*}
  [ -n "$version" ] || return 1
  echo "v$version"
}
