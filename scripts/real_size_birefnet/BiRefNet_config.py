"""The config class of Strata's real-size BiRefNet-class stand-in (random weights).

Like the published repos' ``BiRefNet_config.py``: a PretrainedConfig that holds only
``bb_pretrained``; the architecture lives in the model module's plain ``Config``.
"""

from transformers import PretrainedConfig


class BiRefNetConfig(PretrainedConfig):
    """What config.json carries: whether to load a pretrained backbone (never, here)."""

    model_type = "strata_real_size_birefnet"

    def __init__(self, bb_pretrained=False, **kwargs):
        self.bb_pretrained = bb_pretrained
        super().__init__(**kwargs)
