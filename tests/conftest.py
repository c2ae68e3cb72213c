"""Test harness: isolated FiftyOne database and storage, tiny models, real images.

Environment is set before FiftyOne is imported: every test session uses its own database
name (all FiftyOne processes on a machine share one mongod) and a temporary NOLA_HOME, so
tests never touch a user's datasets or artefacts.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from PIL import Image

from synthetic_review import build_review_dataset

_SESSION = uuid.uuid4().hex[:8]
os.environ.setdefault("FIFTYONE_DATABASE_NAME", f"fiftyone_nola_tests_{_SESSION}")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ["NOLA_HOME"] = tempfile.mkdtemp(prefix="nola-home-")
os.environ.pop("NOLA_RANDOM_INIT", None)
# Unit tests run PyTorch: converting every tiny (tuned) model to OpenVINO would add seconds each;
# tests/test_engines.py asks for the engine explicitly.
os.environ.setdefault("NOLA_ENGINE", "torch")
os.environ.setdefault("OLLAMA_HOST", "http://127.0.0.1:9")  # never a real server by accident

REPO = Path(__file__).resolve().parents[1]
# FiftyOne's plugin scan stops at the first fiftyone.yml, so the repo root is a plugin directory.
os.environ["FIFTYONE_PLUGINS_DIR"] = str(REPO)

# Real images: ../shared/data (2,000 CIFAR-10 and 256 COCO images; NOLA_SHARED_DATA overrides) when it
# exists, else the small committed set of tests/data (its README), so a lone clone tests the same
# code; NOLA_SHARED_DATA set but empty picks the committed set even beside ../shared.
LOCAL_DATA = Path(__file__).resolve().parent / "data"
_SHARED_ENV = os.environ.get("NOLA_SHARED_DATA")
SHARED_DATA = Path(_SHARED_ENV) if _SHARED_ENV else REPO.parent / "shared" / "data"
ON_SHARED = bool(_SHARED_ENV) or (_SHARED_ENV is None and SHARED_DATA.is_dir())
CIFAR_DIR = SHARED_DATA / "cifar10_2k" if ON_SHARED else LOCAL_DATA / "tiny10"  # class folders of JPEGs
COCO_DIR = SHARED_DATA / "coco256" if ON_SHARED else LOCAL_DATA / "photos"  # images/, labels.json, classes.txt
# The official NoLA CIFAR10_local descriptions: the 0.1 dataset's inputs hold a copy of ../shared's file.
CIFAR10_DESCRIPTIONS = REPO / "tests" / "golden" / "v0_1_dataset" / "descriptions.json"
DATA_CLASSES = sorted(p.name for p in CIFAR_DIR.iterdir() if p.is_dir()) if CIFAR_DIR.is_dir() else []
# Distinct images in each class folder (200 on ../shared, 6 in the committed set)
DATA_PER_CLASS = min((len(list((CIFAR_DIR / c).glob("*.jpg"))) for c in DATA_CLASSES), default=0)
# More images per class than the tree holds: mirrored, shifted copies, made once per session here.
_COPIES = Path(tempfile.gettempdir()) / f"nola-test-images-{_SESSION}"


def pretrained_available() -> bool:
    return os.environ.get("NOLA_PRETRAINED", "") == "1"


# Markers must say what tests do: a test that reads real images (../shared/data or the committed
# set) is an integration test (`make test-fast` deselects those). An audit hook sees every file the
# test process opens.
_IMAGE_ROOTS = (SHARED_DATA, LOCAL_DATA / "tiny10", LOCAL_DATA / "photos", _COPIES)
_SHARED_ROOTS = tuple({p for r in _IMAGE_ROOTS for p in (str(r.absolute()), os.path.realpath(r))})
_SHARED_EVENTS = {"open", "os.listdir", "os.scandir"}
_shared_reads = {"watching": False, "seen": None}


def _watch_shared_reads(event, args):
    if not _shared_reads["watching"] or _shared_reads["seen"] or event not in _SHARED_EVENTS:
        return
    path = args[0] if args else None
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_SHARED_ROOTS):
            _shared_reads["seen"] = path


sys.addaudithook(_watch_shared_reads)


@pytest.fixture(autouse=True)
def _integration_marker_matches_reads(request):
    _shared_reads.update(watching=True, seen=None)
    yield
    _shared_reads["watching"] = False
    seen = _shared_reads["seen"]
    if seen and request.node.get_closest_marker("integration") is None:
        pytest.fail(f"{request.node.nodeid} reads {seen} but is not marked integration", pytrace=False)


def pytest_report_header(config):
    where = "../shared/data or NOLA_SHARED_DATA" if ON_SHARED else "the committed set, tests/data"
    return f"real images: {CIFAR_DIR} and {COCO_DIR} ({where})"


def heavy_wanted(config) -> bool:
    """Heavy tests (minutes each) run when asked: NOLA_HEAVY=1, or a -m expression naming them."""
    return os.environ.get("NOLA_HEAVY") == "1" or "heavy" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not pretrained_available():
        skips["pretrained"] = pytest.mark.skip(
            reason="needs pretrained CLIP/DINO weights: set NOLA_PRETRAINED=1 with weights in NOLA_MODELS_DIR"
        )
    if not heavy_wanted(config):
        skips["heavy"] = pytest.mark.skip(reason="heavy (minutes): make test-heavy, or NOLA_HEAVY=1")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # Drop this session's database and image copies so repeated runs leave nothing behind.
    shutil.rmtree(_COPIES, ignore_errors=True)
    if "fiftyone" in __import__("sys").modules:
        try:
            import fiftyone.core.odm as foo

            db = foo.get_db_conn()
            db.client.drop_database(db.name)
        except Exception:
            pass


@pytest.fixture(scope="session")
def tiny_clip():
    from fiftyone_nola.core.models import load_clip, tiny_clip_spec

    return load_clip(tiny_clip_spec())


@pytest.fixture(scope="session")
def tiny_dino():
    from fiftyone_nola.core.models import load_dino, tiny_dino_spec

    return load_dino(tiny_dino_spec())


def data_classes(prefer) -> list[str]:
    """Classes of ``CIFAR_DIR`` for a test: ``prefer`` when its folders include them all (CIFAR-10's
    names on ../shared), else as many of its first classes (the committed set has other names)."""
    prefer = list(prefer)
    return prefer if set(prefer) <= set(DATA_CLASSES) or not DATA_CLASSES else DATA_CLASSES[: len(prefer)]


def cifar_files(per_class: int = 4, classes=None) -> list[tuple[str, str]]:
    """``(filepath, class)`` pairs: the first ``per_class`` images of each class of ``CIFAR_DIR``
    (CIFAR-10 on ../shared, tests/data/tiny10 otherwise; more than a folder holds: copies).
    ``classes``: as in ``data_classes`` (CIFAR-10 names stand for the committed set's first ones)."""
    if not CIFAR_DIR.is_dir():
        pytest.skip(f"real images not found at {CIFAR_DIR} (set NOLA_SHARED_DATA)")
    out = []
    for cls in sorted(data_classes(classes) if classes else DATA_CLASSES):
        files = sorted((CIFAR_DIR / cls).glob("*.jpg"))
        out += [(str(f), cls) for f in files[:per_class]]
        out += [(_copy_of(files, k), cls) for k in range(len(files), per_class)]
    return out


def _copy_of(files: list[Path], k: int) -> str:
    """Image ``k`` beyond a folder's ``len(files)``: a distinct copy of ``files[k % n]`` (mirrored
    every other round, rolled by the round's number of pixels)."""
    from PIL import ImageChops, ImageOps

    src, round_ = files[k % len(files)], k // len(files)
    out = _COPIES / src.parent.name / f"{k:04d}.jpg"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im = ImageOps.mirror(im) if round_ % 2 else im
            ImageChops.offset(im, round_, round_ // 2).save(out, quality=95)
    return str(out)


@pytest.fixture
def make_dataset():
    """Factory for uniquely named temporary datasets, deleted after the test."""
    import fiftyone as fo

    created = []

    def make(filepaths=(), labels=None, gt_field="ground_truth", name=None):
        ds = fo.Dataset(name or f"nola-test-{uuid.uuid4().hex[:10]}")
        created.append(ds)
        samples = []
        for i, fp in enumerate(filepaths):
            s = fo.Sample(filepath=str(fp))
            if labels is not None:
                lab = labels[i]
                if isinstance(lab, (list, tuple)):
                    s[gt_field] = fo.Classifications(classifications=[fo.Classification(label=x) for x in lab])
                elif lab is not None:
                    s[gt_field] = fo.Classification(label=lab)
            samples.append(s)
        if samples:
            ds.add_samples(samples, progress=False)
        return ds

    yield make
    for ds in created:
        if not ds.deleted:
            ds.delete()


@pytest.fixture
def cifar_dataset(make_dataset):
    """40 real images (4 per class of ``CIFAR_DIR``) with ground truth in ``ground_truth``."""
    pairs = cifar_files(per_class=4)
    return make_dataset([p for p, _ in pairs], [c for _, c in pairs])


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_pipeline_config(descriptions_file=str(CIFAR_DIR / "descriptions.json"), zeroshot=None, tune=None, **overrides):
    """``AutoLabelConfig`` of the single-label pipeline on tiny models, seconds per run.

    ``zeroshot`` / ``tune``: fields of the nested stage configs that differ from this base.
    """
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.core.prompt_tuning import TuneConfig
    from fiftyone_nola.pipeline import AutoLabelConfig
    from fiftyone_nola.stages.nola import ZeroShotConfig

    base = dict(
        clip=tiny_clip_spec(),
        dino=tiny_dino_spec(),
        embed=EmbedConfig(batch_size=16, num_workers=0),
        zeroshot=ZeroShotConfig(descriptions_file=descriptions_file, **(zeroshot or {})),
        tune=TuneConfig(**{"epochs": 1, "batch_size": 8, "max_samples": 24, **(tune or {})}),
        device="cpu",
    )
    base.update(overrides)
    return AutoLabelConfig(**base)


_TOKENIZER_TEXTS = (
    "a photo of a cat.",
    "a blurry photo of an airplane.",
    "A caption of an image of a truck",
    "Describe what a dog looks like",
    "How can you identify a frog?",
    "a ship at sea, a deer in a forest, a horse running, an automobile on the road, a bird",
)


def make_sentencepiece_tokenizer(folder: Path) -> Path:
    """A small Gemma-style sentencepiece tokenizer (what SigLIP 2 uses), as Hugging Face files in
    ``folder``: trained here in milliseconds, so the tokenizer plumbing runs offline."""
    import io
    import json

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXTS * 20),
        model_writer=buf,
        vocab_size=120,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    config = {"tokenizer_class": "GemmaTokenizer", "padding_side": "right", "pad_token": "<pad>"}
    config.update(eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_siglip_spec(tmp_path_factory):
    """The tiny SigLIP 2-like CLIP (timm ViT tower, sigmoid scoring), its sentencepiece tokenizer
    placed where a user puts one for offline use: ``<models_dir>/clip/<arch>/tokenizer``."""
    pytest.importorskip("sentencepiece")
    from fiftyone_nola.core.models import TINY_SIGLIP_ARCH, ClipSpec, tokenizer_dir

    spec = ClipSpec(
        arch=TINY_SIGLIP_ARCH, pretrained=None, random_init=True, models_dir=str(tmp_path_factory.mktemp("models"))
    )
    make_sentencepiece_tokenizer(tokenizer_dir(spec))
    return spec


@pytest.fixture(scope="session")
def tiny_pe_spec():
    """The tiny PE-Core-like CLIP (timm Eva tower with RoPE and a class token; CLIP BPE text)."""
    from fiftyone_nola.core.models import TINY_PE_ARCH, ClipSpec

    return ClipSpec(arch=TINY_PE_ARCH, pretrained=None, random_init=True)


def golden_sets(golden: dict) -> list[tuple[str, Path, str]]:
    """``(images key, their root, the models' features key)`` of a reference JSON: its committed
    images (under tests/data) where it has them, and ``../shared``'s when that set is used."""
    sets = [("committed_images", LOCAL_DATA, "committed_features")] if "committed_images" in golden else []
    return sets + ([("images", SHARED_DATA, "features")] if ON_SHARED else [])


def golden_entries(golden: dict) -> list[tuple[Path, dict]]:
    """``(path, stored entry)`` of every image the reference's features were computed on; the
    test is skipped when none of its sets is here."""
    out = [(root / im["path"], im) for key, root, _ in golden_sets(golden) for im in golden[key]]
    if not out or not all(p.is_file() for p, _ in out):
        pytest.skip(f"the reference's images are not here (sets: {[str(r) for _, r, _ in golden_sets(golden)]})")
    return out


def golden_image_paths(golden: dict) -> list[Path]:
    return [p for p, _ in golden_entries(golden)]


def golden_rgb_images(golden: dict) -> list:
    """Those images as RGB PIL images, each checked against its stored sha256."""
    import hashlib

    out = []
    for p, im in golden_entries(golden):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == im["sha256"], p
        with Image.open(p) as f:
            out.append(f.convert("RGB"))
    return out


def golden_features(golden: dict, model: dict):
    """A model's reference features on :func:`golden_entries`' images, in the same order."""
    import numpy as np

    return np.concatenate([np.asarray(model[key], dtype=np.float64) for _, _, key in golden_sets(golden)])


def golden_per_image(golden: dict, model: dict, name: str) -> list:
    """A model's per-image list ``name`` (e.g. ``pixels_sha256``) on :func:`golden_entries`' images, in
    the same order: ``committed_<name>`` for the committed set, ``<name>`` for ``../shared``'s."""
    return [v for key, _, _ in golden_sets(golden) for v in model[key.removesuffix("images") + name]]


def assert_reference_features(f, ref, min_cos: float = 0.999999, max_abs: float = 1e-4) -> None:
    """Our features ``f`` equal a reference implementation's ``ref`` row by row (cosine and
    largest absolute difference, in float64)."""
    import numpy as np

    f, ref = np.asarray(f, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert f.shape == ref.shape, (f.shape, ref.shape)
    cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= min_cos and np.abs(f - ref).max() <= max_abs, (cos.min(), np.abs(f - ref).max())


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty models folder (with ``dino/``) set as ``NOLA_MODELS_DIR``."""
    d = tmp_path / "models"
    (d / "dino").mkdir(parents=True)
    monkeypatch.setenv("NOLA_MODELS_DIR", str(d))
    return d


_HUB_SCRIPT = """
import json, sys
import torch
from PIL import Image
from fiftyone_nola.core import models as M
spec = M.DinoSpec(name=sys.argv[1], random_init=False)
ok = M.weights_available(spec)
loaded = M.load_dino(spec, cache=False)
ims = [Image.open(p).convert("RGB") for p in sys.argv[2:]]
with torch.no_grad():
    f = loaded.encode_image(torch.stack([loaded.transform(im) for im in ims])).numpy()
print(json.dumps({"ok": list(ok), "weights": loaded.identity["weights"], "features": f.tolist()}))
"""


def dino_features_from_offline_hub_cache(tmp_path: Path, timm_name: str, state_dict: dict, images) -> dict:
    """Features of DINO ``timm_name`` loaded by name in a fresh process (the hub client reads its
    variables at import) from a Hugging Face cache laid out as huggingface_hub leaves it, holding
    ``state_dict`` as timm's ``model.safetensors``, read with ``HF_HUB_OFFLINE=1``. Returns
    ``{"ok": weights_available, "weights": identity, "features": ...}``."""
    import json
    import subprocess

    from safetensors.torch import save_file

    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / f"models--timm--{timm_name}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_file(state_dict, str(snap / "model.safetensors"))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        NOLA_MODELS_DIR=str(tmp_path / "empty_models"),
        TORCH_HOME=str(tmp_path / "empty_torch"),
        PYTHONPATH=str(REPO),
    )
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    r = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, timm_name, *map(str, images)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- review datasets

REVIEW_CLASSES = ["cat", "dog", "ship", "truck"]


def tiny_images(folder, n: int) -> list[str]:
    """``n`` distinct 8x8 PNGs (exports copy real files)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.new("RGB", (8, 8), (i * 13 % 256, i * 29 % 256, i * 53 % 256)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def review_ds(make_dataset, tmp_path):
    """16 generated images, predictions with known confidences, no ground truth, and a CLIP store
    whose vectors make sample pairs (0,1), (2,3)... near-duplicates."""
    import fiftyone as fo
    import numpy as np

    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.core.storage import index_dir
    from fiftyone_nola.stages import runs
    from fiftyone_nola.stages.review import store_class_list

    ds = make_dataset(tiny_images(tmp_path / "images", 16))  # no ground truth at all
    ids = ds.values("id")
    conf = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.55, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    preds = [REVIEW_CLASSES[i % 4] for i in range(16)]
    ds.set_values("nola", [fo.Classification(label=p, confidence=c) for p, c in zip(preds, conf)])
    ds.set_values("nola_zeroshot", [fo.Classification(label=p, confidence=c / 2) for p, c in zip(preds, conf)])
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 32))
    vecs = np.repeat(base, 2, axis=0) + rng.normal(scale=0.01, size=(16, 32))
    path = index_dir(str(ds._doc.id), "test-clip")
    ix = EmbeddingIndex.create(path, 32, {"dataset_id": str(ds._doc.id)})
    ix.add(ids, vecs.astype(np.float32))
    ix.save()
    runs.record_run(
        ds, "nola_embeddings_clip", "embeddings.clip", {"spec": None}, {"index_path": str(path), "index_size": 16}
    )
    store_class_list(ds, REVIEW_CLASSES)
    return ds


@pytest.fixture
def synthetic():
    """Factory of bulk-built datasets (no images), deleted after the test."""
    made = []

    def make(n, **kwargs):
        made.append(build_review_dataset(n, **kwargs))
        return made[-1]

    yield make
    for ds in made:
        ds.delete()
