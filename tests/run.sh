#!/usr/bin/env bash
# The one command that installs and runs the whole test suite on a fresh Debian 12 machine:
#   bash tests/run.sh [extra pytest args]
# It creates .venv, installs the package with its test extras, installs redis-server and chromium with apt
# when missing (as root), then runs ruff, mypy and pytest. It fails when a test fails, errors or is skipped,
# when no test ran, and when ruff or mypy complain.
set -uo pipefail

cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '==> %s\n' "$*"; }
die() { printf 'tests/run.sh: %s\n' "$*" >&2; exit 2; }

apt_updated=0
apt_install() {  # apt_install PACKAGE...: installs as root, running `apt-get update` at most once
    if [ "$(id -u)" -ne 0 ]; then
        printf 'tests/run.sh: warning: not root, cannot install %s; install it yourself\n' "$*" >&2
        return 0
    fi
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

# --- Python environment ---------------------------------------------------------------------------------
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python >= 3.11 is required"
if [ ! -x .venv/bin/python ]; then
    # Debian ships venv's ensurepip separately.
    "$python" -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    log "creating .venv"
    "$python" -m venv .venv || die "python3 -m venv .venv failed"
fi
log "pip install -e '.[test]'"
.venv/bin/python -m pip install -q -e '.[test]' || die "pip install failed"

# --- System packages the tests drive ---------------------------------------------------------------------
command -v redis-server >/dev/null || apt_install redis-server
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    apt_install chromium
fi
chromium_path=$(command -v chromium || command -v chromium-browser || true)
if [ -n "$chromium_path" ]; then
    export REALTIME_TEST_CHROMIUM="${REALTIME_TEST_CHROMIUM:-$chromium_path}"
fi

# --- Checks ----------------------------------------------------------------------------------------------
lint_failed=0
log "ruff check realtime_service tests"
.venv/bin/ruff check realtime_service tests || lint_failed=1
log "mypy"
.venv/bin/mypy || lint_failed=1

junit=$(mktemp --suffix=.xml)
trap 'rm -f "$junit"' EXIT
log "pytest $*"
.venv/bin/python -m pytest -rs --junitxml="$junit" "$@"
pytest_rc=$?

# Read the counts back: a skipped test means something the suite needs was missing, which is a failure here.
counts=$(.venv/bin/python - "$junit" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 0 0 0")
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
print(total["tests"], total["failures"], total["errors"], total["skipped"])
EOF
)
read -r n_tests n_failures n_errors n_skipped <<<"$counts"
n_passed=$((n_tests - n_failures - n_errors - n_skipped))
echo "tests/run.sh: ${n_passed} passed, ${n_failures} failed, ${n_errors} errors, ${n_skipped} skipped;" \
     "ruff+mypy $([ "$lint_failed" -eq 0 ] && echo clean || echo FAILED); pytest exit code ${pytest_rc}"

if [ "$pytest_rc" -ne 0 ]; then
    exit "$pytest_rc"          # includes 5: no tests collected
fi
if [ "$n_tests" -eq 0 ]; then
    echo "tests/run.sh: no tests ran" >&2
    exit 5
fi
if [ "$n_skipped" -gt 0 ] || [ "$n_failures" -gt 0 ] || [ "$n_errors" -gt 0 ]; then
    echo "tests/run.sh: skipped tests count as failures (see the -rs summary above)" >&2
    exit 1
fi
if [ "$lint_failed" -ne 0 ]; then
    echo "tests/run.sh: ruff or mypy failed" >&2
    exit 1
fi
exit 0
