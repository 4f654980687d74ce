"""A padded `generate` batch -> one engine request per row, and the engine's outputs -> what transformers returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..engine.llm import LLM
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams


@dataclass
class GenerateOutput:
    """`generate(..., return_dict_in_generate=True)`, as transformers' GenerateDecoderOnlyOutput."""

    sequences: torch.Tensor  # [batch, longest output] int64, rows that stopped early padded with pad_token_id
    # With output_logits: one [batch, vocab] float32 tensor per step, the logits each token was sampled from
    # (NaN in the rows that had already stopped: the engine computes nothing more for them).
    logits: tuple[torch.Tensor, ...] | None = None


def left_padding(attention_mask: torch.Tensor) -> list[int]:
    """attention_mask [batch, seq] -> each row's count of leading padding; refuses padding elsewhere."""
    pads = []
    for row in attention_mask.bool().tolist():
        pad = row.index(True) if True in row else len(row)
        if pad == len(row) or not all(row[pad:]):
            raise ValueError("generate needs left-padded rows with at least one real token (set "
                             "tokenizer.padding_side = 'left', as batch_chat does)")
        pads.append(pad)
    return pads


def images_per_row(rows: list[list[int]], context_id: int, num_image_token: int, pixel_values: torch.Tensor | None,
                   visual_features: torch.Tensor | None, num_patches_list: Sequence[int] | None
                   ) -> list[dict[str, list[torch.Tensor]]]:
    """Split the batch's tiles (or features [tiles, 256, hidden]) into images, in order, and hand each row the
    images its `<IMG_CONTEXT>` tokens hold: the request fields "pixel_values" or "image_features" of that row.

    num_patches_list: tiles per image; None: one image per run of `<IMG_CONTEXT>` tokens (the official
    `generate` fills all of them in order, so only the per-row split matters)."""
    source = visual_features if visual_features is not None else pixel_values
    if source is None:
        return [{} for _ in rows]
    per_row = [sum(1 for token in ids if token == context_id) // num_image_token for ids in rows]
    if num_patches_list is None:
        num_patches_list = []
        for ids in rows:
            run = 0
            for token in ids + [None]:
                if token == context_id:
                    run += 1
                elif run:
                    num_patches_list.append(run // num_image_token)
                    run = 0
    tiles = [n for n in num_patches_list if n > 0]
    if sum(tiles) != source.shape[0]:
        raise ValueError(f"the images have {sum(tiles)} tiles (num_patches_list) but "
                         f"{'visual_features' if visual_features is not None else 'pixel_values'} holds "
                         f"{source.shape[0]}")
    images = list(torch.split(source, tiles))
    key = "image_features" if visual_features is not None else "pixel_values"
    out = []
    for row_tiles in per_row:
        mine, taken = [], 0
        while images and taken < row_tiles:
            image = images.pop(0)
            taken += image.shape[0]
            mine.append(image.reshape(-1, image.shape[-1]) if visual_features is not None else image)
        if taken != row_tiles:
            raise ValueError(f"a row's prompt holds {row_tiles} tiles of <IMG_CONTEXT> tokens but its images "
                             f"give {taken} (an image cannot span two rows)")
        out.append({key: mine} if mine else {})
    return out


def run_rows(llm: LLM, requests: list[dict[str, Any]], params: SamplingParams) -> list[RequestOutput]:
    """Submit the rows, step the engine until all of them finished; outputs in row order."""
    ids = [llm.submit(llm.prepare(request, params)) for request in requests]
    pending, results = set(ids), {}
    try:
        while pending:
            for output in llm.step():
                if output.request_id in pending:
                    pending.discard(output.request_id)
                    results[output.request_id] = output
    except BaseException:
        for request_id in pending:
            llm.abort(request_id)
        raise
    failed = [results[i].error for i in ids if results[i].finish_reason == "error"]
    if failed:
        raise RuntimeError(f"generation failed: {failed[0]}")
    return [results[i] for i in ids]


def transformers_output(outputs: Sequence[RequestOutput], pad_id: int, device: torch.device,
                        as_dict: bool) -> torch.Tensor | GenerateOutput:
    """Rows' tokens padded with pad_id [batch, longest] (and each step's logits) as transformers returns them."""
    longest = max(len(output.token_ids) for output in outputs)
    sequences = torch.full((len(outputs), longest), pad_id, dtype=torch.long)
    for row, output in enumerate(outputs):
        sequences[row, : len(output.token_ids)] = torch.tensor(output.token_ids, dtype=torch.long)
    sequences = sequences.to(device)
    if not as_dict:
        return sequences
    logits = None
    if outputs[0].logits is not None:
        steps = torch.full((longest, len(outputs), outputs[0].logits.shape[-1]), float("nan"))
        for row, output in enumerate(outputs):
            steps[: output.logits.shape[0], row] = output.logits
        logits = tuple(steps.to(device).unbind(0))
    return GenerateOutput(sequences, logits)
