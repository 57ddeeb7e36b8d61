"""Converters: checkpoint -> runtime model directory (`encoder`), and runtime directory ->
derived runtime directory (`prune`: smaller vocabulary, `quantize`: int8). Separate from the
runtime (`pipeline.engine`), which only loads what these write. paddle is imported here and in
the engine alone."""

from pipeline.convert.encoder import convert, ensure_converted
from pipeline.convert.errors import ConversionError

__all__ = ["ConversionError", "convert", "ensure_converted"]
