"""The environment an engine starts with: what it needs from the daemon's, and nothing more.

The daemon's environment may hold secrets (a Hugging Face token for downloads, cloud or API
keys of the user's shell) that an engine has no use for, and an engine runs third-party code
(model code, kernels compiled at start). So an engine gets only the variables named here from
the daemon's environment; the profile's `[launch] env` and the driver's own variables are set
on top of them, as written. Downloads run in the daemon and still see the token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Passed on by exact name: where things are, who runs them, how text and time are shown.
PASSED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
    "LD_LIBRARY_PATH", "LD_PRELOAD",
    # Where Python engines keep caches and find their packages (vLLM compiles kernels into them).
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR", "VIRTUAL_ENV",
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
    "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
    # A compiler for the kernels Triton and torch.compile build at start.
    "CC", "CXX",
    # Where TLS certificates are, for an engine that does fetch something.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
})

# Passed on by prefix: locale categories, and the settings of the GPU stacks, math libraries
# and engines themselves.
PASSED_PREFIXES = (
    "LC_", "PYTHON",
    "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_", "CUDNN_",
    "HIP_", "ROCR_", "ROCM_", "HSA_", "AMD_",
    "OMP_", "KMP_", "GOMP_", "OPENBLAS_", "MKL_", "BLIS_", "ONEDNN_", "DNNL_",
    "GGML_", "LLAMA_", "VLLM_", "FTLLM_", "FASTLLM_",
    "TRITON_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "TOKENIZERS_",
)

# Words that mark a secret even under a passed prefix (VLLM_API_KEY would make vLLM demand a
# key llmd never sends; a *_TOKEN is a credential whatever its prefix).
_SECRET_WORDS = frozenset({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS", "AUTH"})


def is_passed(name: str) -> bool:
    """Whether the daemon's variable `name` reaches engines."""
    if any(word in _SECRET_WORDS for word in name.upper().split("_")):
        return False
    return name in PASSED_NAMES or name.startswith(PASSED_PREFIXES)


def engine_environment(extra: Mapping[str, str], daemon: Mapping[str, str] | None = None) -> dict[str, str]:
    """The passed part of the daemon's environment (`daemon`, default os.environ), then `extra`
    (the launch spec's variables and llmd's own marks) over it."""
    source = os.environ if daemon is None else daemon
    return {**{name: value for name, value in source.items() if is_passed(name)}, **extra}
