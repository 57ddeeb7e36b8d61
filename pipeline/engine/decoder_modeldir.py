"""The runtime directory of a generation model: what the decoder converter writes and the
generation engine loads (no paddle).

A decoder directory holds the two programs of `engine/decoder_io.py` (`prefill.pdmodel`,
`decode.pdmodel`, both reading `decoder.pdiparams`), the tokenizer as a Hugging Face
`tokenizer.json`, and `model.json` with `"task": "generate"`. `load_decoder_info` reads it into
a typed `DecoderModelInfo` in this one place; `modeldir.load_model_info` hands a directory to it
when its model.json names the task `generate`.

model.json (`format_version` 1 of this layout):

    {"format_version": 1, "task": "generate", "output": "tokens", "name": ...,
     "architecture": {DecoderConfig.to_dict()},            # convert/decoder.py
     "max_seq_len": N,                                      # prompt + generated tokens allowed
     "special_tokens": {"bos_token_id": .., "eos_token_ids": [..], "pad_token_id": .., "unk_token_id": ..},
     "add_bos_token": bool, "chat_template": str | null,
     "precision": "fp32", "program_revision": 1,
     "source": {"path": .., "layout": "gguf" | "hf", "sha256": ..,
                "files": [{"file": name, "sha256": ..}, ...]},
     "params_sha256": .., "tokenizer_sha256": .., "converted_by": ..,
     "validation": {"prompt_lengths": [..], "decode_steps": N, "max_abs_logit_diff": .., "limit": ..},
     "gates": {NAME: {"passed": .., "forced": .., "base": {..}, "candidate": {..}, "loss_rate": {..}, ..}}}

`pruning` (vocabulary-pruned models, `prune-vocab`): {"source_path", "source_params_sha256",
"source_vocab_size", "ids_kept", "map_file": "vocab_map.npy", "map_sha256", ...}; the map is
verified against its checksum and the sizes here (`engine/vocab_map.py`), and
`special_tokens` stay full-vocabulary ids (`model_special_tokens()` gives the rows).

`gates` (optional) holds the generation quality gates of this directory against the fp32
unpruned model (`convert/generation_gate.py`), by name ("pruning", or a runtime precision).

`source.sha256` names the source bytes: the file's own sha256 for one file (a GGUF), else the
sha256 of the "name sha256\n" lines of its files sorted by name (`files` lists them);
`ensure_decoder_converted` compares it. `validation` records the converter's check of the
exported programs against the dynamic-graph model (convert/decoder_convert.py); informative,
not read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.decoder_io import DECODE_PROGRAM, PARAMS_FILE, PREFILL_PROGRAM
from pipeline.engine.vocab_map import VocabMap, read_vocab_map

GENERATE_TASK = "generate"
TOKENIZER_FILE = "tokenizer.json"
DECODER_FORMAT_VERSION = 1
DECODER_PROGRAM_REVISION = 1


@dataclass(frozen=True)
class SpecialTokens:
    eos_token_ids: tuple[int, ...]  # any of them ends a sequence
    pad_token_id: int  # what left-padding feeds (never attended)
    bos_token_id: int | None = None
    unk_token_id: int | None = None


@dataclass(frozen=True)
class DecoderQuantization:
    """model.json "quantization" of an int8 decoder directory (`quantize` on a decoder)."""

    onednn_int8_ops: tuple[str, ...]  # the op types Paddle runs int8 (`enable_mkldnn_int8`)
    gate_passed: bool | None  # None until the gate ran
    record: dict = field(repr=False, compare=False)


@dataclass(frozen=True)
class DecoderModelInfo:
    path: Path
    name: str
    task: str  # 'generate'
    output: str  # 'tokens'
    architecture: dict = field(repr=False)  # convert.decoder.DecoderConfig.to_dict()
    max_seq_len: int  # prompt + new tokens a sequence may hold
    special: SpecialTokens
    add_bos_token: bool
    chat_template: str | None = field(repr=False)
    precision: str
    source_sha256: str
    checksum: str  # sha256 of decoder.pdiparams, recorded at conversion
    program_revision: int
    meta: dict = field(repr=False, compare=False)
    # model.json "gates": name (a precision, or "pruning") -> the generation gate's record against
    # the fp32 unpruned model (`convert/generation_gate.py`: "passed", "forced", the metrics).
    gates: dict = field(default_factory=dict, compare=False)
    # model.json "quantization": the int8 record of a quantised copy (`quantize` on a decoder).
    quantization: DecoderQuantization | None = None
    # Vocabulary-pruned models (`prune-vocab`): model.json "pruning" and the checked map of the
    # kept rows (model row -> full id); None for a full model.
    vocab_map: VocabMap | None = field(default=None, repr=False, compare=False)

    @property
    def is_pruned(self) -> bool:
        return self.vocab_map is not None

    def model_special_tokens(self) -> SpecialTokens:
        """The special tokens as the model's rows (what the decoding loop compares generated
        rows with): the same ids for a full model, mapped through the vocab map for a pruned one
        (which always keeps them)."""
        if self.vocab_map is None:
            return self.special
        row = lambda i: None if i is None else int(self.vocab_map.rows([i])[0])  # noqa: E731
        sp = self.special
        mapped = SpecialTokens(tuple(row(i) for i in sp.eos_token_ids), row(sp.pad_token_id), row(sp.bos_token_id),
                               row(sp.unk_token_id))
        assert -1 not in (*mapped.eos_token_ids, mapped.pad_token_id), (
            f"{self.path}: the pruned vocabulary lacks an EOS or pad token ({sp})")
        return mapped

    # Shapes the engine and the memory budget need, without importing the model module.
    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding and head (the kept rows of a pruned model)."""
        return int(self.architecture["vocab_size"])

    @property
    def num_hidden_layers(self) -> int:
        return int(self.architecture["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.architecture["hidden_size"])

    @property
    def num_key_value_heads(self) -> int:
        return int(self.architecture["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        a = self.architecture
        return int(a.get("head_dim") or a["hidden_size"] // a["num_attention_heads"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.architecture["max_position_embeddings"])

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def prefill_program(self) -> Path:
        return self.path / PREFILL_PROGRAM

    @property
    def decode_program(self) -> Path:
        return self.path / DECODE_PROGRAM

    @property
    def params_file(self) -> Path:
        return self.path / PARAMS_FILE


def parse_decoder_meta(path: Path, meta: dict) -> DecoderModelInfo:
    """model.json (already read) -> DecoderModelInfo; KeyError/TypeError/ValueError on a bad file."""
    version = meta.get("format_version")
    if version != DECODER_FORMAT_VERSION:
        raise ValueError(f"decoder format_version {version!r}, this version reads {DECODER_FORMAT_VERSION}")
    sp = meta["special_tokens"]
    eos = tuple(int(i) for i in sp["eos_token_ids"])
    if not eos:
        raise ValueError("special_tokens.eos_token_ids is empty: generation would never stop at an end token")
    return DecoderModelInfo(
        path=path, name=str(meta["name"]), task=str(meta["task"]), output=str(meta.get("output", "tokens")),
        architecture=dict(meta["architecture"]), max_seq_len=int(meta["max_seq_len"]),
        special=SpecialTokens(
            eos_token_ids=eos, pad_token_id=int(sp["pad_token_id"]),
            bos_token_id=None if sp.get("bos_token_id") is None else int(sp["bos_token_id"]),
            unk_token_id=None if sp.get("unk_token_id") is None else int(sp["unk_token_id"])),
        add_bos_token=bool(meta.get("add_bos_token", False)), chat_template=meta.get("chat_template"),
        precision=str(meta.get("precision", "fp32")), source_sha256=str(meta["source"]["sha256"]),
        checksum=str(meta.get("params_sha256", "")), program_revision=int(meta.get("program_revision", 1)),
        meta=meta, gates={str(k): dict(v) for k, v in (meta.get("gates") or {}).items()},
        vocab_map=_vocab_map(path, meta),
        quantization=_quantization(meta["quantization"]) if "quantization" in meta else None,
    )


def _quantization(q: dict) -> DecoderQuantization:
    gate = q.get("gate")
    return DecoderQuantization(onednn_int8_ops=tuple(q.get("onednn_int8_ops", ["fc"])),
                               gate_passed=None if gate is None else bool(gate["passed"]), record=q)


def _vocab_map(path: Path, meta: dict) -> VocabMap | None:
    """The checked vocab map of a pruned model (model.json "pruning"), None for a full one."""
    pruning = meta.get("pruning")
    if not pruning:
        return None
    return read_vocab_map(path / pruning["map_file"], pruning["map_sha256"], int(pruning["source_vocab_size"]),
                          int(meta["architecture"]["vocab_size"]))


def required_files(info: DecoderModelInfo) -> tuple[Path, ...]:
    return info.prefill_program, info.decode_program, info.params_file, info.tokenizer_file


def is_decoder_meta(meta: dict) -> bool:
    return meta.get("task") == GENERATE_TASK


def read_meta(path: Path) -> dict:
    return json.loads((path / "model.json").read_text(encoding="utf-8"))
