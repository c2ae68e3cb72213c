"""Writes the committed test images of tests/data from photos the test environment already has.

The sources are sample photos shipped inside scikit-image (a FiftyOne dependency) and
scikit-learn, each public domain, CC0 or CC BY 2.0 (README.md here lists each one's licence).
Output, replacing what is there:

- ``tiny10/<class>/0000.jpg`` ... : ``PER_CLASS`` seeded square crops of each photo (random size
  and place, half of them mirrored) at 32x32, RGB JPEG, one folder per photo: a CIFAR-like tree.
  ``tiny10/descriptions.json`` holds the hand-written class descriptions of ``DESCRIPTIONS``.
- ``photos/images/<name>.jpg``: each photo whole (long side at most ``MAX_SIDE``; the two grey
  ones as greyscale JPEGs, as some COCO photos are), with
  ``photos/labels.json`` (the objects in each, read off the photos by eye) and
  ``photos/classes.txt``: a COCO-like multi-label set.

Run from the repository root: ``.venv/bin/python tests/data/make.py`` (deterministic for a given
Pillow and scikit-image version; the committed files were written with Pillow 13.0, scikit-image 0.26).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
PER_CLASS = 6
SIZE = 32
MAX_SIDE = 800
SEED = 2024

# name -> (package, file): the class / file name and where the photo comes from
SOURCES = {
    "astronaut": ("skimage", "astronaut.png"),
    "cameraman": ("skimage", "camera.png"),
    "cat": ("skimage", "chelsea.png"),
    "clock": ("skimage", "clock_motion.png"),
    "coffee": ("skimage", "coffee.png"),
    "flower": ("sklearn", "flower.jpg"),
    "galaxies": ("skimage", "hubble_deep_field.jpg"),
    "retina": ("skimage", "retina.jpg"),
    "rocket": ("skimage", "rocket.jpg"),
    "temple": ("sklearn", "china.jpg"),
}

# What each photo shows, in the vocabulary of CLASSES ("galaxies": none of them, like COCO's images without boxes).
LABELS = {
    "astronaut": ["person", "flag", "rocket"],
    "cameraman": ["person", "camera", "tripod", "building"],
    "cat": ["cat"],
    "clock": ["clock"],
    "coffee": ["cup", "spoon"],
    "flower": ["flower"],
    "galaxies": [],
    "retina": ["eye"],
    "rocket": ["rocket", "tower"],
    "temple": ["building", "tree", "boat"],
}
CLASSES = ["person", "cat", "cup", "spoon", "rocket", "flag", "eye", "camera", "tripod", "building", "clock", "tree"]
CLASSES += ["flower", "boat", "tower"]

DESCRIPTIONS = {
    "astronaut": [
        "An astronaut wears a bulky orange flight suit with patches on the chest.",
        "An astronaut is a person in a pressure suit, often holding a helmet.",
        "A portrait of an astronaut smiling in front of a flag.",
        "An astronaut's suit has rings at the neck and wrists for a helmet and gloves.",
        "An astronaut photo often shows a model of a space shuttle in the background.",
        "An astronaut has short hair and an orange suit with a round mission badge.",
    ],
    "cameraman": [
        "A cameraman stands on grass looking through a camera on a tripod.",
        "A cameraman wears a dark coat and bends toward the eyepiece of his camera.",
        "A black and white photo of a man with a camera on three thin legs.",
        "A cameraman is a person holding a film camera outdoors, with buildings far behind.",
        "A cameraman photo is grey, with a bright sky and a dark figure.",
        "A cameraman aims a camera mounted on a tripod across an open field.",
    ],
    "cat": [
        "A cat has pointed ears, whiskers and green eyes.",
        "A cat's face is covered in striped tabby fur.",
        "A close-up of a cat looking to the side.",
        "A cat has a small pink nose and long white whiskers.",
        "A cat is a small furry animal with large round eyes.",
        "A cat's fur is brown, grey and white with dark stripes.",
    ],
    "clock": [
        "A clock is a round face with hands, here blurred by motion.",
        "A clock hangs on a plain grey wall.",
        "A blurry black and white photo of a wall clock.",
        "A clock has a round rim and a pale dial in the middle.",
        "A clock photographed while the camera moved sideways looks smeared.",
        "A clock is a small round object on a large empty background.",
    ],
    "coffee": [
        "A coffee is served in a red cup on a red saucer.",
        "A cup of coffee with a spoon, seen from above on a wooden table.",
        "A coffee has a brown crema on top inside a white cup.",
        "A coffee cup sits on a saucer with a silver spoon beside it.",
        "An espresso in a small cup on a dark wooden table.",
        "A coffee is a hot brown drink in a round cup.",
    ],
    "flower": [
        "A flower with many orange petals in tight rings.",
        "A flower is a round dahlia head against green leaves.",
        "A close-up of an orange flower with a dark green background.",
        "A flower has layers of curved petals that open from the centre.",
        "A flower is bright orange and pink with a blurry garden behind it.",
        "A flower head shaped like a ball of small petals.",
    ],
    "galaxies": [
        "Galaxies are small bright dots and smudges on a black sky.",
        "A deep field photo of galaxies: many coloured specks on darkness.",
        "Galaxies look like tiny spirals and ovals of light far away.",
        "A black image scattered with red, white and blue points of light.",
        "Galaxies seen by a space telescope, thousands in one view.",
        "Galaxies are faint glowing shapes against the dark of space.",
    ],
    "retina": [
        "A retina photo is an orange-red disc with branching dark red vessels.",
        "A retina shows a bright yellow spot where the optic nerve enters.",
        "A photo of the back of an eye, round and red on a black background.",
        "A retina has blood vessels spreading out like the branches of a tree.",
        "A retina image is a circle of orange light with a darker centre.",
        "A fundus photograph of a healthy eye.",
    ],
    "rocket": [
        "A rocket stands upright on a launch pad at night.",
        "A rocket is a tall white cylinder between tall metal towers.",
        "A rocket on its pad lit by bright lamps under a deep blue sky.",
        "A rocket waits for launch beside lightning towers.",
        "A rocket is long and thin, pointing straight up to the sky.",
        "A night photo of a rocket and the lights of a launch site.",
    ],
    "temple": [
        "A temple is a tall tower with curved roofs stacked on each other.",
        "A temple with red and green painted eaves above a lake.",
        "A temple rises above trees, with water and hills behind it.",
        "A pagoda with many tiers and golden decorations.",
        "A temple on a hill seen from above, surrounded by green trees.",
        "A temple is a traditional Chinese building with upturned roof corners.",
    ],
}


def source_path(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent / name
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def crops(im: Image.Image, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` square crops of 35-90 % of the short side, half mirrored, at ``SIZE`` x ``SIZE``."""
    w, h = im.size
    out = []
    for i in range(n):
        side = int(min(w, h) * rng.uniform(0.35, 0.9))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        c = im.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
        out.append(c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else c)
    return out


def main() -> None:
    rng = np.random.default_rng(SEED)
    tiny, photos = HERE / "tiny10", HERE / "photos"
    for d in (tiny, photos):
        shutil.rmtree(d, ignore_errors=True)
    (photos / "images").mkdir(parents=True)
    for name, (package, file) in SOURCES.items():
        with Image.open(source_path(package, file)) as src:
            im = src.convert("L" if src.mode == "L" else "RGB")  # the two grey photos stay grey (decoding)
        (tiny / name).mkdir(parents=True)
        for i, c in enumerate(crops(im.convert("RGB"), PER_CLASS, rng)):
            c.save(tiny / name / f"{i:04d}.jpg", quality=90)
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        im.save(photos / "images" / f"{name}.jpg", quality=80, optimize=True)
    (tiny / "descriptions.json").write_text(json.dumps(DESCRIPTIONS, indent=4) + "\n")
    (photos / "labels.json").write_text(json.dumps({f"{k}.jpg": v for k, v in LABELS.items()}, indent=0) + "\n")
    (photos / "classes.txt").write_text("\n".join(CLASSES) + "\n")


if __name__ == "__main__":
    main()
