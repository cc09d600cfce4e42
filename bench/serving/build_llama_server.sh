#!/usr/bin/env bash
# The serving benchmark's two llama.cpp peers (bench/serving/servers.py):
# 1. llama.cpp's `llama-server` (the C++ server with --parallel slots and continuous batching),
#    built from the llama.cpp vendored in llama-cpp-python's sdist: the same llama.cpp as the
#    installed llama_cpp package. The web UI is left out (it would be fetched from the network).
# 2. `python -m llama_cpp.server`'s extra dependencies (llama-cpp-python[server]: fastapi,
#    sse-starlette, pydantic-settings, starlette-context), installed apart from .venv into
#    ~/.cache/hermes-ort/llama-cpp-server-deps, which only that server's process imports from.
# Idempotent: each step is skipped when its output is there; prints where things are.
#
#   bench/serving/build_llama_server.sh            # ~/.cache/hermes-ort/llama-server/bin/llama-server
#   LLAMA_SERVER_PREFIX=DIR JOBS=2 bench/serving/build_llama_server.sh
#
# The sdist is taken from $LLAMA_SDIST, else .peers/ (where bench/peers keeps it), else pip's
# download (the package registry).
set -euo pipefail

VERSION=0.3.36
PREFIX=${LLAMA_SERVER_PREFIX:-$HOME/.cache/hermes-ort/llama-server}
BIN=$PREFIX/bin/llama-server
JOBS=${JOBS:-2}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PIP=$REPO/.venv/bin/pip
DEPS=${LLAMA_CPP_SERVER_DEPS:-$HOME/.cache/hermes-ort/llama-cpp-server-deps}

if [ -d "$DEPS/fastapi" ]; then
    echo "llama_cpp.server's dependencies already in: $DEPS"
else
    # --no-deps: everything else they need is in .venv already (pydantic, starlette, anyio)
    "$PIP" install --quiet --target "$DEPS" --no-deps fastapi annotated-doc opentelemetry-api \
        pydantic-settings python-dotenv sse-starlette "starlette-context>=0.3.6,<0.4"
    echo "llama_cpp.server's dependencies installed in: $DEPS"
fi

if [ -x "$BIN" ]; then
    echo "llama-server already built: $BIN"
    exit 0
fi

SDIST=${LLAMA_SDIST:-}
if [ -z "$SDIST" ] && [ -f "$REPO/.peers/llama_cpp_python-$VERSION.tar.gz" ]; then
    SDIST=$REPO/.peers/llama_cpp_python-$VERSION.tar.gz
fi
if [ -z "$SDIST" ]; then
    mkdir -p /tmp/llsdist
    "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d /tmp/llsdist
    SDIST=/tmp/llsdist/llama_cpp_python-$VERSION.tar.gz
fi
echo "sdist: $SDIST"

SRC=$PREFIX/src
BUILD=$PREFIX/build
mkdir -p "$SRC" "$PREFIX/bin"
if [ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
    tar xzf "$SDIST" -C "$SRC" --strip-components=2 "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
cmake -S "$SRC/llama.cpp" -B "$BUILD" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF
cmake --build "$BUILD" --target llama-server -j "$JOBS"

install -m 755 "$BUILD/bin/llama-server" "$BIN"
"$BIN" --version 2>&1 | head -n 2 || true
echo "llama-server built: $BIN"
