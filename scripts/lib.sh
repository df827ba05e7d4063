# Helpers the test scripts share; sourced, not run. Expects $root and $target.

# The Python reference client's virtualenv under target/ (cbor2, jsonschema, pytest at the pinned versions),
# made or updated when the requirements change; prints its python.
python_venv() {
    local venv="$target/python-venv"
    local requirements="$root/examples/python-client/requirements-test.txt"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" >&2
    fi
    if ! cmp -s "$requirements" "$venv/requirements-test.txt"; then
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
        cp "$requirements" "$venv/requirements-test.txt"
    fi
    echo "$venv/bin/python"
}

# Builds the Node addon @pexi/guest in guest-sdk-node (npm ci when the lock file changed, then napi build).
build_node_addon() {
    (
        cd "$root/guest-sdk-node"
        # npm ci is exact (package-lock.json) and quick when node_modules already matches.
        if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
            npm ci --no-audit --no-fund --loglevel=error
        fi
        npm run --silent build
    )
}

# A virtualenv under target/ with zig from PyPI (`ziglang`, pinned), the C compiler scripts/check-macos
# uses for Apple targets; prints its python.
ZIGLANG_VERSION=0.17.0
zig_python() {
    local venv="$target/zig-venv"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" >&2
    fi
    if [ "$(cat "$venv/ziglang-version" 2>/dev/null)" != "$ZIGLANG_VERSION" ]; then
        "$venv/bin/pip" install --quiet --disable-pip-version-check "ziglang==$ZIGLANG_VERSION" >&2
        echo "$ZIGLANG_VERSION" >"$venv/ziglang-version"
    fi
    echo "$venv/bin/python"
}
