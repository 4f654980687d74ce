"""Chat templates and image-placeholder expansion, building the exact text the official `chat`/`batch_chat` feed
to the tokenizer.

InternVL 1.5/2 use MPT-style templates only (official `conversation.py`): the system block, then for every message
`role + text + sep`, and a bare role for the turn the model must answer. A falsy message (None or '') renders as
the bare role, as upstream does. Images enter the prompt as `<image>` placeholders that are replaced, in order,
by `<img>` + `<IMG_CONTEXT>` x (256 per tile) + `</img>`; the model later swaps the context tokens for ViT features.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Sequence

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

# Default system message of the InternVL 1.5 / 2 templates (official conversation.py).
INTERNVL_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# The one InternVL 2.5 ships with.
INTERNVL2_5_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                              "多模态大语言模型。")
# What older InternVL-Chat-V1-5 remote code set as `model.system_message` (InternLM2's own chat prompt).
LEGACY_INTERNLM2_SYSTEM_MESSAGE = "You are an AI assistant whose name is InternLM (书生·浦语)."

History = Sequence[Sequence[str]]


@dataclass(frozen=True)
class ConversationTemplate:
    """One MPT-style template; immutable, so a prompt never leaks state into the next one."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    stop_str: str | None = None

    @property
    def stop_token(self) -> str:
        """The token that ends an answer: the official code uses `sep.strip()` as eos and to cut the response."""
        return self.sep.strip()

    def render(self, messages: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        """Join the system block and (role, message) pairs; a falsy message leaves the role open."""
        system = self.system_message if system_message is None else system_message
        text = self.system_template.format(system_message=system) + self.sep
        for role, message in messages:
            text += role + message + self.sep if message else role
        return text


def _chatml(name: str, system_message: str, sep: str = "<|im_end|>", stop_str: str | None = None
            ) -> ConversationTemplate:
    return ConversationTemplate(name=name, system_template="<|im_start|>system\n{system_message}",
                                system_message=system_message,
                                roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep=sep, stop_str=stop_str)


TEMPLATES = MappingProxyType({
    "Hermes-2": _chatml("Hermes-2", INTERNVL_SYSTEM_MESSAGE, stop_str="<|endoftext|>"),
    "internlm2-chat": _chatml("internlm2-chat", INTERNVL_SYSTEM_MESSAGE),
    "phi3-chat": ConversationTemplate(name="phi3-chat", system_template="<|system|>\n{system_message}",
                                      system_message=INTERNVL_SYSTEM_MESSAGE, roles=("<|user|>\n", "<|assistant|>\n"),
                                      sep="<|end|>"),
    "internvl2_5": _chatml("internvl2_5", INTERNVL2_5_SYSTEM_MESSAGE, sep="<|im_end|>\n"),
})


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """Look a template up by the name stored in the checkpoint's config (`template`)."""
    if isinstance(name, ConversationTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def build_prompt(template: str | ConversationTemplate, question: str | None, history: History | None = None,
                 system_message: str | None = None) -> str:
    """The official `chat()` query: past (question, answer) turns, the new question, then the open assistant role.

    question None: no new user turn, the assistant role opens right after the history (a system-only
    conversation, or one ending with the assistant's message)."""
    conv = get_template(template)
    user, assistant = conv.roles
    messages: list[tuple[str, str | None]] = []
    for turn in history or ():
        if len(turn) != 2:
            raise ValueError(f"each history entry must be a (question, answer) pair, got {turn!r}")
        messages += [(user, turn[0]), (assistant, turn[1])]
    if question is not None:
        messages.append((user, question))
    messages.append((assistant, None))
    return conv.render(messages, system_message)


def image_tokens(num_tiles: int, num_image_token: int = 256) -> str:
    """The text that stands for one image of `num_tiles` tiles."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def expand_image_placeholders(query: str, num_patches_list: Sequence[int], num_image_token: int = 256) -> str:
    """Replace each `<image>` in order by its image's tokens; a count mismatch would silently misalign features
    upstream, so it is an error here."""
    tags = query.count(IMAGE_PLACEHOLDER)
    if tags != len(num_patches_list):
        raise ValueError(f"the prompt has {tags} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_patches_list)} "
                         f"image(s) were given (num_patches_list={list(num_patches_list)}); use one "
                         f"{IMAGE_PLACEHOLDER} per image")
    bad = [n for n in num_patches_list if int(n) < 1]
    if bad:
        raise ValueError(f"every image needs at least one tile; num_patches_list={list(num_patches_list)}")
    if num_image_token < 1:
        raise ValueError(f"num_image_token must be >= 1, got {num_image_token}")
    pieces = query.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for tiles, piece in zip(num_patches_list, pieces[1:]):
        out += [image_tokens(int(tiles), num_image_token), piece]
    return "".join(out)


def prepare_chat_query(template_name: str | ConversationTemplate, question: str, history: History | None,
                       num_patches_list: Sequence[int], system_message: str | None = None,
                       num_image_token: int = 256, has_images: bool | None = None) -> tuple[str, str]:
    """What official `chat()` does before tokenizing. Returns (expanded query, question as recorded in history).

    A first turn with images but no `<image>` tag gets `<image>\\n` prepended (only when `history is None`, as
    upstream). `has_images` defaults to "num_patches_list is not empty"."""
    images = bool(num_patches_list) if has_images is None else has_images
    if history is None and images and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    query = build_prompt(template_name, question, history, system_message)
    return expand_image_placeholders(query, num_patches_list, num_image_token), question


def prepare_batch_queries(template_name: str | ConversationTemplate, questions: Sequence[str],
                          num_patches_list: Sequence[int], has_images: bool = True,
                          system_message: str | None = None, num_image_token: int = 256) -> list[str]:
    """What official `batch_chat()` does: one image (of `num_patches_list[i]` tiles) per question, `<image>\\n`
    prepended where the question has no tag. Without images a question must not contain `<image>`."""
    if len(questions) != len(num_patches_list):
        raise ValueError(f"num_patches_list has {len(num_patches_list)} entries for {len(questions)} questions")
    queries = []
    for question, tiles in zip(questions, num_patches_list):
        if has_images and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        query = build_prompt(template_name, question, None, system_message)
        queries.append(expand_image_placeholders(query, [tiles] if has_images else [], num_image_token))
    return queries
