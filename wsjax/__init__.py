"""wsjax: weight-streaming training of GPT-J / GPT-2 / GPT-3 in JAX.

    import wsjax
    cfg = wsjax.load_config("configs/params_gptj_6B.yaml")
    wsjax.get_model(cfg.model).num_params()          # 6,050,882,784, nothing allocated

The engine (``wsjax.streaming.StreamingEngine``), the run (``wsjax.train.run``) and the
HuggingFace interop (``wsjax.hf``) are imported from their modules.
"""

from wsjax.config import Config, config_from_dict, load_config
from wsjax.errors import WsjaxError
from wsjax.models import get_model

__all__ = ["Config", "WsjaxError", "config_from_dict", "get_model", "load_config"]
__version__ = "0.1.0"
