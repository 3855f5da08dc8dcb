"""Regenerates this sample dataset (the README demo): small JPEGs made from scikit-image's bundled photos, a
WebDataset-style tar holding two of them, and samples.jsonl with one record or more per MetaMorph data family.

    python examples/data/sample/make_sample.py    # needs pillow and scikit-image
"""

import io
import json
import tarfile
from pathlib import Path

import skimage.data
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
SIZE = (160, 120)


def photo(name: str, size=SIZE) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80, optimize=True)
    return buffer.getvalue()


def main() -> None:
    images = HERE / "images"
    (images / "video").mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        (images / f"{name}.jpg").write_bytes(jpeg(photo(name)))
    (images / "rocket_gray.jpg").write_bytes(jpeg(ImageOps.grayscale(photo("rocket")).convert("RGB")))
    (images / "chelsea_eyes.jpg").write_bytes(jpeg(photo("chelsea", (320, 240)).crop((80, 40, 240, 160))))
    wide = photo("horse", (240, 120))
    for frame in range(4):
        (images / "video" / f"frame{frame}.jpg").write_bytes(jpeg(wide.crop((frame * 25, 0, frame * 25 + 160, 120))))
    with tarfile.open(images / "webdataset-000.tar", "w") as tar:
        for key, name in (("000001", "camera"), ("000002", "coins")):
            data = jpeg(photo(name))
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    records = [
        {"id": "vqa-0", "image": "astronaut.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the person wearing?"},
            {"from": "gpt", "value": "An orange space suit, with a flag on the shoulder."}]},
        {"id": "vqa-wds-1", "image": "webdataset-000.tar::000001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the man holding?"},
            {"from": "gpt", "value": "A camera on a tripod."}]},
        {"id": "vqa-wds-2", "image": "webdataset-000.tar::000002.jpg", "conversations": [
            {"from": "human", "value": "How many coins are there? <image>"},
            {"from": "gpt", "value": "Twenty-four."}]},
        {"id": "video-0", "image": [f"video/frame{i}.jpg" for i in range(4)], "conversations": [
            {"from": "human", "value": "<image><image><image><image>\nWhat happens in this video?"},
            {"from": "gpt", "value": "The view pans across a horse standing in a field."}]},
        {"id": "t2i-0", "image": "coffee.jpg", "conversations": [
            {"from": "human", "value": "Generate an image of a cup of coffee on a saucer."},
            {"from": "gpt", "value": "<image>"}]},
        {"id": "thinking-0", "image": ["chelsea.jpg", "chelsea_eyes.jpg"], "conversations": [
            {"from": "system", "value": "Think visually before you answer."},
            {"from": "human", "value": "<image>\nWhat colour are the cat's eyes?"},
            {"from": "gpt", "value": "Let me zoom in on the eyes: <image> They are green."}]},
        {"id": "edit-0", "image": ["rocket.jpg", "rocket_gray.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nMake this photo black and white."},
            {"from": "gpt", "value": "Here it is: <image>"}]},
        {"id": "text-0", "conversations": [
            {"from": "human", "value": "Name three primary colours."},
            {"from": "gpt", "value": "Red, yellow and blue."},
            {"from": "human", "value": "And for light?"},
            {"from": "gpt", "value": "Red, green and blue."}]},
        {"id": "vqa-dup", "image": "astronaut.jpg", "conversations": [
            {"from": "human", "value": "<image>\nIs this photo taken outdoors?"},
            {"from": "gpt", "value": "No, it is a studio portrait."}]},
    ]
    with open(HERE / "samples.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    # A few bad records, to show what rejects.jsonl looks like.
    with open(HERE / "bad_samples.jsonl", "w", encoding="utf-8") as handle:
        handle.write('{"id": "broken", "conversations": [\n')
        handle.write(json.dumps({"id": "escape", "image": "../../secret.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "no"}]}) + "\n")
        handle.write(json.dumps({"id": "mismatch", "image": ["coffee.jpg", "rocket.jpg"], "conversations": [
            {"from": "human", "value": "<image> one image tag, two images"}, {"from": "gpt", "value": "?"}]}) + "\n")


if __name__ == "__main__":
    main()
