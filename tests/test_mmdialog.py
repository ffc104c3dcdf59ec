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


# ---------------------------------------------------------------------------------------------- samples
@pytest.fixture(scope="module")
def processor():
    from gill_hf import GILLProcessor
    from gill_hf.tiny import build_tiny_tokenizer, tiny_image_processor

    return GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())


def six_turns(tmp_path, image_dir):
    return write_jsonl(tmp_path / "six.txt", [{"conversation_id": 1, "conversation": [
        turn("t0"), turn("t1", "m1"), turn("t2"), turn("t3", "m2"), turn("t4"), turn("t5 is long here", "m3")]}])


def test_every_later_turn_is_a_sample_with_minigpt5s_window(tmp_path, image_dir, processor):
    from gill_hf.training.mmdialog import MMDialogDataset

    dataset = MMDialogDataset.from_jsonl(six_turns(tmp_path, image_dir), image_dir)
    history = [[t["text"] for t in dataset[i]["turns"]] for i in range(len(dataset))]
    # MiniGPT-5 drops the oldest exchange after every assistant turn from turn 3 on
    assert history == [["t0"], ["t0", "t1"], ["t0", "t1", "t2"], ["t2", "t3"], ["t2", "t3", "t4"]]
    assert [dataset[i]["role"] for i in range(5)] == ["assistant", "user", "assistant", "user", "assistant"]
    ex = dataset[3]  # turn 4: history t2, t3 (+ m2)
    assert ex["context"][:2] == ["t2", "t3"] and ex["context"][2].getpixel((0, 0)) == (0, 0, 254)
    assert ex["target_text"] == "t4" and ex["output_image"] is None
    assert dataset[4]["output_image"].getpixel((0, 0))[1] > 100  # m3 (green) is turn 5's output
    # the training-only length cut stops the dialogue at turn 5 (4 tokens > 3)
    cut = MMDialogDataset.from_jsonl(six_turns(tmp_path, image_dir), image_dir, tokenizer=processor.tokenizer,
                                     max_tokens=3)
    assert len(cut) == 4 and "over max_tokens=3" in cut.dialogues[0].stop_reason
    with pytest.raises(ValueError, match="needs a tokenizer"):
        MMDialogDataset(cut.dialogues, max_tokens=3)


# MiniGPT-5's own strings (its dataloader, <ImageHere> written as gill_hf's <|image|>).
VIST_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the images once "
               "I provide it to you. Please understanding images and generate story.")
DIALOG_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
                 "once I provide it to you. Please generate conversation with appropriate image.")
IMG = "<Img><|image|></Img>"
REFERENCE_VIST = {  # step 2 of the story "a b c" (history: steps 0 and 1), and step 0
    ("gen", 2): VIST_SYSTEM + f"###Human:a{IMG}b{IMG}\n Generate an image with the scene description: c ###Assistant:",
    ("text_image", 2): VIST_SYSTEM + f"###Human:a{IMG}b{IMG}\n Tell me the next scene with image. ###Assistant:",
    ("text", 2): VIST_SYSTEM + f"###Human:a{IMG}b{IMG}\n Tell me the next scene description by this image: {IMG} "
                               "###Assistant:",
    ("gen", 0): VIST_SYSTEM + "###Human: Generate an image with the scene description: a ###Assistant:",
}
REFERENCE_TARGETS = {"gen": "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###",
                     "text_image": "c [IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###", "text": "c ###"}
REFERENCE_DIALOG = [  # turns 1..5 of six_turns
    DIALOG_SYSTEM + "###Human: t0\n###Assistant:",
    DIALOG_SYSTEM + f"###Human: t0\n###Assistant: t1 {IMG}\n###Human:",
    DIALOG_SYSTEM + f"###Human: t0\n###Assistant: t1 {IMG}\n###Human: t2\n###Assistant:",
    DIALOG_SYSTEM + f"###Human: t2\n###Assistant: t3 {IMG}\n###Human:",
    DIALOG_SYSTEM + f"###Human: t2\n###Assistant: t3 {IMG}\n###Human: t4\n###Assistant:",
]


def vist_dataset(tmp_path, image_dir):
    from gill_hf.training import VISTTaskDataset

    story = {"s1": [{"caption": c, "image_id": m, "sequence_index": i}
                    for i, (c, m) in enumerate(zip("abc", ("m1", "m2", "m3")))]}
    (tmp_path / "vist.json").write_text(json.dumps(story))
    return VISTTaskDataset.from_json(tmp_path / "vist.json", image_dir)


def test_vist_and_dialogue_prompts_are_minigpt5s_strings(tmp_path, image_dir, processor):
    from gill_hf.chat_templates import minigpt5_target
    from gill_hf.training.data import _minigpt5_prompt
    from gill_hf.training.mmdialog import MMDialogDataset

    vist = vist_dataset(tmp_path, image_dir)
    examples = {(vist.examples[i][2], vist.examples[i][1]): vist[i] for i in range(len(vist))}
    img_tokens = processor.tokenizer.convert_ids_to_tokens(processor.img_token_ids)
    for key, reference in REFERENCE_VIST.items():
        ex = examples[key]
        assert _minigpt5_prompt(ex) == reference, key
        if key[1] == 2:
            target = minigpt5_target(ex["target_text"], img_tokens if ex["output_image"] is not None else None)
            assert target == REFERENCE_TARGETS[key[0]]
    dialog = MMDialogDataset.from_jsonl(six_turns(tmp_path, image_dir), image_dir)
    assert [_minigpt5_prompt(dialog[i]) for i in range(len(dialog))] == REFERENCE_DIALOG
    assert minigpt5_target("t5 is long here", img_tokens) == "t5 is long here " + REFERENCE_TARGETS["gen"]
    # the chat template renders MiniGPT-5's CC3M instruction prompts
    cc3m = processor.apply_chat_template(
        [{"role": "system", "content": "You will be able to generate image according to command."},
         {"role": "user", "content": "generate image with caption: a dog"}], chat_template="minigpt5",
        add_generation_prompt=True)
    assert cc3m == ("You will be able to generate image according to command.###Human: generate image with caption: "
                    "a dog ###Assistant:")


def test_minigpt5_collator_tokenizes_the_reference_strings(tmp_path, image_dir, processor):
    from gill_hf.training import InterleavedDataCollator
    from gill_hf.training.mmdialog import MMDialogDataset

    tok = processor.tokenizer
    collator = InterleavedDataCollator(processor, max_length=512, prompt_format="minigpt5")
    dialog = MMDialogDataset.from_jsonl(six_turns(tmp_path, image_dir), image_dir)
    batch = collator([dialog[3], dialog[4]])  # turn 4 (user, text only), turn 5 (assistant, with image)
    end = tok(" ###", add_special_tokens=False)["input_ids"]
    for row, (reference, text, image) in enumerate(((REFERENCE_DIALOG[3], "t4", False),
                                                    (REFERENCE_DIALOG[4], "t5 is long here", True))):
        prompt = processor(text=reference, images=[dialog[3]["context"][2]], return_tensors=None)["input_ids"][0]
        answer = tok(" " + text, add_special_tokens=False)["input_ids"] + (processor.img_token_ids if image else [])
        ids = prompt + answer + end
        assert batch["input_ids"][row, :len(ids)].tolist() == ids
        labels = batch["labels"][row, :len(ids)].tolist()
        supervised = answer[:len(answer) - 7] if image else answer  # [IMG1..7] unsupervised, as GILL
        assert labels == [-100] * len(prompt) + supervised + [-100] * (len(answer) - len(supervised)) + end
    assert batch["pixel_values"].shape[0] == 2  # one history image per row
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        InterleavedDataCollator(processor, prompt_format="vicuna")


# ---------------------------------------------------------------------------------------------- gill-hf train
def test_train_cli_reads_mmdialog_for_stage2(tmp_path, image_dir, tiny_backbones, monkeypatch, capsys):
    from torch.utils.data import ConcatDataset

    from gill_hf.cli import main
    from gill_hf.commands import train
    from gill_hf.commands.train import load_config
    from gill_hf.training import VISTTaskDataset
    from gill_hf.training.mmdialog import MMDialogDataset

    dialog = six_turns(tmp_path, image_dir)
    vist_dataset(tmp_path, image_dir)
    base = [f"model.text_model={tiny_backbones['llama']}", f"model.vision_model={tiny_backbones['clip']}",
            f"training.output_dir={tmp_path / 'run'}", f"data.mmdialog_image_dir={image_dir}"]
    stage2 = base + ["model.config.training_stage=interleaved", f"data.vist={tmp_path / 'vist.json'}",
                     f"data.vist_image_dir={image_dir}", "data.prompt_format=minigpt5", "data.mmdialog_max_tokens=3"]

    def argv(sets, *extra):
        return ["train", *[x for s in sets for x in ("--set", s)], *extra]

    real_build = train.build_trainer
    monkeypatch.setattr(train, "build_trainer", lambda config: pytest.fail("loaded before checking"))
    for sets, extra, message in (
            (base + [f"data.tsv={tmp_path / 'six.txt'}"], ["--mmdialog", str(dialog)], "data.mmdialog is stage-2 data"),
            (stage2 + ["data.prompt_format=vicuna"], [], "data.prompt_format must be one of ['plain', 'minigpt5']"),
            (stage2 + ["data.mmdialog_max_tokens=0"], ["--mmdialog", str(dialog)], "mmdialog_max_tokens must be >= 1"),
            (stage2, ["--mmdialog", str(tmp_path / "nope.txt")], "data.mmdialog: no such file or folder"),
            (base + [f"data.tsv={dialog}", f"data.vist={tmp_path / 'vist.json'}"], [], "data.vist is stage-2 data"),
            (stage2 + [f"data.tsv={dialog}"], [], "['data.tsv'] are stage-1 data")):
        assert main(argv(sets, *extra)) == 2
        assert message in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr("gill_hf.training.train_gill", lambda model, dataset, out, **kw: seen.update(
        dataset=dataset, collator=kw["data_collator"]))
    config = load_config(None, stage2, {"mmdialog": str(dialog)})
    real_build(config)
    vist, mmdialog = seen["dataset"].datasets if isinstance(seen["dataset"], ConcatDataset) else (None, None)
    assert isinstance(vist, VISTTaskDataset) and isinstance(mmdialog, MMDialogDataset)
    assert len(mmdialog) == 4 and seen["collator"].prompt_format == "minigpt5"  # turn 5 (4 tokens) cut


# ---------------------------------------------------------------------------------------------- evaluation prompts
def test_mmdialog_eval_prompts_are_what_stage2_training_builds(tmp_path, image_dir, processor):
    from minigpt5_fixtures import as_context_image, minigpt5_training_prompt, part_values

    from gill_hf.chat_templates import IMAGE_TOKEN
    from gill_hf.evaluation.mmdialog import minigpt5_response_prompt
    from gill_hf.training import InterleavedDataCollator
    from gill_hf.training.mmdialog import MMDialogDataset

    path = six_turns(tmp_path, image_dir)
    with open(path, "a") as f:  # a window holding two images, in order
        f.write(json.dumps({"conversation_id": 2, "conversation": [turn("u0", "m1"), turn("a1", "m3"),
                                                                    turn("u2")]}) + "\n")
    dialogues = read_mmdialog(path, image_dir)
    dataset = MMDialogDataset(dialogues)
    collator = InterleavedDataCollator(processor, max_length=1024, prompt_format="minigpt5")
    prompts = []
    for index, (d, i) in enumerate(dataset.examples):
        parts = minigpt5_response_prompt(dialogues[d], i)
        text, images, ids = minigpt5_training_prompt(dataset[index], collator)
        prompts.append("".join(p if isinstance(p, str) else IMAGE_TOKEN for p in parts))
        assert prompts[-1] == text
        assert part_values([p for p in parts if not isinstance(p, str)]) == part_values(
            [as_context_image(image) for image in images])
        assert processor(parts, return_tensors=None)["input_ids"][0] == ids
    assert prompts[:5] == REFERENCE_DIALOG  # MiniGPT-5's own strings
    two_images = [p for p in minigpt5_response_prompt(dialogues[1], 2) if not isinstance(p, str)]
    assert [image.getpixel((0, 0)) for image in two_images] == [(254, 0, 0), (0, 128, 1)]  # m1 red, then m3 green
