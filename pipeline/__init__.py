"""Batch scoring and ranking of text pairs with ERNIE-family encoders on Paddle Inference.

Import direction: reading, tokenizing, batching, ranking and writing never import paddle;
only `model`, `convert` and `predictor` do.
"""

__version__ = "0.1.0"
