"""The model-card API (`AutoModel`, `AutoTokenizer`, `load_image`, `dynamic_preprocess`; `chat`, `batch_chat`,
`generate`, `extract_feature`, `forward`) as thin calls into the engine. Nothing below this layer imports it."""
from ..preprocessing.cpu import dynamic_preprocess, load_image
from .auto import AutoModel, AutoTokenizer
from .chat_model import GenerateOutput, InternVLChat
from .generation_config import GenerationConfig

__all__ = ["AutoModel", "AutoTokenizer", "GenerateOutput", "GenerationConfig", "InternVLChat", "dynamic_preprocess",
           "load_image"]
