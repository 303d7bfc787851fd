"""Export a hybrid_mamba model's prefill and decode step to torch.export and ONNX, and run them with onnxruntime.

    python -m hybrid_mamba.hub_cards.onnx_export --model MODEL_DIR --out OUTDIR [--prefill_len 32] [--opset 18]

Writes OUTDIR (replaced as a whole once every file is written): ``prefill.onnx``, ``decode.onnx`` and
``onnx_export.json`` (inputs, outputs, the state tensors with their shapes, opset, library versions and
the largest |ONNX - torch| difference measured on a check run). Needs the onnx extra
(``pip install -e ".[onnx]"``: onnx, onnxscript, onnxruntime).

Design: no second copy of the model's math. `ExportStep` is an nn.Module whose forward takes plain
tensors (the token ids and, per layer, a Mamba layer's conv and SSM state or an attention layer's keys
and values), builds a transformers `Cache` holding them (`LinearAttentionLayer` for Mamba layers, a plain
`DynamicLayer` for attention layers), calls the real `HybridMambaForCausalLM.forward` and returns the
logits and the updated state tensors. Positions come from the key/value length, as in eager decoding.
The same module is exported twice:

* decode: one token (B, 1); batch and past length dynamic (``torch.export.Dim``).
* prefill: a chunk of exactly ``prefill_len`` tokens (B, prefill_len) with states in and out; batch and
  past length dynamic. A prompt runs as whole chunks, the first from zero Mamba states and an empty
  key/value cache (past length 0), and its last ``len % prefill_len`` tokens through decode steps; the
  result is the same as one prefill of the whole prompt (tested).

The prefill's token count is static because the model's Mamba scans branch on the sequence length in
Python (``_SSDChunks``: ``min(chunk_size, t)``, ``if pad:``, a loop over ``range(chunks)``; Mamba-1's
``selective_scan``: ``range(0, t, chunk_size)`` and the doubling ``while`` loop), which torch.export
can only specialise. Attention runs through SDPA with GQA left to SDPA (``TRANSFORMERS_SDPA_FORCE_GQA``
during export): transformers' ``repeat_kv`` reshape raises an unprovable stride guard on a dynamic past
length.

`OnnxGenerator` runs the two graphs with onnxruntime on CPU: greedy generation (the same tokens as
``generate(do_sample=False)``), with the time spent in prefill and decode kept for benchmarks. Batched
prompts must have equal lengths (there is no attention-mask input).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "onnx_export.json"
PREFILL_FILE, DECODE_FILE = "prefill.onnx", "decode.onnx"
DEFAULT_PREFILL_LEN = 32
EXAMPLE_BATCH, EXAMPLE_PAST = 2, 5  # example sizes traced with (dynamic dims need examples >= 2)
MAX_BATCH, MAX_PAST = 4096, 1 << 20
INSTALL_HINT = 'pip install -e ".[onnx]" (onnx, onnxscript, onnxruntime)'


class OnnxExportError(ValueError):
    """Bad input to the export, or an export whose check run disagrees with torch."""


# The state tensors


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: `name`, the layer it belongs to, its `kind` (conv, ssm, key, value) and shape;
    "batch" and "past" in `shape` are the dynamic dimensions."""

    name: str
    layer: int
    kind: str
    shape: tuple
    dtype: torch.dtype

    def example(self, batch: int, past: int) -> torch.Tensor:
        sizes = [batch if d == "batch" else past if d == "past" else d for d in self.shape]
        return torch.zeros(sizes, dtype=self.dtype)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def state_specs(model) -> list[StateSpec]:
    """The state tensors of `model` (a HybridMambaForCausalLM), in the order ExportStep takes them."""
    config, dtype = model.config, model.dtype
    specs = []
    for i, layer in enumerate(model.model.layers):
        if layer.mixer_type == "attention":
            kv = ("batch", config.num_key_value_heads, "past", layer.self_attn.head_dim)
            specs += [StateSpec(f"key_{i}", i, "key", kv, dtype), StateSpec(f"value_{i}", i, "value", kv, dtype)]
            continue
        mixer = layer.mamba
        conv = ("batch", mixer.conv1d.weight.shape[0], mixer.conv_kernel_size)
        if layer.mixer_type == "mamba2":  # the SSD scan's state is float32 whatever the model's dtype
            ssm = ("batch", mixer.num_heads, mixer.head_dim, mixer.d_state)
        else:
            ssm = ("batch", mixer.d_inner, mixer.d_state)
        specs += [StateSpec(f"conv_{i}", i, "conv", conv, dtype), StateSpec(f"ssm_{i}", i, "ssm", ssm, torch.float32)]
    return specs


def empty_states(model, batch: int, past: int = 0) -> list[torch.Tensor]:
    """Zero states (fresh Mamba layers) and a key/value cache of `past` zero tokens."""
    return [spec.example(batch, past) for spec in state_specs(model)]


def _kv_layer(keys: torch.Tensor, values: torch.Tensor):
    """transformers' plain DynamicLayer holding the given keys and values (HybridMambaKVLayer compares
    data pointers, which tracing cannot)."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def _mamba_layer(conv: torch.Tensor, ssm: torch.Tensor):
    """transformers' LinearAttentionLayer holding copies of the given states (the model updates them in place)."""
    from transformers.cache_utils import LinearAttentionLayer

    layer = LinearAttentionLayer()
    layer.conv_states[0], layer.recurrent_states[0] = conv.clone(), ssm.clone()
    layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
    layer.has_previous_state[0] = True
    layer.conv_kernel_size[0] = conv.shape[-1]
    layer.dtype, layer.device = conv.dtype, conv.device
    return layer


class ExportStep(nn.Module):
    """Plain tensors in and out around the real model: (input_ids, *states) -> (logits, *new_states).

    `states` follow `state_specs(model)`. The new key/value tensors are the given ones with this call's
    tokens appended; the Mamba states are those after this call's tokens.
    """

    def __init__(self, model, logits_to_keep: int = 0):
        super().__init__()
        self.model = model
        self.specs = state_specs(model)
        self.logits_to_keep = logits_to_keep

    def make_cache(self, states):
        from transformers.cache_utils import Cache

        if len(states) != len(self.specs):
            raise ValueError(f"ExportStep takes {len(self.specs)} state tensors, got {len(states)}.")
        layers = []
        for i in range(0, len(states), 2):
            a, b = states[i], states[i + 1]
            layers.append(_kv_layer(a, b) if self.specs[i].kind == "key" else _mamba_layer(a, b))
        return Cache(layers=layers)

    @staticmethod
    def read_cache(cache) -> list[torch.Tensor]:
        out = []
        for layer in cache.layers:
            if hasattr(layer, "conv_states"):
                out += [layer.conv_states[0], layer.recurrent_states[0]]
            else:
                out += [layer.keys, layer.values]
        return out

    def forward(self, input_ids, *states):
        cache = self.make_cache(states)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=self.logits_to_keep)
        return (out.logits, *self.read_cache(cache))


@contextlib.contextmanager
def _export_mode():
    """SDPA's own GQA during tracing (see the module docstring); restores the environment after."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.no_grad():
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _check_model(model) -> None:
    if getattr(model.config, "model_type", None) != "hybrid_mamba":
        raise OnnxExportError(f"expected a hybrid_mamba model, got model_type {model.config.model_type!r}")
    impl = model.config._attn_implementation
    if "attention" in model.config.layer_types and impl != "sdpa":
        raise OnnxExportError(
            f"export runs attention through SDPA, the model uses {impl!r}: load it with attn_implementation='sdpa'"
        )


def _example_inputs(step: ExportStep, tokens: int, batch: int = EXAMPLE_BATCH, past: int = EXAMPLE_PAST):
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    return (ids, *[spec.example(batch, past) for spec in step.specs])


def _dynamic_shapes(step: ExportStep):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    past = torch.export.Dim("past", min=1, max=MAX_PAST)
    states = [{0: batch, 2: past} if s.kind in ("key", "value") else {0: batch} for s in step.specs]
    return {"input_ids": {0: batch}, "states": tuple(states)}


def export_program(model, tokens: int = 1, logits_to_keep: int = 0) -> torch.export.ExportedProgram:
    """torch.export of one step of `tokens` new tokens (1: decode, more: a prefill chunk) with states in and out.

    Dynamic: batch and past length. `model` is a HybridMambaForCausalLM (eval mode is set here).
    """
    _check_model(model)
    if tokens < 1:
        raise OnnxExportError(f"tokens must be at least 1, got {tokens}")
    model.eval()
    step = ExportStep(model, logits_to_keep)
    with _export_mode():
        return torch.export.export(
            step, _example_inputs(step, tokens), dynamic_shapes=_dynamic_shapes(step), strict=False
        )


def io_names(model) -> tuple[list[str], list[str]]:
    """ONNX input and output names: input_ids + state names; logits + state names prefixed `new_`."""
    names = [s.name for s in state_specs(model)]
    return ["input_ids", *names], ["logits", *(f"new_{n}" for n in names)]


def _onnx_program(model, tokens: int, opset: int | None):
    program = export_program(model, tokens)
    inputs, outputs = io_names(model)
    step = ExportStep(model)
    with _export_mode():
        return torch.onnx.export(
            program,
            _example_inputs(step, tokens),
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )


def _io_json(model, tokens: int) -> dict:
    specs = state_specs(model)
    seq = 1 if tokens == 1 else tokens
    inputs = [{"name": "input_ids", "shape": ["batch", seq], "dtype": "int64"}]
    outputs = [{"name": "logits", "shape": ["batch", seq, model.config.vocab_size], "dtype": "float32"}]
    for s in specs:
        inputs.append(s.to_json())
        out = s.to_json()
        out["name"] = f"new_{s.name}"
        if s.kind in ("key", "value"):
            out["shape"] = [f"past+{tokens}" if d == "past" else d for d in s.shape]
        outputs.append(out)
    return {"tokens": tokens, "inputs": inputs, "outputs": outputs}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def require_onnx() -> None:
    """ImportError with the install hint unless onnx, onnxscript and onnxruntime import."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def load_model(model_dir: str | Path):
    """The HybridMambaForCausalLM of a save_pretrained folder, fp32 on CPU, SDPA attention, eval mode."""
    from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

    model = HybridMambaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def check_model_dir(model_dir: str | Path) -> Path:
    """`model_dir` as a Path, or OnnxExportError when it is no hybrid_mamba save_pretrained folder."""
    path = Path(model_dir)
    config = path / "config.json"
    if not path.is_dir():
        raise OnnxExportError(f"--model {path}: no such folder")
    if not config.is_file():
        raise OnnxExportError(f"--model {path}: no config.json (expected a save_pretrained folder)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as err:
        raise OnnxExportError(f"--model {path}: config.json is not JSON ({err})") from err
    if model_type != "hybrid_mamba":
        raise OnnxExportError(f"--model {path}: model_type is {model_type!r}, expected 'hybrid_mamba'")
    return path


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    prefill_len: int = DEFAULT_PREFILL_LEN,
    opset: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
    model=None,
) -> dict:
    """Write prefill.onnx, decode.onnx and onnx_export.json for the model in `model_dir` into `out_dir`
    (replaced as a whole). With `verify`, a short greedy run through onnxruntime is compared with torch
    and the export fails when the logits differ by more than `tolerance`. Returns the manifest."""
    require_onnx()
    model_dir = check_model_dir(model_dir)
    if prefill_len < 2:
        raise OnnxExportError(f"prefill_len must be at least 2 (one token is the decode graph), got {prefill_len}")
    model = load_model(model_dir) if model is None else model.eval()
    _check_model(model)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        opsets = {}
        for tokens, name in ((prefill_len, PREFILL_FILE), (1, DECODE_FILE)):
            t0 = time.perf_counter()
            program = _onnx_program(model, tokens, opset)
            program.save(str(tmp / name))
            opsets[name] = program.model.opset_imports.get("", opset)
            logger.info("%s written in %.1f s", name, time.perf_counter() - t0)
        manifest = {
            "format": FORMAT_VERSION,
            "model": str(model_dir),
            "opset": opsets[DECODE_FILE],
            "versions": _versions(),
            "vocab_size": model.config.vocab_size,
            "eos_token_id": model.generation_config.eos_token_id,
            "pad_token_id": model.generation_config.pad_token_id,
            "prefill": {"file": PREFILL_FILE, **_io_json(model, prefill_len)},
            "decode": {"file": DECODE_FILE, **_io_json(model, 1)},
            "states": [s.to_json() for s in state_specs(model)],
            "dynamic": {"batch": [1, MAX_BATCH], "past": [0, MAX_PAST]},
        }
        if verify:
            diff = verify_export(model, tmp, manifest)
            manifest["check_max_abs_diff"] = diff
            if diff > tolerance:
                raise OnnxExportError(f"onnxruntime logits differ from torch by {diff:.3g} (> {tolerance:g})")
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def verify_export(model, folder: Path, manifest: dict | None = None, batch: int = 3) -> float:
    """Largest |logit| difference between onnxruntime and torch over a prompt of one prefill chunk plus
    three tokens, then four decode steps, on batch `batch` (not the traced example size)."""
    gen = OnnxGenerator(folder, manifest=manifest)
    n = gen.prefill_len + 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, n + 4), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    logits = gen.forward_logits(ids[:, :n].numpy(), ids[:, n:].numpy())
    return float(np.abs(logits - ref).max())


# Running the export


class OnnxGenerator:
    """prefill.onnx and decode.onnx through onnxruntime: logits of a prompt, and greedy generation.

    `last_timings` holds the seconds spent in the last call's prefill (whole chunks and the decode
    steps of its remainder) and in its generated tokens' decode steps.
    """

    def __init__(self, folder, providers=("CPUExecutionProvider",), threads: int | None = None, manifest=None):
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = manifest or json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.prefill = ort.InferenceSession(
            str(folder / self.manifest["prefill"]["file"]), opts, providers=list(providers)
        )
        self.decode = ort.InferenceSession(
            str(folder / self.manifest["decode"]["file"]), opts, providers=list(providers)
        )
        self.prefill_len = self.manifest["prefill"]["tokens"]
        self.states = self.manifest["states"]
        self.state_names = [s["name"] for s in self.states]
        self.last_timings: dict = {}

    def empty_states(self, batch: int) -> list[np.ndarray]:
        return [
            np.zeros([batch if d == "batch" else 0 if d == "past" else d for d in s["shape"]], dtype=s["dtype"])
            for s in self.states
        ]

    def step(self, ids: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run `ids` (B, prefill_len) through prefill.onnx or (B, 1) through decode.onnx."""
        session = self.decode if ids.shape[1] == 1 else self.prefill
        if ids.shape[1] not in (1, self.prefill_len):
            raise ValueError(f"a step takes 1 or {self.prefill_len} tokens, got {ids.shape[1]}")
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), **dict(zip(self.state_names, states))}
        logits, *new = session.run(None, feed)
        return logits, new

    def run_prompt(self, ids: np.ndarray, states=None):
        """Logits of every token of `ids` (B, T) and the states after them: whole chunks through prefill,
        the rest one token at a time through decode."""
        ids = np.asarray(ids, dtype=np.int64)
        states = self.empty_states(ids.shape[0]) if states is None else states
        chunks, pos, P = [], 0, self.prefill_len
        while ids.shape[1] - pos >= P:
            logits, states = self.step(ids[:, pos : pos + P], states)
            chunks.append(logits)
            pos += P
        while pos < ids.shape[1]:
            logits, states = self.step(ids[:, pos : pos + 1], states)
            chunks.append(logits)
            pos += 1
        return np.concatenate(chunks, axis=1), states

    def forward_logits(self, prompt: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        """Logits of prompt + continuation (B, T, V): the prompt as run_prompt, the continuation's
        tokens as decode steps (teacher forcing)."""
        logits, states = self.run_prompt(prompt)
        out = [logits]
        for j in range(continuation.shape[1]):
            step_logits, states = self.step(continuation[:, j : j + 1], states)
            out.append(step_logits)
        return np.concatenate(out, axis=1)

    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """Greedy continuation of `input_ids` (B, T), as `generate(do_sample=False)`: rows that produced
        an EOS token continue with `pad_token_id` (default: the first EOS id); stops when all have."""
        ids = np.asarray(input_ids.cpu() if torch.is_tensor(input_ids) else input_ids, dtype=np.int64)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        t0 = time.perf_counter()
        logits, states = self.run_prompt(ids)
        t1 = time.perf_counter()
        tokens, done, steps = [ids], np.zeros(ids.shape[0], dtype=bool), 0
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            nxt = np.where(done, pad, nxt)
            tokens.append(nxt[:, None])
            done |= np.isin(nxt, eos)
            if done.all() or i == max_new_tokens - 1:
                break
            logits, states = self.step(nxt[:, None], states)
            steps += 1
        t2 = time.perf_counter()
        self.last_timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps}
        return np.concatenate(tokens, axis=1)


# Command


@dataclass
class OnnxExportArgs:
    model: str = field(metadata={"help": "A hybrid_mamba save_pretrained folder."})
    out: str = field(
        metadata={"help": "Output folder (replaced as a whole): prefill.onnx, decode.onnx, onnx_export.json."}
    )
    prefill_len: int = field(
        default=DEFAULT_PREFILL_LEN,
        metadata={"help": "Tokens per prefill chunk (static); a prompt's remainder runs through decode steps."},
    )
    opset: int | None = field(default=None, metadata={"help": "ONNX opset (default: the exporter's)."})
    verify: bool = field(default=True, metadata={"help": "Compare onnxruntime with torch on a short run."})
    tolerance: float = field(default=1e-4, metadata={"help": "Largest |logit| difference accepted by --verify."})

    def __post_init__(self):
        if self.prefill_len < 2:
            raise OnnxExportError(f"--prefill_len must be at least 2, got {self.prefill_len}")
        if self.tolerance <= 0:
            raise OnnxExportError(f"--tolerance must be positive, got {self.tolerance}")
        model = check_model_dir(self.model)
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise OnnxExportError(f"--out {out}: exists and is not a folder")
        if out.resolve() == model.resolve() or model.resolve() in out.resolve().parents:
            raise OnnxExportError(f"--out {out} must lie outside --model {model} (it is replaced as a whole)")
        require_onnx()


def main(argv=None):
    args = parse_args(OnnxExportArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = export_onnx(
        args.model,
        args.out,
        prefill_len=args.prefill_len,
        opset=args.opset,
        verify=args.verify,
        tolerance=args.tolerance,
    )
    diff = manifest.get("check_max_abs_diff")
    logger.info(
        "wrote %s (opset %s)%s", args.out, manifest["opset"], "" if diff is None else f", max |diff| {diff:.2e}"
    )
    return manifest


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
