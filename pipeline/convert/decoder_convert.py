"""Decoder checkpoint -> generation runtime directory (`engine/decoder_modeldir.py`).

Sources: a llama GGUF file (`gguf_checkpoint`) or a Hugging Face directory (`config.json` +
`model.safetensors`, model_type llama or ernie4_5; `hf_decoder`), both read through
`decoder_checkpoint.read_decoder_checkpoint` into one checkpoint type.

`convert_decoder` builds `decoder.DecoderForCausalLM` from the checkpoint, exports the prefill
and decode programs (`decoder_export.write_decoder_programs`) and the tokenizer into a staged
directory beside `dst`, runs the exported programs through the engine's `DecoderPredictor`
against the dynamic-graph model (a left-padded batch of three prompts, prefill + four decode
steps, every step's logits within 1e-4), writes `model.json` and checks that
`modeldir.load_model_info` reads it; only then is the directory moved into place. A failure
leaves nothing behind. An existing `dst` is refused without `force`.

`ensure_decoder_converted` reuses `dst` when it loads, was converted from the same source bytes
and by the current program revision; otherwise it converts again (how the default generation
model gets into the cache).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.engine.decoder_modeldir import (
    DECODER_FORMAT_VERSION,
    DECODER_PROGRAM_REVISION,
    GENERATE_TASK,
    TOKENIZER_FILE,
    DecoderModelInfo,
)
from pipeline.engine.decoder_io import PARAMS_FILE
from pipeline.engine.modeldir import MODEL_JSON, ModelDirError, load_model_info, sha256_file, staged_dir

DECODER_MODEL_TYPES = ("llama", "ernie4_5")  # Hugging Face config.json model_type values we read
DEFAULT_MAX_SEQ_LEN = 2048  # cap of the default max_seq_len (prompt + new tokens)

# The validation probe: small enough to take a few seconds on a 30-layer, 49k-vocab model.
PROBE_LENGTHS = (5, 2, 3)  # one left-padded batch, three different lengths
PROBE_STEPS = 4  # decode steps after the prefill
PROBE_ATOL = 1e-4


# ----------------------------------------------------------------------------- sources


def is_decoder_source(src: str | Path) -> bool:
    """A `.gguf` file, or a directory whose config.json names a decoder model_type we convert."""
    src = Path(src)
    if src.is_file():
        return src.suffix.lower() == ".gguf"
    cfg = src / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("model_type") in DECODER_MODEL_TYPES


def _unsupported(src: Path) -> ConversionError:
    what = "does not exist" if not src.exists() else "is not a decoder checkpoint"
    return ConversionError(
        f"{src} {what}: a generation model converts from a llama GGUF file (*.gguf) or a Hugging Face "
        f"directory with config.json (model_type {' or '.join(DECODER_MODEL_TYPES)}) and model.safetensors")


def read_source(src: Path, with_weights: bool = True):
    """The checkpoint of a decoder source (`decoder_checkpoint.read_decoder_checkpoint`; the GGUF
    reader alone where that module is not there)."""
    if not is_decoder_source(src):
        raise _unsupported(src)
    try:
        from pipeline.convert.decoder_checkpoint import read_decoder_checkpoint
    except ImportError:
        read_decoder_checkpoint = None
    if read_decoder_checkpoint is not None:
        return read_decoder_checkpoint(src, with_weights=with_weights)
    if src.is_file():
        from pipeline.convert.gguf_checkpoint import read_gguf

        return read_gguf(src, with_weights=with_weights)
    raise ConversionError(f"{src}: reading Hugging Face decoder directories needs "
                          f"pipeline.convert.decoder_checkpoint, which this installation lacks")


def _layout(src: Path) -> str:
    return "gguf" if src.is_file() else "hf"


def source_files(ckpt, src: Path) -> list[Path]:
    files = getattr(ckpt, "source_files", None)
    return [Path(f) for f in files] if files else [src]


def source_record(src: Path, files: list[Path]) -> dict:
    """model.json "source": path, layout, and one sha256 naming the source bytes (the file's own
    for one file; for several, the sha256 of their "name sha256" lines, with each file listed)."""
    digests = [(f.name, sha256_file(f)) for f in files]
    if len(digests) == 1:
        digest = digests[0][1]
    else:
        digest = hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(digests)).encode()).hexdigest()
    return {"path": str(src.resolve()), "layout": _layout(src), "sha256": digest,
            "files": [{"file": n, "sha256": h} for n, h in digests]}


def eos_token_ids(ckpt) -> tuple[int, ...]:
    ids = getattr(ckpt, "eos_token_ids", None)
    if ids is None:
        one = ckpt.special_tokens.get("eos_token_id")
        ids = () if one is None else (one,)
    return tuple(int(i) for i in ids)


def special_tokens(ckpt, src: Path) -> dict:
    eos = eos_token_ids(ckpt)
    if not eos:
        raise ConversionError(f"{src} names no end-of-sequence token: generation would never stop at one")
    sp = ckpt.special_tokens
    pad = sp.get("pad_token_id")
    opt = lambda v: None if v is None else int(v)  # noqa: E731
    return {"bos_token_id": opt(sp.get("bos_token_id")), "eos_token_ids": list(eos),
            "pad_token_id": int(eos[0] if pad is None else pad), "unk_token_id": opt(sp.get("unk_token_id"))}


# ----------------------------------------------------------------------------- validation


def probe_batch(vocab_size: int, lengths=PROBE_LENGTHS, seed: int = 0):
    """A left-padded batch of prompts of `lengths`: ids, mask, positions (int64 [B, S] each)."""
    rng = np.random.default_rng(seed)
    S = max(lengths)
    ids = np.zeros((len(lengths), S), np.int64)
    mask = np.zeros((len(lengths), S), np.int64)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = rng.integers(0, vocab_size, n)
        mask[b, S - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None) * mask
    return ids, mask, positions


def check_programs(model, folder: Path, threads: int = 1) -> float:
    """Run the exported programs in `folder` through `DecoderPredictor` (the engine's) against the
    dynamic-graph `model` on the probe batch, with the same tokens fed at each step (the model's
    greedy choices): prefill, then PROBE_STEPS cached decode steps. Returns the largest logit
    difference; ConversionError when it is not below PROBE_ATOL."""
    import paddle

    from pipeline.engine.decoder_predictor import DecoderPredictor

    ids, mask, pos = probe_batch(model.cfg.vocab_size)
    pred = DecoderPredictor(folder, max_batch=ids.shape[0], max_len=ids.shape[1] + PROBE_STEPS, threads=threads)
    errs = []
    with paddle.no_grad():
        want, cache = model(paddle.to_tensor(ids), paddle.to_tensor(pos), paddle.to_tensor(mask))
        want = want.numpy()[:, -1]
        got = pred.prefill(ids, pos, mask.astype(np.float32))
        errs.append(float(np.abs(got - want).max()))
        next_pos = pos[:, -1:] + 1
        for _ in range(PROBE_STEPS):
            tok = want.argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
            want, cache = model(paddle.to_tensor(tok), paddle.to_tensor(next_pos), paddle.to_tensor(mask), cache)
            want = want.numpy()[:, -1]
            got = pred.step(tok, next_pos, mask.astype(np.float32))
            errs.append(float(np.abs(got - want).max()))
            next_pos = next_pos + 1
    err = max(errs)
    if not err < PROBE_ATOL:  # also catches NaN
        raise ConversionError(f"the exported decoder programs differ from the model by {err:.3g} "
                              f"(limit {PROBE_ATOL}; per call: {', '.join(f'{e:.3g}' for e in errs)})")
    return err


# ----------------------------------------------------------------------------- conversion


def _build_model(ckpt):
    from pipeline.convert.decoder import DecoderForCausalLM

    model = DecoderForCausalLM(ckpt.config)
    try:
        model.load_weights(ckpt.weights)
    except AssertionError as e:
        raise ConversionError(f"{ckpt.path}: {e}") from e
    model.eval()
    return model


def convert_decoder(src: str | Path, dst: str | Path, force: bool = False, name: str | None = None,
                    max_seq_len: int | None = None) -> Path:
    """Convert decoder checkpoint `src` (GGUF file or HF directory) into generation runtime
    directory `dst`; returns `dst`. See the module doc."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)

    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} exists; pass --force to overwrite it")
    ckpt = read_source(src)
    cfg = ckpt.config
    seq = max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if not 2 <= seq <= cfg.max_position_embeddings:
        raise ConversionError(f"max_seq_len {seq} must be in 2..{cfg.max_position_embeddings} "
                              f"(the model's max_position_embeddings)")
    special = special_tokens(ckpt, src)
    source = source_record(src, source_files(ckpt, src))

    import paddle

    from pipeline.convert.decoder_export import write_decoder_programs

    paddle.set_device("cpu")
    model = _build_model(ckpt)
    ckpt.weights.clear()  # the model holds its own copy: keep one in memory, not two
    with staged_dir(dst) as stage:
        write_decoder_programs(model, stage.path)
        ckpt.tokenizer.save(str(stage.path / TOKENIZER_FILE))
        err = check_programs(model, stage.path)
        meta = {
            "format_version": DECODER_FORMAT_VERSION,
            "task": GENERATE_TASK,
            "output": "tokens",
            "name": name or ckpt.name,
            "architecture": cfg.to_dict(),
            "max_seq_len": seq,
            "special_tokens": special,
            "add_bos_token": bool(ckpt.add_bos_token),
            "chat_template": ckpt.chat_template,
            "precision": "fp32",
            "program_revision": DECODER_PROGRAM_REVISION,
            "source": source,
            "params_sha256": sha256_file(stage.path / PARAMS_FILE),
            "tokenizer_sha256": sha256_file(stage.path / TOKENIZER_FILE),
            "converted_by": f"pipeline {__version__}, paddle {paddle.__version__}",
            "validation": {"prompt_lengths": list(PROBE_LENGTHS), "decode_steps": PROBE_STEPS,
                           "max_abs_logit_diff": err, "limit": PROBE_ATOL},
        }
        (stage.path / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            info = load_model_info(stage.path)
        except ModelDirError as e:
            raise ConversionError(f"the converted directory does not load: {e}") from e
        if not isinstance(info, DecoderModelInfo):
            raise ConversionError(f"the converted directory loads as a {type(info).__name__}, not a decoder")
    return dst


def ensure_decoder_converted(src: str | Path, dst: str | Path, name: str | None = None) -> Path:
    """Reuse `dst` if it loads as a decoder directory converted from the same source bytes by the
    current program revision; otherwise (re)convert it with force. The source files are hashed on
    every call (about 0.3 s for a 98 MB GGUF)."""
    src, dst = Path(src), Path(dst)
    try:
        info = load_model_info(dst)
    except ModelDirError:
        info = None
    if isinstance(info, DecoderModelInfo) and info.program_revision >= DECODER_PROGRAM_REVISION:
        if is_decoder_source(src):
            files = [src] if src.is_file() else source_files(read_source(src, with_weights=False), src)
            if info.source_sha256 == source_record(src, files)["sha256"]:
                return dst
    return convert_decoder(src, dst, force=True, name=name)
