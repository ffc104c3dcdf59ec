"""Chat templates for GILLProcessor and the message flattening that lets any text-only LLM template render images.

Before a template runs, each message's ``content`` list becomes one string: text parts verbatim, each image part
replaced by ``<|image|>`` (which the processor expands to k placeholder ids and pairs with that image's pixels).
So an LLM tokenizer's own template (Llama-3, Qwen, ...) renders the roles, and images land where they were.

Built-in templates (select with ``chat_template="gill"`` / ``"minigpt5"``):

``gill`` (the default for tokenizers without a template), the FROMAGe / GILL dialogue format::

    {system}\\n\\nQ: {user}\\nA: {assistant}\\nQ: {user}\\nA:        <- "A:" is the generation prompt

``minigpt5``, MiniGPT-5's (Vicuna v0) format, images wrapped as ``<Img><|image|></Img>``::

    {system}###Human: {user} ###Assistant: {assistant} ###Human: {user} ###Assistant:

MiniGPT-5 ends every answer with ``###``, which is also its stop string; here the next ``###Human:`` supplies it.
This is the form of MiniGPT-5's CC3M instruction prompts (``{system}###Human: {command} {caption} ###Assistant:``).
Its stage-2 data spaces the turns differently, so the VIST and MMDialog prompts are built by
:func:`minigpt5_story_prompt` / :func:`minigpt5_dialogue_prompt`, string for string as MiniGPT-5's data loader
writes them (``<Img><|image|></Img>`` where it writes ``<Img><ImageHere></Img>``), and answers by
:func:`minigpt5_target`.
"""

from .image_io import IMAGE_PART_KEYS, IMAGE_TYPES

IMAGE_TOKEN = "<|image|>"

GILL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Q: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'A: ' + message['content'] + '\\n' }}"
    "{%- else -%}{{ raise_exception('the GILL chat template knows the roles system, user and assistant, not '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}"
)

MINIGPT5_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] | replace('<|image|>', '<Img><|image|></Img>') -%}"
    "{%- if message['role'] == 'system' -%}{{ content }}"
    "{%- elif message['role'] == 'user' -%}{{ '###Human: ' + content + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '###Assistant: ' + content + ' ' }}"
    "{%- else -%}{{ raise_exception('the MiniGPT-5 chat template knows the roles system, user and assistant, not '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '###Assistant:' }}{%- endif -%}"
)

BUILTIN_CHAT_TEMPLATES = {"gill": GILL_CHAT_TEMPLATE, "minigpt5": MINIGPT5_CHAT_TEMPLATE}

# MiniGPT-5's stage-2 prompts (its dataloader's strings; one image = one <Img><|image|></Img>).
MINIGPT5_IMAGE = f"<Img>{IMAGE_TOKEN}</Img>"
MINIGPT5_STOP = "###"
MINIGPT5_ROLE_TAGS = {"user": "###Human:", "assistant": "###Assistant:"}
MINIGPT5_VIST_SYSTEM_PROMPT = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see "
                               "the images once I provide it to you. Please understanding images and generate story.")
MINIGPT5_MMDIALOG_SYSTEM_PROMPT = ("Give the following images in <Img>ImageContent</Img> format. You will be able to "
                                   "see the images once I provide it to you. Please generate conversation with "
                                   "appropriate image.")


def minigpt5_story_prompt(captions: list[str], instruction: str, instruction_image: bool = False) -> str:
    """A VIST step's prompt: the earlier steps' captions, each followed by its image, then the task instruction
    (and the step's own image for the image-to-text task) -> ``{system}###Human:{history} {instruction}
    ###Assistant:`` with ``<|image|>`` per image in reading order."""
    history = MINIGPT5_IMAGE.join(captions) + (MINIGPT5_IMAGE + "\n" if captions else "")
    image = " " + MINIGPT5_IMAGE if instruction_image else ""
    return f"{MINIGPT5_VIST_SYSTEM_PROMPT}###Human:{history} {instruction}{image} ###Assistant:"


def minigpt5_dialogue_prompt(history: list[tuple[str, str, bool]], role: str) -> str:
    """An MMDialog turn's prompt: ``(role, text, has_image)`` of the history turns, one line each
    (``###Human: {text} <Img><|image|></Img>``), then the tag of ``role`` ("user" / "assistant"), whose text the
    model writes."""
    for name in [r for r, _, _ in history] + [role]:
        if name not in MINIGPT5_ROLE_TAGS:
            raise ValueError(f"MiniGPT-5 dialogue roles are {sorted(MINIGPT5_ROLE_TAGS)}, got {name!r}")
    lines = "".join(f"{MINIGPT5_ROLE_TAGS[r]} {text}" + (f" {MINIGPT5_IMAGE}" if has_image else "") + "\n"
                    for r, text, has_image in history)
    return MINIGPT5_MMDIALOG_SYSTEM_PROMPT + lines + MINIGPT5_ROLE_TAGS[role]


def minigpt5_target(text: str, img_tokens: list[str] | None = None) -> str:
    """MiniGPT-5's answer: ``{text} [IMG0]..[IMG{r-1}] ###`` (``img_tokens`` when it has an image; either part may be
    empty)."""
    return " ".join(part for part in (text, "".join(img_tokens or []), MINIGPT5_STOP) if part)


def placeholder_parts(text: str, images: list) -> list:
    """A text with one ``<|image|>`` per image -> interleaved parts (str / image, empty texts dropped), the images
    in placeholder order: the processor's parts form of ``processor(text=text, images=images)`` (the ids agree
    unless the text spells a special token, which parts keep as text)."""
    segments = text.split(IMAGE_TOKEN)
    if len(segments) - 1 != len(images):
        raise ValueError(f"the text holds {len(segments) - 1} '{IMAGE_TOKEN}' placeholders but {len(images)} images "
                         f"were given")
    parts = [segments[0]]
    for image, segment in zip(images, segments[1:]):
        parts += [image, segment]
    return [part for part in parts if not isinstance(part, str) or part]


def is_message(part) -> bool:
    """A chat message: a dict with ``content`` (and a ``role``)."""
    return isinstance(part, dict) and "content" in part


def flatten_conversation(conversation, index: int = 0) -> tuple[list[dict], list]:
    """Messages -> (messages whose ``content`` is one string with ``<|image|>`` per image, the image sources in
    reading order). A source is the image part itself (so ``base64`` vs ``path`` keys keep their meaning), a
    directly given image, or None for a bare ``{"type": "image"}`` (images passed separately)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise TypeError(f"conversation {index} must be a non-empty list of messages, got "
                        f"{type(conversation).__name__}")
    messages, images = [], []
    for m, message in enumerate(conversation):
        where = f"conversation {index}, message {m}"
        if not is_message(message):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"{where} has no 'role'")
        content = message["content"]
        if content is None or isinstance(content, str):
            messages.append({**message, "content": content or ""})
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
        text = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if isinstance(part, str) or kind == "text":
                piece = part if isinstance(part, str) else part.get("text")
                if not isinstance(piece, str):
                    raise ValueError(f"{where}, part {p} (text): 'text' must be a str, got {type(piece).__name__}")
                text.append(piece)
            elif kind == "image_url":  # OpenAI style, as transformers accepts it
                url = part.get("image_url")
                text.append(IMAGE_TOKEN)
                images.append({"type": "image", "url": url.get("url") if isinstance(url, dict) else url})
            elif kind == "image" or isinstance(part, IMAGE_TYPES):
                text.append(IMAGE_TOKEN)
                has_source = not isinstance(part, dict) or any(part.get(k) is not None for k in IMAGE_PART_KEYS)
                images.append(part if has_source else None)
            elif isinstance(part, dict):
                raise ValueError(f"{where}, part {p}: unknown content part type {kind!r}; expected 'text', "
                                 f"'image' or 'image_url'")
            else:
                raise TypeError(f"{where}, part {p}: content parts are dicts, str or images, got {kind}")
        messages.append({**message, "content": "".join(text)})
    return messages, images
