"""Export a transformers BambaForCausalLM folder to GGUF with llama.cpp's own tools.

    python -m hybrid_mamba.hub_cards.gguf --model BAMBA_FOLDER --out OUTDIR [--types f32 f16 q8_0 q4_k_m]

Needs `make gguf-install` (llama-cpp-python built from its sdist, whose vendor/llama.cpp holds the
converter). f32 and f16 come from llama.cpp's convert_hf_to_gguf.py (architecture granitehybrid), run
in a subprocess; Q8_0 and Q4_K_M from llama.cpp's quantizer (`llama_model_quantize`) applied to the
f32 file, which is written to OUTDIR only when f32 is asked for. OUTDIR is replaced as a whole, when
every file is written: MODEL-TYPE.gguf for each type (MODEL: the folder's name) and gguf.json (files,
sizes, pre-tokenizer, llama-cpp-python version, the command).

The converter recognises a BPE tokenizer's pre-tokenizer only by the hash of a test string's tokens,
in a table of published tokenizers; a tokenizer trained by data_scripts is in no such table. Its
pre-tokenizer is read from tokenizer.json instead (`pre_tokenizer_name`): a lone ByteLevel with the
GPT-2 regex, no prefix space and no normalizer splits text exactly as llama.cpp's "gpt-2" does. The
answer reaches the converter through its registration hook: the child process subclasses the class
registered for BambaForCausalLM, overrides `get_vocab_base_pre`, registers the subclass under the same
name (`ModelBase.register`) and then runs the converter's own main(). Other tokenizers fall through
to the converter's table.

The same subclass fixes partial rotary embeddings: transformers 5 writes Bamba's
`partial_rotary_factor` (0.5 by default) into rope_parameters, which this converter does not read for
Bamba, so it would write a full-head rope and reorder all of q and k (f32 logits 4.5e-3 off on the
test model, 2% of top-1 tokens different; 3e-7 with the fix).

The converter pads a Mamba-2 hybrid's token list to a multiple of 8 but not its embedding, so
vocab_size must be a multiple of 8 (checked here, before any work).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

CONVERTED = ("f32", "f16")  # written by convert_hf_to_gguf.py
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # by llama_model_quantize
TYPES = CONVERTED + tuple(QUANTIZED)
INSTALL_HINT = "run `make gguf-install` (builds llama-cpp-python from source, about 20 minutes on 2 cores)"
SRC_ENV = "LLAMA_CPP_SRC"
VOCAB_MULTIPLE = 8  # convert_hf_to_gguf.py, GraniteHybridModel.set_vocab

# Runs in the child: argv = [converter script, pre-tokenizer name or "", converter arguments...].
CHILD = """
import sys
from pathlib import Path

script, pre, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
sys.argv = [str(script), *args]
sys.path.insert(0, str(script.parent))
import convert_hf_to_gguf  # puts its own gguf-py on sys.path, as when run as a script
from conversion import ModelBase, get_model_class

Registered = get_model_class("BambaForCausalLM")


@ModelBase.register("BambaForCausalLM")
class BambaExport(Registered):
    model_arch = Registered.model_arch  # every model class names its own

    def get_vocab_base_pre(self, tokenizer):
        return pre or super().get_vocab_base_pre(tokenizer)

    # transformers 5 keeps Bamba's partial rotary factor in rope_parameters; the converter reads only the
    # older attn_rotary_emb, so it would rotate whole heads and reorder all of q and k (rotate-half to
    # llama.cpp's interleaved pairs). Here only the first rot_dims of each head are rotated and reordered.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n_head = self.hparams["num_attention_heads"]
        self.head_dim = self.hparams.get("head_dim") or self.hparams["hidden_size"] // n_head
        factor = self.rope_parameters.get("partial_rotary_factor")
        self.rot_dims = None
        if factor not in (None, 1, 1.0) and not self.hparams.get("attn_rotary_emb"):
            self.rot_dims = int(self.head_dim * factor)
            self.undo_permute = False  # done below, on the rotated part only

    def set_gguf_parameters(self):
        super().set_gguf_parameters()
        if self.rot_dims is not None:
            self.gguf_writer.add_rope_dimension_count(self.rot_dims)

    def modify_tensors(self, data_torch, name, bid):
        if self.rot_dims is not None and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            # rows (heads * head_dim): per head [x_0..x_r/2-1, y_0..y_r/2-1, pass] -> [x_0, y_0, x_1, y_1, ..., pass]
            half, rows = self.rot_dims // 2, data_torch.shape[0]
            inner = [j for i in range(half) for j in (i, i + half)] + list(range(self.rot_dims, self.head_dim))
            order = [h * self.head_dim + j for h in range(rows // self.head_dim) for j in inner]
            data_torch = data_torch[order]
        yield from super().modify_tensors(data_torch, name, bid)


convert_hf_to_gguf.main()
"""


class GGUFError(RuntimeError):
    """llama.cpp's converter or quantizer failed, or the model folder cannot be converted."""


@dataclass
class GGUFArgs:
    model: str = field(metadata={"help": "A save_pretrained BambaForCausalLM folder with its tokenizer."})
    out: str = field(metadata={"help": "Output folder (replaced): MODEL-TYPE.gguf per type and gguf.json."})
    types: list[str] = field(
        default_factory=lambda: list(TYPES),
        metadata={"help": f"GGUF types to write, of {', '.join(TYPES)}."},
    )
    llama_cpp_src: str | None = field(
        default=None,
        metadata={
            "help": "The unpacked llama-cpp-python sdist (holds vendor/llama.cpp/convert_hf_to_gguf.py). Default: "
            f"${SRC_ENV}, else .venv/src/llama_cpp_python-VERSION of the installed version (`make gguf-install`)."
        },
    )
    threads: int = field(default=2, metadata={"help": "Threads of the quantizer."})

    def __post_init__(self):
        bad = [t for t in self.types if t not in TYPES]
        if bad or not self.types:
            raise ValueError(f"--types: {bad or 'none given'}; choose from {', '.join(TYPES)}.")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}.")


def import_llama_cpp():
    """llama_cpp, or one ImportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"llama-cpp-python is not installed ({e}); {INSTALL_HINT}.") from None
    return llama_cpp


def find_converter(llama_cpp_src: str | None = None) -> Path:
    """convert_hf_to_gguf.py of the llama.cpp that the installed llama-cpp-python was built from."""
    llama_cpp = import_llama_cpp()
    src = (
        llama_cpp_src
        or os.environ.get(SRC_ENV)
        or Path(sys.prefix) / "src" / f"llama_cpp_python-{llama_cpp.__version__}"
    )
    script = Path(src) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not at {script}; pass --llama_cpp_src or {INSTALL_HINT}.")
    return script


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name of the pre-tokenizer in a tokenizer.json, for the cases known to match exactly; else None.

    A lone ByteLevel pre-tokenizer with its regex (the GPT-2 split: contractions, letters, digits,
    other symbols, each optionally after one space; runs of whitespace), no prefix space and no
    normalizer is llama.cpp's "gpt-2" (LLAMA_VOCAB_PRE_TYPE_GPT2, the same regex).
    """
    model, pre, normalizer = (
        tokenizer_json.get("model") or {},
        tokenizer_json.get("pre_tokenizer") or {},
        tokenizer_json.get("normalizer"),
    )
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    if model.get("type") == "BPE" and normalizer is None and gpt2:
        return "gpt-2"
    return None


def _run_converter(script: Path, model: Path, outfile: Path, outtype: str, pre: str | None) -> None:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(script),
        pre or "",
        str(model),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
    ]
    logger.info("converting %s to %s with %s", model, outtype, script)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise GGUFError(f"convert_hf_to_gguf.py failed on {model} (exit {proc.returncode}):\n{tail}")
    logger.debug("%s", proc.stderr)


def quantize(src: Path, dst: Path, gguf_type: str, threads: int = 2) -> None:
    """llama.cpp's quantizer: `src` (an f32 or f16 GGUF) to `dst` of `gguf_type` (q8_0, q4_k_m)."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[gguf_type])
    params.nthread = threads
    logger.info("quantizing %s to %s", src.name, gguf_type)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise GGUFError(f"llama_model_quantize failed for {src} -> {gguf_type} (its log is on stderr).")


def check_model(model: Path) -> dict:
    for name in ("config.json", "tokenizer.json"):
        if not (model / name).is_file():
            raise FileNotFoundError(
                f"{model / name} does not exist: --model takes a BambaForCausalLM save_pretrained folder with its tokenizer."
            )
    config = json.loads((model / "config.json").read_text())
    if config.get("architectures") != ["BambaForCausalLM"]:
        raise GGUFError(
            f"{model} holds {config.get('architectures')}, not BambaForCausalLM; export a checkpoint with modeling.convert --to bamba first."
        )
    if config["vocab_size"] % VOCAB_MULTIPLE:
        # the converter pads a hybrid model's token list to a multiple of 8 but not its embedding, which
        # llama.cpp then refuses to load
        raise GGUFError(
            f"{model}: vocab_size {config['vocab_size']} is not a multiple of {VOCAB_MULTIPLE}, which llama.cpp's converter"
            " needs for Mamba-2 hybrids; pad the vocabulary (embedding and lm_head rows) to a multiple of 8."
        )
    return config


def export(args: GGUFArgs) -> dict:
    model, out = Path(args.model), Path(args.out)
    check_model(model)
    script = find_converter(args.llama_cpp_src)
    llama_cpp = import_llama_cpp()
    pre = pre_tokenizer_name(json.loads((model / "tokenizer.json").read_text()))
    logger.info("pre-tokenizer: %s", pre or "left to the converter's table")
    stem = model.resolve().name
    files = {}
    with atomic_dir(out) as tmp:
        quantized = [t for t in args.types if t in QUANTIZED]
        for t in CONVERTED:
            if t in args.types or (t == "f32" and quantized):
                _run_converter(script, model, tmp / f"{stem}-{t}.gguf", t, pre)
        for t in quantized:
            quantize(tmp / f"{stem}-f32.gguf", tmp / f"{stem}-{t}.gguf", t, args.threads)
        if "f32" not in args.types:
            (tmp / f"{stem}-f32.gguf").unlink(missing_ok=True)  # only the quantizer's source
        for t in args.types:
            path = tmp / f"{stem}-{t}.gguf"
            files[t] = {"file": path.name, "bytes": path.stat().st_size}
        manifest = {
            "command": " ".join(["python -m hybrid_mamba.hub_cards.gguf", *sys.argv[1:]]),
            "model": str(model),
            "architecture": "granitehybrid",
            "pre_tokenizer": pre,
            "llama_cpp_python": llama_cpp.__version__,
            "converter": str(script),
            "files": files,
        }
        write_json_atomic(tmp / "gguf.json", manifest)
    for t, f in files.items():
        logger.info("%s: %s (%.2f MB)", t, out / f["file"], f["bytes"] / 1e6)
    return manifest


def main(argv=None):
    args = parse_args(GGUFArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    export(args)


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
