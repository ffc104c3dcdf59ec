"""MMDialog (MiniGPT-5's stage-2 dialogue data): JSONL conversations -> dialogues -> one training sample per turn.

File format, one conversation per line::

    {"conversation_id": ..., "conversation": [{"turn": [{"__TEXT__": "hi"}, {"__MEDIA__": "<media_id>"}]}, ...]}

(the ``__MEDIA__`` part is optional; other keys such as ``negative_candidate_media_keys`` are ignored). Turn 0 is the
human's, turns alternate ``###Human:`` / ``###Assistant:``, and the image of a turn is ``<image_dir>/<media_id>.jpg``.

:func:`read_mmdialog` parses and filters as MiniGPT-5 does: a conversation stops (its later turns dropped) at the
first turn whose text is empty or ends with ``.jpg``, or whose image is missing or blacklisted; ``stop_reason`` says
why. A record that is not this format (bad JSON, a missing or mistyped field) is a ``ValueError`` naming the file,
the line and the field. :class:`MMDialogDataset` makes every turn after the first a sample of its role (so the model
learns both), with MiniGPT-5's sliding history window and, for training, its length cut (``max_tokens``).
"""

import json
import os
from dataclasses import dataclass, replace

from torch.utils.data import Dataset

from .data import _try_load_file, check_image_name

ROLES = ("user", "assistant")  # turn i is ROLES[i % 2]: "###Human:" / "###Assistant:"


@dataclass(frozen=True)
class DialogueTurn:
    """One turn: ``role`` ("user" for even turns, "assistant" for odd), its text, and its image (``media_id`` and the
    file ``image`` = ``<image_dir>/<media_id>.jpg``, or None for a text-only turn)."""

    role: str
    text: str
    media_id: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class Dialogue:
    """One conversation as kept: ``turns`` up to (not including) the first filtered turn; ``stop_reason`` names that
    turn and why (None when every turn was kept); ``line`` is its 1-based line in the JSONL file."""

    conversation_id: str
    turns: tuple[DialogueTurn, ...]
    line: int
    stop_reason: str | None = None


def read_mmdialog(path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                  blacklist=()) -> list[Dialogue]:
    """Parse an MMDialog JSONL file -> one :class:`Dialogue` per non-blank line, in file order.

    Args:
        path: the JSONL file (e.g. ``test/test_conversations.txt``).
        image_dir: the folder of ``<media_id>.jpg`` files (default: the file's folder, as MiniGPT-5).
        blacklist: media ids whose turn stops the conversation, like a missing image.

    A malformed record raises ``ValueError("<path>, line <n>: <field> ...")``; filtered turns do not raise.
    """
    path = os.fspath(path)
    image_dir = os.fspath(image_dir) if image_dir is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(image_dir):
        raise ValueError(f"MMDialog image folder {image_dir!r} does not exist")
    if isinstance(blacklist, str):
        raise TypeError("blacklist is a collection of media ids, not one str")
    blacklist = {str(media) for media in blacklist}
    dialogues = []
    try:
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, 1):
                if raw.strip():
                    dialogues.append(_dialogue(_record(raw, f"{path}, line {line}"), line, path, image_dir,
                                               blacklist))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    if not dialogues:
        raise ValueError(f"{path} holds no conversations")
    return dialogues


def _record(raw: str, where: str) -> dict:
    """One JSON line -> its dict, with ``conversation_id`` and a list ``conversation`` checked."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON {type(record).__name__}, expected an object with 'conversation_id' and "
                         f"'conversation'")
    missing = [key for key in ("conversation_id", "conversation") if key not in record]
    if missing:
        raise ValueError(f"{where}: lacks field(s) {missing}; it has {sorted(record)}")
    if isinstance(record["conversation_id"], bool) or not isinstance(record["conversation_id"], (str, int)):
        raise ValueError(f"{where}: 'conversation_id' is {record['conversation_id']!r}, expected a str or int")
    if not isinstance(record["conversation"], list):
        raise ValueError(f"{where}: 'conversation' is a {type(record['conversation']).__name__}, expected a list "
                         f"of turns")
    return record


def _turn_parts(entry, where: str) -> tuple[str, str | None]:
    """``{"turn": [{"__TEXT__": str}, {"__MEDIA__": id}?]}`` -> (text, media id or None); else a ``ValueError``."""
    turn = entry.get("turn") if isinstance(entry, dict) else None
    if not isinstance(turn, list) or not 1 <= len(turn) <= 2:
        raise ValueError(f"{where}.turn: expected a list of 1 or 2 parts ({{'__TEXT__': ...}}, then optionally "
                         f"{{'__MEDIA__': ...}}), got {turn if isinstance(entry, dict) else entry!r}")
    text = turn[0].get("__TEXT__") if isinstance(turn[0], dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where}.turn[0].__TEXT__: expected a str, got {turn[0]!r}")
    if len(turn) == 1:
        return text, None
    media = turn[1].get("__MEDIA__") if isinstance(turn[1], dict) else None
    if isinstance(media, bool) or not isinstance(media, (str, int)) or not str(media).strip():
        raise ValueError(f"{where}.turn[1].__MEDIA__: expected a media id, got {turn[1]!r}")
    check_image_name(f"{media}.jpg", f"{where}.turn[1].__MEDIA__")
    return text, str(media)


def _dialogue(record: dict, line: int, path: str, image_dir: str, blacklist: set[str]) -> Dialogue:
    """The kept turns of one record (MiniGPT-5's filtering) as a :class:`Dialogue`."""
    turns, stop = [], None
    for i, entry in enumerate(record["conversation"]):
        text, media = _turn_parts(entry, f"{path}, line {line}: conversation[{i}]")
        image = os.path.join(image_dir, f"{media}.jpg") if media is not None else None
        if not text.strip():
            stop = f"turn {i}: empty text"
        elif text.rstrip().endswith(".jpg"):
            stop = f"turn {i}: the text ends with '.jpg'"
        elif media is not None and media in blacklist:
            stop = f"turn {i}: media {media} is blacklisted"
        elif image is not None and not os.path.isfile(image):
            stop = f"turn {i}: image {image} is missing"
        if stop is not None:
            break
        turns.append(DialogueTurn(ROLES[i % 2], text, media, image))
    return Dialogue(str(record["conversation_id"]), tuple(turns), line, stop)


def history_window(i: int) -> range:
    """The turns MiniGPT-5 shows before turn ``i``: the previous exchange and, for an assistant turn, the current
    human turn (turn 1 sees 0; 2 and 3 see from 0; 4 and 5 from 2; ...)."""
    return range(max(0, 2 * ((i - 2) // 2)), i)


class MMDialogDataset(Dataset):
    """Every turn after the first of every dialogue as one stage-2 example of its role (both roles are learnt).

    Item -> the :class:`~gill_hf.training.InterleavedDataCollator` schema: ``{"index", "task": "dialogue",
    "turns": [{"role", "text", "has_image"}] (the history window), "role", "context": [text, image?, ...] (the
    history as parts), "instruction": "", "instruction_image": None, "target_text", "output_image" (the turn's own
    image, or None), "error"}``.

    Args:
        dialogues: :func:`read_mmdialog`'s output.
        tokenizer, max_tokens: MiniGPT-5's training-only cut: a dialogue also stops at the first turn whose text is
            more than ``max_tokens`` tokens of ``tokenizer`` (MiniGPT-5: 50). None: no cut (evaluation).
    """

    def __init__(self, dialogues: list[Dialogue], tokenizer=None, max_tokens: int | None = None):
        if max_tokens is not None and (tokenizer is None or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens} needs a tokenizer and a value >= 1")
        if max_tokens is None and tokenizer is not None:
            raise ValueError("a tokenizer is only used to count max_tokens; pass max_tokens too")
        self.dialogues = [_cut(d, tokenizer, max_tokens) for d in dialogues] if max_tokens else list(dialogues)
        self.examples = [(d, i) for d, dialogue in enumerate(self.dialogues) for i in range(1, len(dialogue.turns))]
        if not self.examples:
            raise ValueError(f"no dialogue of {len(dialogues)} keeps two turns: nothing to learn from")

    @classmethod
    def from_jsonl(cls, path, image_dir=None, blacklist=(), tokenizer=None, max_tokens: int | None = None):
        """:func:`read_mmdialog` then the dataset (arguments as there and in the class)."""
        return cls(read_mmdialog(path, image_dir, blacklist), tokenizer=tokenizer, max_tokens=max_tokens)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        d, i = self.examples[index]
        turns = self.dialogues[d].turns
        ex = {"index": index, "task": "dialogue", "turns": [], "role": turns[i].role, "context": [],
              "instruction": "", "instruction_image": None, "target_text": turns[i].text, "output_image": None,
              "error": None}
        for turn in (turns[j] for j in history_window(i)):
            ex["turns"].append({"role": turn.role, "text": turn.text, "has_image": turn.image is not None})
            ex["context"].append(turn.text)
            if turn.image is not None:
                image, error = _try_load_file(None, turn.image)
                ex["context"].append(image)
                ex["error"] = ex["error"] or error
        if turns[i].image is not None:
            ex["output_image"], error = _try_load_file(None, turns[i].image)
            ex["error"] = ex["error"] or error
        return ex


def _cut(dialogue: Dialogue, tokenizer, max_tokens: int) -> Dialogue:
    """``dialogue`` stopped at its first turn longer than ``max_tokens`` tokens (MiniGPT-5's training filter)."""
    for i, turn in enumerate(dialogue.turns):
        length = len(tokenizer(turn.text, add_special_tokens=False)["input_ids"])
        if length > max_tokens:
            return replace(dialogue, turns=dialogue.turns[:i],
                           stop_reason=f"turn {i}: {length} tokens, over max_tokens={max_tokens}")
    return dialogue
