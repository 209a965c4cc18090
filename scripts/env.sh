# shellcheck shell=bash
# Source this file (bash or zsh) to use the project's Pulumi engine offline:
#
#   source scripts/env.sh
#
# It puts .tools/bin (built by scripts/bootstrap-pulumi) first on PATH and sets offline
# defaults. A variable you have already set is never changed.
#
#   PULUMI_SKIP_UPDATE_CHECK, PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION,
#   PULUMI_DISABLE_REGISTRY_RESOLVE       default true (nothing is fetched from the network)
#   PULUMI_HOME                           default <project>/.tools/pulumi-home
#   PULUMI_BACKEND_URL                    default file://<project>/state (local state files);
#                                         a URL you set (postgres://…, s3://…), or the backend
#                                         of `pulumi login URL`, is kept. The backend in use is
#                                         printed on stderr.
#   PULUMI_CONFIG_PASSPHRASE(_FILE)       if neither is set: PULUMI_CONFIG_PASSPHRASE_FILE=
#                                         <project>/.tools/passphrase, created once with a
#                                         random value (mode 0600). Back that file up: without
#                                         it the secrets in the state cannot be decrypted.
#   PULUMI_PYTHON_CMD                     default the Python that runs the language host (it
#                                         also runs dynamic providers)

if [ -n "${BASH_SOURCE:-}" ]; then
  _k3s_env_src=${BASH_SOURCE[0]}
elif [ -n "${ZSH_VERSION:-}" ]; then
  eval '_k3s_env_src=${(%):-%x}'
else
  _k3s_env_src=$0
fi
_k3s_root=$(CDPATH= cd -- "$(dirname -- "$_k3s_env_src")/.." && pwd)  # CDPATH: cd would print it

case ":$PATH:" in
  *":$_k3s_root/.tools/bin:"*) ;;
  *) PATH="$_k3s_root/.tools/bin:$PATH" ;;
esac
export PATH

export PULUMI_SKIP_UPDATE_CHECK="${PULUMI_SKIP_UPDATE_CHECK:-true}"
export PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION="${PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION:-true}"
export PULUMI_DISABLE_REGISTRY_RESOLVE="${PULUMI_DISABLE_REGISTRY_RESOLVE:-true}"
export PULUMI_HOME="${PULUMI_HOME:-$_k3s_root/.tools/pulumi-home}"

# the backend `pulumi login URL` chose, if any (Pulumi keeps it in $PULUMI_HOME/credentials.json)
_k3s_login=$(sed -n 's/^ *"current": *"\([^"]*\)".*/\1/p' "$PULUMI_HOME/credentials.json" 2>/dev/null | head -n 1)
if [ -z "${PULUMI_BACKEND_URL:-}" ] && [ -z "$_k3s_login" ]; then
  mkdir -p "$_k3s_root/state"
  export PULUMI_BACKEND_URL="file://$_k3s_root/state"
fi
# which backend is in use (a password in the URL never printed)
_k3s_backend=$(printf '%s' "${PULUMI_BACKEND_URL:-$_k3s_login}" | sed -E 's#^([a-z0-9+]+://)([^/@:]*):[^/@]*@#\1\2:****@#')
case ${PULUMI_BACKEND_URL:-$_k3s_login} in
  file://*) echo "k3scluster: Pulumi state in local files: $_k3s_backend (this machine only; README, \"Several operators\")" >&2 ;;
  *) echo "k3scluster: Pulumi state at $_k3s_backend" >&2 ;;
esac
unset _k3s_backend _k3s_login

if [ -z "${PULUMI_CONFIG_PASSPHRASE+set}" ] && [ -z "${PULUMI_CONFIG_PASSPHRASE_FILE:-}" ]; then
  _k3s_pass="$_k3s_root/.tools/passphrase"
  if [ ! -s "$_k3s_pass" ]; then
    mkdir -p "$_k3s_root/.tools"
    (
      umask 077
      head -c 32 /dev/urandom | base64 | tr -d '\n=' > "$_k3s_pass.tmp" &&
        mv "$_k3s_pass.tmp" "$_k3s_pass"
    ) && echo "note: created the Pulumi secrets passphrase $_k3s_pass (mode 0600); back it up: without it the secrets in the state cannot be decrypted" >&2
  fi
  export PULUMI_CONFIG_PASSPHRASE_FILE="$_k3s_pass"
  unset _k3s_pass
fi

if [ -z "${PULUMI_PYTHON_CMD:-}" ] && [ -f "$_k3s_root/.tools/bin/pulumi-language-python" ]; then
  _k3s_py=$(head -n 1 "$_k3s_root/.tools/bin/pulumi-language-python")
  case $_k3s_py in
    '#!/'*' '*) ;; # "#!/usr/bin/env python3" and the like: leave python3 to PATH
    '#!/'*) export PULUMI_PYTHON_CMD="${_k3s_py#\#!}" ;;
  esac
  unset _k3s_py
fi

unset _k3s_env_src _k3s_root
