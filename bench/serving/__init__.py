"""The serving benchmark (`python -m bench serve`): OpenAI-compatible servers — hermes-ort's,
llama.cpp's C++ llama-server, llama-cpp-python's llama_cpp.server — on the same GGUF, memory cap
and cores, at 1-8 concurrent clients; and the bounded load test (`--load`).

load (the client-side load generator, usable from tests), servers (start, measure and stop a
server in its cgroup), run (the command), report (Markdown from the stored JSON);
build_llama_server.sh builds llama-server from llama-cpp-python's vendored llama.cpp."""
