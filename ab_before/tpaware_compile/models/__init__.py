from .decoder import Decoder, DecoderConfig, Parallel  # noqa: F401
from .random import random_weights  # noqa: F401
