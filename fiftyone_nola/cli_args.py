"""The shell's flags: one parser per command of :mod:`fiftyone_nola.cli`. A flag not given is None,
so each default lives in the library's configs and the help shows it from there."""

from __future__ import annotations

import argparse

from fiftyone_nola.core.models import ClipSpec
from fiftyone_nola.core.transductive.config import METHODS as TRANSDUCTIVE_METHODS


def _clip_args(p: argparse.ArgumentParser, device_help: str = "cpu, cuda, cuda:1, ... (default: auto)"):
    """CLIP, local weights, random init and device options; returns the group for more."""
    g = p.add_argument_group("models")
    g.add_argument("--clip-arch", default=None, help=f"open_clip architecture (default {ClipSpec.arch})")
    g.add_argument(
        "--clip-pretrained",
        default=None,
        help=f"open_clip pretrained tag or a local checkpoint file (default {ClipSpec.pretrained})",
    )
    g.add_argument("--models-dir", default=None, help="directory of local weights (default: NOLA_MODELS_DIR)")
    g.add_argument(
        "--random-init",
        action="store_true",
        default=None,
        help="randomly initialised models (smoke runs: labels are meaningless)",
    )
    g.add_argument("--device", default=None, help=device_help)
    g.add_argument(
        "--engine",
        choices=["auto", "torch", "openvino"],
        default=None,
        help="what runs the inference passes (embedding, crop scoring, prediction): auto = "
        "measured on your images: PyTorch or OpenVINO (fp32; bf16/int8 where the CPU has them), "
        "the fastest that agrees with PyTorch fp32; torch turns the engine off",
    )
    g.add_argument(
        "--engine-precision",
        choices=["auto", "fp32", "bf16", "int8"],
        default=None,
        help="inference precision: auto = what the engine's measurement keeps; fp32 = measure fp32 "
        "only; bf16/int8 = asked for without a check (int8 calibrated on 64 of your images). "
        "Training is unaffected",
    )
    return g


def _model_args(p: argparse.ArgumentParser) -> None:
    g = _clip_args(p)
    g.add_argument(
        "--dino",
        default=None,
        help="timm DINO model name (auto: vit_base_patch16_224.dino on a GPU as in the paper, "
        "vit_small_patch16_224.dino on a CPU)",
    )
    g.add_argument("--dino-checkpoint", default=None, help="local DINO weights file")
    g.add_argument(
        "--fallback-random-init",
        action="store_true",
        help="if no weights can be found, warn loudly and continue with random init",
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--images", help="folder of images to import (recursively)")
    g.add_argument("--dataset", help="FiftyOne dataset name (created from --images if needed)")
    g.add_argument("--classes", help="comma-separated class names")
    g.add_argument("--classes-file", help="text file with one class name per line")
    g.add_argument("--gt-field", default=None, help="ground-truth field, for evaluation only")
    g.add_argument(
        "--gt-from-subfolders",
        metavar="FIELD",
        default=None,
        help="when importing, store each image's folder name in FIELD (evaluation only)",
    )
    g.add_argument("--max-samples", type=int, default=None, help="import at most this many images")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--json", dest="json_out", default=None, help="write the summary as JSON here")
    g.add_argument(
        "--check",
        action="store_true",
        help="only check the inputs and print the plan (stages to run or reuse, time, disk); writes nothing",
    )


def _audit_args(sub) -> None:
    from fiftyone_nola.core.audit.config import METHODS, AuditConfig
    from fiftyone_nola.core.audit.designs import KINDS

    d = AuditConfig()
    p = sub.add_parser(
        "audit",
        help="a random audit of the labels: draw it, report accuracy with intervals and a certified threshold",
        description="Draw a random audit (--draw N), report on it once decided in the App (--report), or "
        "simulate one from a ground-truth field (--simulate-from FIELD --draw N).",
    )
    p.add_argument("--dataset", required=True, help="FiftyOne dataset name")
    p.add_argument("--field", default=None, help="predictions field (default: nola; --report: the audited one)")
    p.add_argument("--draw", type=int, default=None, metavar="N", help="draw about N samples for audit")
    p.add_argument("--seed", type=int, default=None, help="random seed of the draw (default 0)")
    p.add_argument("--replace", action="store_true", help="replace the dataset's existing audit with a new draw")
    p.add_argument("--report", action="store_true", help="print the estimates and the certificate of the audit")
    p.add_argument(
        "--simulate-from",
        metavar="GT_FIELD",
        default=None,
        help="answer a fresh audit of --draw N from this ground-truth field instead of a person (writes nothing)",
    )
    p.add_argument("--flag-uncertified", action="store_true", help="queue for review what the certificate leaves")
    p.add_argument("--design", choices=list(KINDS), default=None, help=f"sampling design (default {d.design})")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help="estimator (default: the design's own; ppi_calibrated: PPI with the confidence calibrated on a "
        "uniform audit by cross-fitting)",
    )
    p.add_argument("--target", type=float, default=None, help=f"accuracy to certify (default {d.target})")
    p.add_argument("--delta", type=float, default=None, help=f"certificate error probability (default {d.delta})")
    p.add_argument("--alpha", type=float, default=None, help=f"intervals are 1 - alpha (default {d.alpha})")
    p.add_argument("--json", dest="json_out", default=None, help="write the report as JSON here")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m fiftyone_nola``."""
    ap = argparse.ArgumentParser(
        prog="python -m fiftyone_nola",
        description="Label-free auto-labeling of image datasets for FiftyOne (NoLA, CDUL).",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("auto-label", help="single-label: embeddings, zero-shot, DINO labeller, prompt tuning")
    _data_args(p)
    _model_args(p)
    p.add_argument("--descriptions", default=None, help="LaFTer/NoLA description JSON {class: [texts]}")
    p.add_argument(
        "--allow-template-fallback",
        action="store_true",
        help="classes the descriptions file lacks get CLIP template descriptions (else an error)",
    )
    p.add_argument(
        "--max-descriptions", type=int, default=None, help="use at most N descriptions per class (default: all)"
    )
    p.add_argument(
        "--templates",
        default=None,
        metavar="SET|FILE",
        help="template set added to the descriptions: auto (the official code's choice: cifar10 "
        "for CIFAR-10's classes, else imagenet), a preset (cifar10, cifar100, imagenet, "
        "imagenet80, satellite, textures, flowers, pets, cars, sun397, ucf101, simple, none) "
        "or a file (JSON list or one template per line)",
    )
    p.add_argument(
        "--no-templates", action="store_true", help="class embeddings from descriptions only (same as --templates none)"
    )
    p.add_argument("--use-llm", action="store_true", help="write descriptions with a local LLM (Ollama)")
    p.add_argument("--llm-model", default=None, help="Ollama model (default: the library's)")
    p.add_argument("--ollama-host", default=None)
    p.add_argument("--epochs", type=int, default=None, help="prompt-tuning epochs (default: fit hardware)")
    p.add_argument(
        "--tune-max-samples",
        type=int,
        default=None,
        help="prompt-tune on at most N samples (default: fit hardware; 0 = all)",
    )
    p.add_argument("--no-tune", action="store_true", help="stop after the DINO labeller")
    p.add_argument(
        "--refine",
        choices=list(TRANSDUCTIVE_METHODS),
        default=None,
        help="also label transductively from the stored vectors, in seconds and without training "
        "(TransCLIP with its StatA safeguard, or ZLaP) into nola_transductive",
    )
    p.add_argument(
        "--refine-from",
        default=None,
        metavar="FIELD",
        help="start the refinement from this field's predictions (e.g. nola; TransCLIP only; default: zero-shot)",
    )
    p.add_argument("--force", action="store_true", help="recompute stages even if up to date")

    p = sub.add_parser("auto-label-multilabel", help="multi-label (CDUL): global + local CLIP scores, classifier")
    _data_args(p)
    _model_args(p)
    p.add_argument("--descriptions", default=None)
    p.add_argument(
        "--allow-template-fallback",
        action="store_true",
        help="classes the descriptions file lacks get CLIP template descriptions (else an error)",
    )
    p.add_argument("--grid", type=int, default=None, help="crop grid n x n (default: the library's)")

    p = sub.add_parser("embed", help="compute CLIP and/or DINO embeddings into FAISS indexes")
    _data_args(p)
    _model_args(p)
    p.add_argument("--family", choices=["clip", "dino", "both"], default="both")
    p.add_argument("--exact-decode", action="store_true", help="no JPEG draft decoding")
    p.add_argument(
        "--index-type", default=None, help="flat (exact), ivf, hnsw or ivfpq (compressed, for millions of images)"
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        nargs="?",
        const="",
        default=None,
        help="embed on a Ray cluster (its address, e.g. HEAD:6379; none: RAY_ADDRESS or a "
        "local Ray); needs pip install 'fiftyone-nola[ray]'",
    )
    p.add_argument("--ray-actors", type=int, default=None, help="Ray actors (default: one per GPU/CPU)")

    p = sub.add_parser(
        "tune",
        help="prompt tuning + predict on a dataset that has DINO labels; "
        "multi-GPU: torchrun --nproc_per_node=N -m fiftyone_nola tune",
    )
    p.add_argument("--dataset", required=True, help="dataset already labelled by auto-label --no-tune")
    p.add_argument("--epochs", type=int, default=None, help="default: fit hardware")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch, split over torchrun processes (default: fit hardware)",
    )
    p.add_argument(
        "--tune-max-samples", type=int, default=None, help="tune on at most N samples (default: fit hardware; 0 = all)"
    )
    p.add_argument("--workers", type=int, default=None, help="loader workers per process")
    p.add_argument("--no-predict", action="store_true", help="only tune and save the model")
    p.add_argument("--json", dest="json_out", default=None, help="write the summary as JSON here")
    p.add_argument("--check", action="store_true", help="only check the inputs; writes nothing")
    _clip_args(p, device_help="cpu or cuda (each torchrun process takes cuda:LOCAL_RANK)")

    _audit_args(sub)

    p = sub.add_parser("plugin", help="the FiftyOne plugin shipped with this package")
    p.add_argument(
        "action", choices=["install"], help="install: link the plugin into FiftyOne's plugins directory (idempotent)"
    )
    p.add_argument(
        "--plugins-dir",
        default=None,
        help="default: FiftyOne's plugins_dir (FIFTYONE_PLUGINS_DIR, ~/fiftyone/__plugins__)",
    )
    p.add_argument("--copy", action="store_true", help="copy the plugin instead of a symbolic link")
    return ap
