"""medqc.models: the QC networks, their checkpoints, ``medqc train``, and the embedded default bundle.

Importing this package does not import torch (the agent imports it only to find ``default/``); torch is
imported inside :func:`build_model` and :func:`load_checkpoint`.

>>> from medqc.models import build_model, load_checkpoint, model_names
>>> model = build_model("qcnet")              # forward(x (N, C, S, S)) -> (artifact_logits (N, 5), position (N, 1))
>>> name, model, meta = load_checkpoint("models/default/qcnet.pt")
"""

from __future__ import annotations

from pathlib import Path

from medqc.errors import MedqcError

CHECKPOINT_FORMAT = "medqc.checkpoint/1"
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "default"

# name → (module, class, default kwargs)
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "qcnet": ("medqc.models.qcnet", "QCNet", {"in_channels": 4, "num_labels": 5, "width": 16}),
    "qcnet-small": ("medqc.models.qcnet", "QCNet", {"in_channels": 4, "num_labels": 5, "width": 8}),
}


class CheckpointError(MedqcError):
    """A checkpoint file is missing, corrupt, or does not match the model / labels it claims."""


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs):
    """A freshly initialised network (torch.nn.Module, train mode). Unknown name → ValueError naming the choices."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    import importlib

    mod, cls, defaults = _REGISTRY[name]
    params = {**defaults, **kwargs}
    return getattr(importlib.import_module(mod), cls)(**params)


def default_bundle_dir() -> Path:
    return DEFAULT_BUNDLE


def load_checkpoint(path, expect_labels=None):
    """Load a ``medqc.checkpoint/1`` file → (name, model in eval mode, meta).

    ``meta`` is the checkpoint dict without ``state_dict``. Raises :class:`CheckpointError` with a clear
    message for a missing, corrupt, foreign or mismatched file (wrong format tag, unknown model, labels that
    are not ``medqc.ARTIFACTS`` / ``expect_labels``, weights that do not fit the architecture)."""
    import pickle
    import zipfile

    import torch

    from medqc import ARTIFACTS

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint (corrupt or truncated?): {type(e).__name__}: {e}") from None
    except Exception as e:  # torch raises many types for foreign files
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{p}: format is {got!r}, expected {CHECKPOINT_FORMAT!r} (written by 'medqc train')")
    for key in ("model", "state_dict", "labels", "preprocess"):
        if key not in ckpt:
            raise CheckpointError(f"{p}: checkpoint has no '{key}'")
    name = ckpt["model"]
    if name not in _REGISTRY:
        raise CheckpointError(f"{p}: unknown model {name!r}; this medqc knows: {', '.join(model_names())}")
    want = list(expect_labels) if expect_labels is not None else list(ARTIFACTS)
    if list(ckpt["labels"]) != want:
        raise CheckpointError(f"{p}: labels {list(ckpt['labels'])} do not match {want}")
    try:
        from medqc.analysis.preprocess import PreprocessParams

        pp = PreprocessParams.from_dict(ckpt["preprocess"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: bad preprocessing parameters: {e}") from None
    kwargs = dict(ckpt.get("kwargs") or {})
    try:
        model = build_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot build {name!r} with {kwargs}: {e}") from None
    if getattr(model, "in_channels", pp.channels) != pp.channels:
        raise CheckpointError(f"{p}: model takes {model.in_channels} channels but preprocessing gives {pp.channels}")
    if getattr(model, "num_labels", len(want)) != len(want):
        raise CheckpointError(f"{p}: model has {model.num_labels} artifact outputs for {len(want)} labels")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[:3]
        raise CheckpointError(f"{p}: weights do not match model {name!r} {kwargs}: {' '.join(first)}") from None
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return name, model, meta


__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "build_model", "default_bundle_dir", "load_checkpoint", "model_names"]
