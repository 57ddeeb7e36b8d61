"""A decoder checkpoint in the decoder's terms, whatever file layout it came from.

`read_decoder_checkpoint(src)` picks the reader from the layout:
- a `.gguf` file -> `gguf_checkpoint.read_gguf` (llama.cpp's one-file format);
- a directory with `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`) -> `hf_decoder.read_hf_decoder` (Hugging Face `llama`,
  `ernie4_5`).
Both return a `DecoderCheckpoint`: a `DecoderConfig`, fp32 weights in `DecoderForCausalLM`'s
names and layout (Linear [in, out]), the tokenizer, special token ids and the chat template.

Numpy only at import; the readers import what they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.convert.errors import ConversionError

ARCHITECTURES = ("llama", "ernie4_5")


@dataclass
class DecoderCheckpoint:
    """What a decoder checkpoint holds, in the decoder's terms."""

    path: Path  # the file or directory it was read from
    name: str
    config: Any  # decoder.DecoderConfig
    weights: dict[str, np.ndarray]  # decoder.DecoderForCausalLM names, fp32, Linear [in, out]
    tokenizer: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, Optional[int]]  # bos/eos/pad/unk token ids (eos: the first one)
    add_bos_token: bool
    add_eos_token: bool
    chat_template: Optional[str]
    quant_types: dict[str, int] = field(default_factory=dict)  # stored type name -> tensor count
    architecture: str = "llama"  # 'llama' | 'ernie4_5'
    source_files: list[Path] = field(default_factory=list)  # whose sha256 identifies the source
    eos_token_ids: tuple[int, ...] = ()  # every id that ends generation; default: (eos_token_id,)

    def __post_init__(self) -> None:
        if not self.eos_token_ids and self.special_tokens.get("eos_token_id") is not None:
            self.eos_token_ids = (int(self.special_tokens["eos_token_id"]),)
        self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)
        if not self.source_files:
            self.source_files = [self.path] if self.path.is_file() else []


def read_decoder_checkpoint(src: Path | str, with_weights: bool = True) -> DecoderCheckpoint:
    """Read a GGUF file or a Hugging Face decoder directory; refuse anything else, saying why."""
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        from pipeline.convert.gguf_checkpoint import read_gguf

        return read_gguf(src, with_weights=with_weights)
    if src.is_dir() and (src / "config.json").is_file() and (
            (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file()):
        from pipeline.convert.hf_decoder import read_hf_decoder

        return read_hf_decoder(src, with_weights=with_weights)
    expected = ("a .gguf file, or a Hugging Face decoder directory with config.json and "
                "model.safetensors (or a sharded model.safetensors.index.json)")
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory; expected {expected}")
    if src.is_dir():
        have = sorted(p.name for p in src.iterdir())[:10]
        raise ConversionError(f"{src}: not a decoder checkpoint (it holds {have}); expected {expected}")
    raise ConversionError(f"{src}: not a decoder checkpoint; expected {expected}")
