"""Shared builders for the evaluation tests: official-format VIST / VisDial / COCO-caption files with shape images,
a saved small GILL, and offline stand-ins for the weights the metrics would download."""

import json
import os

import torch

from gill_hf.toy_world import shape_corpus

IMAGE_SIZE = 48


def write_vist(root, num_stories: int = 4, steps: int = 5) -> tuple[str, str]:
    """Official SIS JSON (one annotation list per step, shuffled order) + <photo id>.png/.jpg images."""
    image_dir = os.path.join(root, "vist_images")
    os.makedirs(image_dir, exist_ok=True)
    pairs = shape_corpus(num_stories * steps, seed=1, size=IMAGE_SIZE)
    annotations = []
    for s in range(num_stories):
        for j in reversed(range(steps)):  # order comes from worker_arranged_photo_order, not the file
            image, caption = pairs[s * steps + j]
            photo = str(5000 + s * steps + j)
            image.save(os.path.join(image_dir, photo + (".jpg" if j % 2 else ".png")), quality=95)
            annotations.append([{"story_id": str(70 + s), "photo_flickr_id": photo, "album_id": "1",
                                 "storylet_id": str(s * steps + j), "text": f"then we saw {caption}",
                                 "original_text": caption, "worker_arranged_photo_order": j, "tier": "story"}])
    path = os.path.join(root, "sis_val.json")
    with open(path, "w") as f:
        json.dump({"annotations": annotations, "images": [], "info": {}}, f)
    return path, image_dir


def write_visdial(root, num_dialogs: int = 3, rounds: int = 10) -> tuple[str, str]:
    """VisDial v1.0 JSON + images under both official (VisualDialog_val2018_<12 digits>.jpg) and plain names."""
    image_dir = os.path.join(root, "visdial_images")
    os.makedirs(image_dir, exist_ok=True)
    pairs = shape_corpus(num_dialogs, seed=2, size=IMAGE_SIZE)
    questions = ["what colour is it", "is it on the left", "what shape is it", "is there a sky", "any people"]
    answers = ["red", "yes", "a circle", "no", "no people"]
    dialogs = []
    for d, (image, caption) in enumerate(pairs):
        image_id = 120 + d
        name = f"VisualDialog_val2018_{image_id:012d}.jpg" if d < 2 else f"{image_id}.png"
        image.save(os.path.join(image_dir, name), quality=95)
        turns = [{"question": (d + r) % len(questions), "answer": (2 * d + r) % len(answers),
                  "answer_options": list(range(5)), "gt_index": 0} for r in range(rounds)]
        dialogs.append({"image_id": image_id, "caption": caption, "dialog": turns})
    path = os.path.join(root, "visdial_1.0_val.json")
    with open(path, "w") as f:
        json.dump({"version": "1.0", "split": "val2018",
                   "data": {"dialogs": dialogs, "questions": questions, "answers": answers}}, f)
    return path, image_dir


def write_coco_captions(root, num_images: int = 6) -> str:
    """COCO captions JSON (two captions per image; the first is used) + images."""
    image_dir = os.path.join(root, "coco")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i, (image, caption) in enumerate(shape_corpus(num_images, seed=3, size=IMAGE_SIZE)):
        name = f"COCO_val2014_{i:012d}.jpg"
        image.save(os.path.join(image_dir, name), quality=95)
        images.append({"id": 900 + i, "file_name": name})
        annotations += [{"image_id": 900 + i, "id": 2 * i, "caption": caption},
                        {"image_id": 900 + i, "id": 2 * i + 1, "caption": "another caption"}]
    path = os.path.join(image_dir, "captions_val2014.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return path


def stub_alexnet_weights(torch_home: str):
    """Random AlexNet weights where torchvision caches the ImageNet ones (no download possible here), so
    torchmetrics' LPIPS runs its normal code path; the metric's values are then those of a random backbone."""
    import torchvision

    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), os.path.join(folder, url.rsplit("/", 1)[1]))


class ChannelMeans(torch.nn.Module):
    """A tiny FID feature extractor: uint8 (N, 3, H, W) -> (N, 3) mean colour."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) / 255.0


def stub_inception_weights(torch_home: str):
    """Random InceptionV3 weights where torch-fidelity caches the FID ones (no download possible here), so
    torchmetrics' default FID features run their normal code path (values then come from a random network)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    with mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", return_value=None):
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), os.path.join(folder, fidelity.URL_INCEPTION_V3.rsplit("/", 1)[1]))
