"""Converters: encoder checkpoint -> runtime model directory (`encoder`), decoder checkpoint
(GGUF file or Hugging Face directory) -> generation runtime directory (`decoder_convert`), and
runtime directory -> derived runtime directory (`prune`: smaller vocabulary, `quantize`: int8).
Separate from the runtime (`pipeline.engine`), which only loads what these write. paddle is
imported here and in the engine alone."""

from pipeline.convert.decoder_convert import convert_decoder, ensure_decoder_converted, is_decoder_source
from pipeline.convert.encoder import convert, ensure_converted
from pipeline.convert.errors import ConversionError

__all__ = ["ConversionError", "convert", "convert_decoder", "ensure_converted", "ensure_decoder_converted",
           "is_decoder_source"]
