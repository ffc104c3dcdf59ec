"""gill_hf: GILL (Generating Images with multimodal Language models) on Hugging Face transformers and diffusers."""

import diffusers
from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_gill import GILLConfig
from .convert_original import convert_original_release
from .decision import Decision, decide, load_decision_head
from .generation_gill import (GeneratedImageSlot, GILLGenerateOutput, GILLImageLogitsProcessor,
                              ImageTokenFilterStreamer, image_conditioning)
from .hub import HubPushError, build_model_card, push_to_hub
from .modeling_gill import (GILLAdapter, GILLCausalLMOutputWithPast, GILLForConditionalGeneration, GILLOutput,
                            count_adapter_parameters)
from .pipeline_gill import GILLPipeline, GILLPipelineOutput, ImagePart
from .processing_gill import GILLProcessor
from .retrieval import RetrievalIndex
from .scoring import rank_images, score_continuations, sequence_log_likelihood
from .tiny import build_tiny_backbones

__version__ = "0.1.0"

AutoModel.register(GILLConfig, GILLForConditionalGeneration)
AutoModelForImageTextToText.register(GILLConfig, GILLForConditionalGeneration)
AutoProcessor.register(GILLConfig, GILLProcessor)
# diffusers has no registry: DiffusionPipeline.from_pretrained looks `_class_name` up on the diffusers module, and
# AutoPipelineForText2Image in its task mapping
diffusers.GILLPipeline = GILLPipeline
AUTO_TEXT2IMAGE_PIPELINES_MAPPING["gill"] = GILLPipeline

__all__ = [
    "Decision",
    "GILLAdapter",
    "GILLConfig",
    "GILLForConditionalGeneration",
    "GILLCausalLMOutputWithPast",
    "GILLGenerateOutput",
    "GILLImageLogitsProcessor",
    "GILLOutput",
    "GILLPipeline",
    "GILLPipelineOutput",
    "GILLProcessor",
    "GeneratedImageSlot",
    "HubPushError",
    "ImagePart",
    "ImageTokenFilterStreamer",
    "RetrievalIndex",
    "build_model_card",
    "build_tiny_backbones",
    "convert_original_release",
    "count_adapter_parameters",
    "decide",
    "image_conditioning",
    "load_decision_head",
    "push_to_hub",
    "rank_images",
    "score_continuations",
    "sequence_log_likelihood",
]
