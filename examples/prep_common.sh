# The wrapper of every examples/<corpus>/prepare.sh, which sources this file and calls
# run_prepare with its prepare.py and arguments: that script, run by the python on PATH
# (scripts/install.sh's .venv, activated), or an error saying how to get one.
run_prepare() {
  if ! command -v python >/dev/null 2>&1; then
    echo "error: 'python' is not on PATH; run scripts/install.sh first (and activate its .venv)" >&2
    exit 1
  fi
  exec python "$@"
}
