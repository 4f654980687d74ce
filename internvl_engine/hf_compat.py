"""Drop-in replacements for the model-card usage: `AutoModel`, `AutoTokenizer`, `chat`, `batch_chat`.

A script written for `transformers` + remote code runs unchanged after swapping its imports:

    model = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                      trust_remote_code=True).eval().cuda()
    response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                                   history=None, return_history=True)
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .generation import generate
from .loader import load_model
from .models.internvl_chat import InternVLChatModel
from .prompt import (IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, get_template, prepare_batch_queries,
                     prepare_chat_query)
from .sampler import GenerationConfig
from .tokenizer import InternLM2Tokenizer


class PromptTooLongError(ValueError):
    """The prompt (with its image tokens) does not fit the model's context."""


class InternVLChat(InternVLChatModel):
    """The model plus the official conversational API (`chat`, `batch_chat`, `generate`)."""

    max_context_override: int | None = None

    @property
    def max_context_length(self) -> int:
        """Longest sequence served: max_position_embeddings, times the rope scaling factor when scaled.

        Assign `model.max_context_length = n` to serve less (for example to bound memory)."""
        if self.max_context_override is not None:
            return self.max_context_override
        llm = self.config.llm
        factor = llm.rope_scaling.factor if llm.rope_scaling is not None else 1.0
        return int(llm.max_position_embeddings * max(factor, 1.0))

    @max_context_length.setter
    def max_context_length(self, value: int) -> None:
        if value < 2:
            raise ValueError(f"max_context_length must be >= 2, got {value}")
        self.max_context_override = int(value)

    def _system_message(self) -> str:
        template = get_template(self.template or "internlm2-chat")
        return self.system_message if self.system_message is not None else template.system_message

    def _check_pixel_values(self, pixel_values: torch.Tensor | None, num_patches_list: Sequence[int]) -> None:
        if pixel_values is None:
            return
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a [tiles, 3, H, W] tensor (from load_image)")
        if sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list {list(num_patches_list)} sums to {sum(num_patches_list)} tiles "
                             f"but pixel_values holds {pixel_values.shape[0]}")

    def _run(self, tokenizer: InternLM2Tokenizer, queries: list[str], pixel_values: torch.Tensor | None,
             generation_config: Mapping[str, Any] | GenerationConfig | None, stop_token: str) -> list[str]:
        cfg = (generation_config if isinstance(generation_config, GenerationConfig)
               else GenerationConfig.from_mapping(generation_config))
        inputs = tokenizer(queries, return_tensors="pt", padding=len(queries) > 1)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        limit = self.max_context_length
        prompt_len = input_ids.shape[1]
        if prompt_len >= limit:
            raise PromptTooLongError(f"the prompt has {prompt_len} tokens (images included) but the model's "
                                     f"context is {limit} tokens; use fewer tiles (max_num) or a shorter prompt")
        if prompt_len + cfg.max_new_tokens > limit:
            cfg = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": limit - prompt_len})
        vit_embeds = self.extract_feature(pixel_values) if pixel_values is not None else None
        embeds = self.embed_inputs(input_ids, vit_embeds)
        stop_id = tokenizer.convert_tokens_to_ids(stop_token)
        stop_ids = {stop_id, tokenizer.eos_token_id}
        result = generate(self, embeds, attention_mask, cfg, stop_ids, pad_id=tokenizer.pad_token_id,
                          bos_id=tokenizer.bos_token_id)
        texts = tokenizer.batch_decode(result.sequences, skip_special_tokens=True)
        return [text.split(stop_token)[0].strip() for text in texts]

    @torch.inference_mode()
    def chat(self, tokenizer: InternLM2Tokenizer, pixel_values: torch.Tensor | None, question: str,
             generation_config: Mapping[str, Any] | None, history: list | None = None,
             return_history: bool = False, num_patches_list: Sequence[int] | None = None,
             IMG_START_TOKEN: str = IMG_START_TOKEN, IMG_END_TOKEN: str = IMG_END_TOKEN,
             IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False):
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        self._check_pixel_values(pixel_values, num_patches_list)
        template = get_template(self.template or "internlm2-chat")
        query, question = prepare_chat_query(template.name, question, history, num_patches_list,
                                             system_message=self._system_message(),
                                             num_image_token=self.num_image_token,
                                             has_images=pixel_values is not None)
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN, "").replace(f"{IMG_START_TOKEN}{IMG_END_TOKEN}", "<image>"))
        response = self._run(tokenizer, [query], pixel_values, generation_config, template.stop_token)[0]
        history = [] if history is None else list(history)
        history.append((question, response))
        return (response, history) if return_history else response

    @torch.inference_mode()
    def batch_chat(self, tokenizer: InternLM2Tokenizer, pixel_values: torch.Tensor | None,
                   questions: Sequence[str], generation_config: Mapping[str, Any] | None,
                   num_patches_list: Sequence[int] | None = None, history: list | None = None,
                   return_history: bool = False, IMG_START_TOKEN: str = IMG_START_TOKEN,
                   IMG_END_TOKEN: str = IMG_END_TOKEN, IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
                   verbose: bool = False, image_counts: Sequence[int] | None = None) -> list[str]:
        if history is not None or return_history:
            raise ValueError("multi-turn chat (history / return_history) is not supported in batch_chat")
        if image_counts is not None:
            warnings.warn("`image_counts` is deprecated; use `num_patches_list`", DeprecationWarning, stacklevel=2)
            num_patches_list = image_counts
        if not questions:
            raise ValueError("batch_chat needs at least one question")
        if num_patches_list is None:
            if pixel_values is not None:
                raise ValueError("batch_chat with pixel_values needs num_patches_list (tiles per question)")
            num_patches_list = [0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise ValueError(f"num_patches_list has {len(num_patches_list)} entries for {len(questions)} questions")
        self._check_pixel_values(pixel_values, num_patches_list)
        template = get_template(self.template or "internlm2-chat")
        queries = prepare_batch_queries(template.name, list(questions), list(num_patches_list),
                                        has_images=pixel_values is not None,
                                        system_message=self._system_message(),
                                        num_image_token=self.num_image_token)
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            return self._run(tokenizer, queries, pixel_values, generation_config, template.stop_token)
        finally:
            tokenizer.padding_side = previous_side


class AutoModel:
    """`AutoModel.from_pretrained(path, torch_dtype=..., device=None, backend="auto", **ignored_hf_kwargs)`."""

    _IGNORED = {"low_cpu_mem_usage", "trust_remote_code", "use_flash_attn", "load_in_8bit", "device_map",
                "revision", "local_files_only", "attn_implementation"}

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, progress: bool | None = None,
                        backend: str = "auto", **kwargs: Any) -> InternVLChat:
        """backend: "torch" (reference path), "triton" (kernels) or "auto" (triton on CUDA, torch on CPU)."""
        unknown = set(kwargs) - cls._IGNORED
        if unknown:
            warnings.warn(f"AutoModel.from_pretrained ignores {sorted(unknown)}", stacklevel=2)
        if kwargs.get("load_in_8bit"):
            raise ValueError("load_in_8bit is not supported yet; load in bfloat16 or float16")
        model = load_model(path, dtype=torch_dtype, device=device, progress=progress, model_class=InternVLChat)
        return model.set_backend(backend)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)`."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **ignored: Any) -> InternLM2Tokenizer:
        return InternLM2Tokenizer.from_pretrained(path)
