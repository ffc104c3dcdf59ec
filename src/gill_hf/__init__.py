"""gill_hf: GILL (Generating Images with multimodal Language models) on Hugging Face transformers and diffusers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_gill import GILLConfig
from .modeling_gill import GILLAdapter, GILLForConditionalGeneration, GILLOutput, count_adapter_parameters
from .processing_gill import GILLProcessor
from .tiny import build_tiny_backbones

__version__ = "0.1.0"

AutoConfig.register("gill", GILLConfig)
AutoModel.register(GILLConfig, GILLForConditionalGeneration)
AutoModelForImageTextToText.register(GILLConfig, GILLForConditionalGeneration)
AutoProcessor.register(GILLConfig, GILLProcessor)

__all__ = [
    "GILLAdapter",
    "GILLConfig",
    "GILLForConditionalGeneration",
    "GILLOutput",
    "GILLProcessor",
    "build_tiny_backbones",
    "count_adapter_parameters",
]
