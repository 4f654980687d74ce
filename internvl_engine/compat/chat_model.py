"""`InternVLChat`: the model with the official model-card API, each call a thin layer over the engine.

A script written for `transformers` + remote code runs unchanged after swapping its imports:

    model = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                      trust_remote_code=True).eval().cuda()
    response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                                   history=None, return_history=True)

`chat` and `batch_chat` build the query and tokenise it as the official code does, then call `generate`, which
submits one engine request per row (scheduler, paged KV cache, batched sampler, kernels, CUDA graphs) and waits
for them. The official batch semantics are request options: a row's left padding (the padded length that
dynamic-NTK rotary sees), the repetition penalty over the BOS that `generate` seeds plus the outputs, and one
random stream for the whole batch. The engine is built on first use, sized for the call, and kept (with its
prefix cache) until the model moves to another device or dtype or a call needs more KV blocks.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..engine.errors import PromptTooLongError
from ..engine.llm import LLM
from ..models.internvl_chat import InternVLChatModel
from ..text.templates import (IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, get_template, prepare_batch_queries,
                              prepare_chat_query)
from ..text.llama_tokenizer import Tokenizer, load_tokenizer
from ..worker.attention import MaskedAttention
from .generation_config import GenerationConfig
from .rows import GenerateOutput, images_per_row, left_padding, run_rows, transformers_output

_BLOCK_SIZE = 16
_MIN_BLOCKS = 64


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [batch, seq, vocab] float32
    hidden_states: list[torch.Tensor] | None = None


class InternVLChat(InternVLChatModel):
    """The model plus the official conversational API (`chat`, `batch_chat`, `generate`, `forward`).

    `engine_options` (a dict of `LLM` options, e.g. max_num_batched_tokens or static_decode) tunes the engine
    these calls run on; the KV cache is sized from each call's needs unless it gives kv_cache_bytes.
    """

    max_context_override: int | None = None
    name_or_path: str | None = None  # the checkpoint folder, as transformers' `name_or_path`
    engine_options: Mapping[str, Any] = {}
    _llm: LLM | None = None
    _llm_key: tuple | None = None

    @property
    def max_context_length(self) -> int:
        """Longest sequence served: max_position_embeddings, times the rope scaling factor when scaled.

        Assign `model.max_context_length = n` to serve less (for example to bound memory), or more: the official
        code has no limit of its own (a tiny test checkpoint may be configured below its longest prompt)."""
        if self.max_context_override is not None:
            return self.max_context_override
        return self.config.llm.max_context_length

    @max_context_length.setter
    def max_context_length(self, value: int) -> None:
        if value < 2:
            raise ValueError(f"max_context_length must be >= 2, got {value}")
        self.max_context_override = int(value)

    def engine(self, tokenizer: Tokenizer, num_tokens: Sequence[int] = ()) -> LLM:
        """The engine the model-card calls run on, (re)built when the model moved or `num_tokens` (tokens per
        row of the coming call) need more KV blocks than it has."""
        options = dict(self.engine_options)
        block_size = options.setdefault("block_size", _BLOCK_SIZE)
        blocks = sum(-(-n // block_size) for n in num_tokens)
        key = (self.device, self.dtype, self.resolved_backend(), self.max_context_length, tuple(sorted(options.items())))
        llm = self._llm
        if llm is None or self._llm_key != key or llm.block_manager.num_blocks < blocks:
            if "kv_cache_bytes" not in options:
                held = llm.block_manager.num_blocks if llm is not None and self._llm_key == key else 0
                wanted = max(blocks, 2 * held, _MIN_BLOCKS) + 1  # + the static decode's scratch block
                options["kv_cache_bytes"] = wanted * LLM.kv_cache_bytes_per_block(self, block_size)
                # the engine refuses a max_model_len its cache cannot hold; this call's rows fit in what it holds
                options.setdefault("max_model_len", min(self.max_context_length, (wanted - 1) * block_size))
            # the official chat has no image-count limit (a video's 32 frames are 32 images)
            options = {"max_num_seqs": 256, "max_waiting": 1 << 30, "max_images_per_request": None,
                       "max_model_len": self.max_context_length, **options}
            self._llm = None  # free the old cache before allocating the new one
            self._llm = llm = LLM.from_model(self, tokenizer, **options)
            self._llm_key = key
        return llm

    @staticmethod
    def _check_pixel_values(pixel_values: torch.Tensor | None, num_patches_list: Sequence[int]) -> None:
        if pixel_values is None:
            return
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a [tiles, 3, H, W] tensor (from load_image)")
        if sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list {list(num_patches_list)} sums to {sum(num_patches_list)} tiles "
                             f"but pixel_values holds {pixel_values.shape[0]}")

    # ---- generation ----
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, visual_features: torch.Tensor | None = None,
                 generation_config: Mapping[str, Any] | GenerationConfig | None = None,
                 num_patches_list: Sequence[int] | None = None, tokenizer: Tokenizer | None = None,
                 **generate_kwargs: Any) -> torch.Tensor | GenerateOutput:
        """The official `generate`: input_ids [batch, seq] (left padded), the tiles of every image in order ->
        generated ids [batch, new] (stop token included, then pad_token_id), as transformers returns them.

        Every `<IMG_CONTEXT>` run is filled, in order, by the images' visual tokens (`num_patches_list` tiles
        per image; by default one image per run), or by `visual_features` [tiles, 256, hidden] without the
        ViT. `output_logits=True, return_dict_in_generate=True` also returns each step's logits.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        options = {} if generation_config is None else (
            dataclasses.asdict(generation_config) if isinstance(generation_config, GenerationConfig)
            else dict(generation_config))
        options.update(generate_kwargs)
        output_logits = bool(options.pop("output_logits", False))
        as_dict = bool(options.pop("return_dict_in_generate", False))
        cfg = GenerationConfig.from_mapping(options)
        input_ids = torch.as_tensor(input_ids)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pads = left_padding(torch.as_tensor(attention_mask))
        padded_length = input_ids.shape[1]
        limit = self.max_context_length
        if padded_length >= limit:
            raise PromptTooLongError(f"the prompt has {padded_length} tokens (images included) but the model's "
                                     f"context is {limit} tokens; use fewer tiles (max_num) or a shorter prompt")
        max_tokens = min(cfg.max_new_tokens, limit - padded_length)
        rows = [ids[pad:] for ids, pad in zip(input_ids.tolist(), pads)]
        images = images_per_row(rows, self.img_context_token_id, self.num_image_token, pixel_values, visual_features,
                                num_patches_list)
        llm = self.engine(tokenizer or self._llm_tokenizer(), [len(ids) + max_tokens for ids in rows])
        generator = None
        if cfg.do_sample and cfg.seed is not None:  # one stream for the whole batch, as the official batched draw
            generator = torch.Generator(device=self.device)
            generator.manual_seed(cfg.seed)
        params = cfg.sampling_params(max_tokens, cfg.stop_token_ids(self.config.llm.eos_token_id),
                                     self.config.llm.bos_token_id, generator, self.config.llm.vocab_size,
                                     return_logits=output_logits)
        outputs = run_rows(llm, [{"prompt_token_ids": ids, "left_padding": pad, **row_images}
                                 for ids, pad, row_images in zip(rows, pads, images)], params)
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else self.config.llm.pad_token_id
        return transformers_output(outputs, pad_id, self.device, as_dict)

    def _llm_tokenizer(self) -> Tokenizer:
        """The engine's tokenizer (only its text outputs use it): the one already in use, else the checkpoint's."""
        if self._llm is not None:
            return self._llm.tokenizer
        if self.name_or_path is None:
            raise ValueError("generate needs tokenizer=... (this model was not loaded from a checkpoint folder)")
        return load_tokenizer(self.name_or_path)

    # ---- the model card's calls ----
    def chat(self, tokenizer: Tokenizer, pixel_values: torch.Tensor | None, question: str,
             generation_config: Mapping[str, Any] | GenerationConfig | None, history: list | None = None,
             return_history: bool = False, num_patches_list: Sequence[int] | None = None,
             IMG_START_TOKEN: str = IMG_START_TOKEN, IMG_END_TOKEN: str = IMG_END_TOKEN,
             IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False):
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        self._check_pixel_values(pixel_values, num_patches_list)
        template = get_template(self.template or "internlm2-chat")
        query, question = prepare_chat_query(template.name, question, history, num_patches_list,
                                             system_message=self._system_message(template),
                                             num_image_token=self.num_image_token,
                                             has_images=pixel_values is not None)
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN, "").replace(f"{IMG_START_TOKEN}{IMG_END_TOKEN}", "<image>"))
        inputs = tokenizer(query, return_tensors="pt")
        response = self._respond(tokenizer, inputs, pixel_values, num_patches_list, generation_config,
                                 template.stop_token)[0]
        history = [] if history is None else list(history)
        history.append((question, response))
        return (response, history) if return_history else response

    def batch_chat(self, tokenizer: Tokenizer, pixel_values: torch.Tensor | None,
                   questions: Sequence[str], generation_config: Mapping[str, Any] | GenerationConfig | None,
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
                                        system_message=self._system_message(template),
                                        num_image_token=self.num_image_token)
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = previous_side
        return self._respond(tokenizer, inputs, pixel_values, num_patches_list, generation_config,
                             template.stop_token)

    def _system_message(self, template) -> str:
        return self.system_message if self.system_message is not None else template.system_message

    def _respond(self, tokenizer: Tokenizer, inputs: Mapping[str, torch.Tensor],
                 pixel_values: torch.Tensor | None, num_patches_list: Sequence[int],
                 generation_config: Mapping[str, Any] | GenerationConfig | None, stop_token: str) -> list[str]:
        """As the official code: generate with the template separator as eos, decode, cut at it, strip."""
        cfg = GenerationConfig.from_mapping(generation_config)
        cfg = dataclasses.replace(cfg, eos_token_id=tokenizer.convert_tokens_to_ids(stop_token))
        sequences = self.generate(pixel_values, inputs["input_ids"], inputs["attention_mask"], generation_config=cfg,
                                  num_patches_list=num_patches_list if pixel_values is not None else None,
                                  tokenizer=tokenizer)
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [text.split(stop_token)[0].strip() for text in texts]

    # ---- teacher forcing ----
    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, image_flags: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                **ignored) -> CausalLMOutput:
        """One full forward as the official `forward`: logits [batch, seq, vocab] for every position.

        image_flags [tiles] (or [tiles, 1]) marks real tiles (1) versus padding tiles (0). Positions default
        to 0..seq-1 as in the official forward; `attention_mask` [batch, seq] masks padded keys.
        """
        input_ids = torch.as_tensor(input_ids).to(self.device)
        batch, seq = input_ids.shape
        vit_embeds = None
        if pixel_values is not None:
            vit_embeds = self.extract_feature(pixel_values)
            if image_flags is not None:
                keep = image_flags.reshape(-1).to(self.device) == 1
                vit_embeds = vit_embeds[keep]
        embeds = self.embed_inputs(input_ids, vit_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.bool, device=self.device)
        if position_ids is None:
            position_ids = torch.arange(seq, device=self.device).expand(batch, seq)
        result = self.language_model(embeds, position_ids.to(self.device),
                                     MaskedAttention(attention_mask.to(self.device),
                                                     sliding_window=self.config.llm.sliding_window), [seq] * batch,
                                     output_hidden_states=output_hidden_states)
        hidden, states = result if output_hidden_states else (result, None)
        return CausalLMOutput(logits=self.language_model.logits(hidden), hidden_states=states)
