"""MMDialog reader (MiniGPT-5's stage-2 dialogues): parsing, filtering, bad records named."""

import json

import pytest
from PIL import Image

from gill_hf.training.mmdialog import Dialogue, DialogueTurn, read_mmdialog


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def turn(text, media=None):
    return {"turn": [{"__TEXT__": text}] + ([{"__MEDIA__": media}] if media is not None else [])}


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("m1", "red"), ("m2", "blue"), ("m3", "green"), ("bad", "white")):
        Image.new("RGB", (8, 8), colour).save(folder / f"{name}.jpg")
    return folder


def test_read_mmdialog_keeps_turns_until_the_first_filtered_one(tmp_path, image_dir):
    path = write_jsonl(tmp_path / "conv.txt", [
        {"conversation_id": 7, "conversation": [turn("hi"), turn("look", "m1"), turn("nice"), turn("ok", "m2")],
         "negative_candidate_texts": []},
        "",  # blank lines are ignored
        {"conversation_id": "a", "conversation": [turn("x"), turn("y"), turn("  "), turn("never")]},
        {"conversation_id": "b", "conversation": [turn("x"), turn("photo.jpg"), turn("never")]},
        {"conversation_id": "c", "conversation": [turn("x", "m3"), turn("y", "gone")]},
        {"conversation_id": "d", "conversation": [turn("x"), turn("y", "bad")]},
    ])
    dialogues = read_mmdialog(path, image_dir, blacklist=["bad"])
    first = dialogues[0]
    assert first == Dialogue("7", (DialogueTurn("user", "hi"),
                                   DialogueTurn("assistant", "look", "m1", str(image_dir / "m1.jpg")),
                                   DialogueTurn("user", "nice"),
                                   DialogueTurn("assistant", "ok", "m2", str(image_dir / "m2.jpg"))), 1, None)
    assert [(d.conversation_id, d.line, [t.text for t in d.turns], d.stop_reason) for d in dialogues[1:]] == [
        ("a", 3, ["x", "y"], "turn 2: empty text"),
        ("b", 4, ["x"], "turn 1: the text ends with '.jpg'"),
        ("c", 5, ["x"], f"turn 1: image {image_dir / 'gone.jpg'} is missing"),
        ("d", 6, ["x"], "turn 1: media bad is blacklisted"),
    ]


@pytest.mark.parametrize("record, message", [
    ("{not json", "line 1: not a JSON object"),
    ([1, 2], "line 1: a JSON list"),
    ({"conversation": []}, r"line 1: lacks field\(s\) \['conversation_id'\]"),
    ({"conversation_id": 1, "conversation": {}}, "line 1: 'conversation' is a dict"),
    ({"conversation_id": 1, "conversation": [turn("a"), {"turns": []}]}, r"line 1: conversation\[1\].turn"),
    ({"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": 3}]}]},
     r"conversation\[0\].turn\[0\].__TEXT__: expected a str"),
    ({"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": "a"}, {"media": "m1"}]}]},
     r"conversation\[0\].turn\[1\].__MEDIA__: expected a media id"),
    ({"conversation_id": 1, "conversation": [turn("a", "../m1")]}, "leaves the image folder"),
])
def test_bad_records_are_named(tmp_path, image_dir, record, message):
    path = write_jsonl(tmp_path / "conv.txt", [record])
    with pytest.raises(ValueError, match=message) as err:
        read_mmdialog(path, image_dir)
    assert str(path) in str(err.value)


def test_missing_folder_and_empty_file(tmp_path, image_dir):
    with pytest.raises(ValueError, match="image folder .* does not exist"):
        read_mmdialog(write_jsonl(tmp_path / "c.txt", [turn("a")]), tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no conversations"):
        read_mmdialog(write_jsonl(tmp_path / "e.txt", [""]), image_dir)
