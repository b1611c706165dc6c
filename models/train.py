"""``medqc train``: train the QC network on synthetic CT from ``medqc.synth.training``.

Reproducible from ``--seed`` (data chunks, initialisation, batch order). Writes into ``--out``:
``qcnet.pt`` (checkpoint, ``medqc.checkpoint/1``, rewritten after every epoch), ``metrics.json`` and
``card.md`` (the model card; ``--card`` also writes it elsewhere, e.g. ``models/cards/qcnet.md``).

Validation comes from held-out seeds, and a part of it from held-out phantom parameters: slices whose
generator parameters match ``--holdout`` rules (e.g. ``patient_scale>1.15``) are removed from training and
reported separately, so the card shows how the network does on a range it never saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from medqc import ARTIFACTS
from medqc.errors import MedqcError, UsageError

log = logging.getLogger(__name__)

DEFAULT_HOLDOUT = ("patient.girth_lr>1.3", "fov_mm<200")
POSITIVE_AT = 0.1  # an artifact severity at or above this is a positive label; 0 is negative; in between is ignored


def labels_from_severity(sev: np.ndarray) -> np.ndarray:
    """1 for severity >= POSITIVE_AT, 0 for severity 0 (absent), NaN for the faint band in between (not scored)."""
    y = np.where(sev >= POSITIVE_AT, 1.0, 0.0).astype(np.float32)
    y[(sev > 0) & (sev < POSITIVE_AT)] = np.nan
    return y


# --------------------------------------------------------------------------------------------- holdout rules
def parse_rule(text: str) -> tuple[str, str, str]:
    for op in (">=", "<=", ">", "<", "="):
        if op in text:
            k, v = text.split(op, 1)
            if k.strip() and v.strip():
                return k.strip(), op, v.strip()
    raise UsageError(f"bad --holdout rule {text!r}: use KEY>NUMBER, KEY<NUMBER, KEY>=, KEY<= or KEY=VALUE (KEY may be dotted)")


def _lookup(meta: dict, key: str):
    cur = meta
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def matches(meta: dict, rule: tuple[str, str, str]) -> bool:
    k, op, v = rule
    got = _lookup(meta, k)
    if got is None:
        return False
    if op == "=":
        return str(got).lower() == v.lower()
    try:
        g, w = float(got), float(v)
    except (TypeError, ValueError):
        return False
    return {">": g > w, "<": g < w, ">=": g >= w, "<=": g <= w}[op]


def heldout_mask(metas: list, rules: list) -> np.ndarray:
    return np.array([any(matches(m or {}, r) for r in rules) for m in metas], dtype=bool)


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from medqc.models import model_names

    p.add_argument("--model", default="qcnet", help=f"network ({', '.join(model_names())}; default qcnet)")
    p.add_argument("--width", type=int, default=None, help="override the network's base width")
    p.add_argument("--out", default="runs/train", help="output folder (checkpoint, metrics.json, card.md)")
    p.add_argument("--card", default=None, help="also write the model card here (e.g. models/cards/qcnet.md)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and batch order")
    p.add_argument("--n-train", type=int, default=12000, help="training slices to generate (default 12000)")
    p.add_argument("--n-val", type=int, default=2000, help="validation slices from held-out seeds (default 2000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget for the whole run, data generation included; the training schedule shrinks to fit (0: none)")
    p.add_argument("--cache", default="data/train-cache", help="folder for the preprocessed float16 cache (reused when complete)")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from this checkpoint's weights (continue a run); recorded in the metrics")
    p.add_argument("--generator-version", default=None, metavar="V",
                   help="key the cache by this generator version instead of the installed one (reuse a cache made by an earlier generator)")
    p.add_argument("--workers", type=int, default=2, help="generator processes (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (CUDA uses automatic mixed precision)")
    p.add_argument("--preload", choices=("auto", "yes", "no"), default="auto",
                   help="hold the training cache in device memory (auto: on CUDA when it fits in half the free GPU memory); "
                        "reading batches from the disk cache otherwise bounds a GPU at ~500 slices/s")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--holdout", action="append", default=None, metavar="RULE",
                   help=f"generator parameter rule held out of training and reported separately (repeatable; default {' '.join(DEFAULT_HOLDOUT)})")
    p.add_argument("--augment", choices=("domain", "mirror"), default="domain",
                   help="domain: mirroring plus geometry, calibration and texture randomisation (models/augment.py); mirror: left-right mirroring only")
    p.add_argument("--real-negatives", action="append", default=None, metavar="DIR",
                   help="folder of real, artifact-free CT (axial CT images are read from it) mixed into batches as negatives for every "
                        "artifact class except noise; no position label (repeatable)")
    p.add_argument("--real-injected", action="append", default=None, metavar="DIR",
                   help="folder of real CT with artifacts injected (medqc synth --inject output, labelled by its truth.json), "
                        "mixed into batches beside --real-negatives; no position label (repeatable)")
    p.add_argument("--real-fraction", type=float, default=0.05,
                   help="expected share of each batch drawn from --real-negatives and --real-injected (default 0.05)")
    p.add_argument("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint as epoch-NN.pt (to choose one on real CT afterwards)")
    p.add_argument("--specificity", type=float, default=0.97, help="thresholds are chosen at this validation specificity (default 0.97)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def validate_args(args) -> None:
    from medqc.models import model_names

    if args.model not in model_names():
        raise UsageError(f"unknown --model {args.model!r}; choose one of: {', '.join(model_names())}")
    checks = [
        (args.n_train >= 8, f"--n-train must be >= 8 (got {args.n_train})"),
        (args.n_val >= 8, f"--n-val must be >= 8 (got {args.n_val})"),
        (args.epochs >= 1, f"--epochs must be >= 1 (got {args.epochs})"),
        (1 <= args.batch_size <= 4096, f"--batch-size must be 1..4096 (got {args.batch_size})"),
        (math.isfinite(args.lr) and 0 < args.lr <= 1, f"--lr must be in (0, 1] (got {args.lr})"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0 (got {args.weight_decay})"),
        (args.max_minutes >= 0, f"--max-minutes must be >= 0 (got {args.max_minutes})"),
        (args.workers >= 1, f"--workers must be >= 1 (got {args.workers})"),
        (args.threads >= 0, f"--threads must be >= 0 (got {args.threads})"),
        (0.5 <= args.specificity < 1, f"--specificity must be in [0.5, 1) (got {args.specificity})"),
        (args.device in ("auto", "cpu", "cuda"), f"--device must be one of: auto, cpu, cuda (got {args.device!r})"),
        (args.width is None or 4 <= args.width <= 256, f"--width must be 4..256 (got {args.width})"),
        (0 <= getattr(args, "real_fraction", 0.05) < 0.5, f"--real-fraction must be in [0, 0.5) (got {getattr(args, 'real_fraction', None)})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    for opt in ("real_negatives", "real_injected"):
        for d in getattr(args, opt, None) or []:
            if not Path(d).is_dir():
                raise UsageError(f"--{opt.replace('_', '-')} {d}: not a folder")
    args.holdout_rules = [parse_rule(r) for r in (args.holdout if args.holdout else DEFAULT_HOLDOUT)]


def run(args) -> int:
    validate_args(args)
    result = train(args)
    print(json.dumps({"checkpoint": str(result["checkpoint"]), "metrics": str(result["metrics_path"]),
                      "card": str(result["card_path"]), "summary": clean_json(result["summary"])}, indent=2))
    return 0


# --------------------------------------------------------------------------------------------- training
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu or auto")
    return torch.device(name)


def _predict(model, x_mm, idx, device, batch: int = 64, amp: bool = False):
    import torch

    logits, pos = [], []
    model.eval()
    with torch.no_grad():
        for a in range(0, len(idx), batch):
            xb = torch.from_numpy(np.asarray(x_mm[idx[a : a + batch]], dtype=np.float32)).to(device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                lg, ps = model(xb)
            logits.append(lg.float().cpu().numpy())
            pos.append(ps.float().cpu().numpy()[:, 0])
    return np.concatenate(logits) if logits else np.zeros((0, len(ARTIFACTS))), np.concatenate(pos) if pos else np.zeros(0)


def evaluate(model, cache, idx, device, thresholds=None, specificity=0.97, amp=False) -> tuple[dict, np.ndarray, np.ndarray]:
    from medqc.models.metrics import artifact_metrics, position_metrics

    logits, pos = _predict(model, cache.x, idx, device, amp=amp)
    y = labels_from_severity(cache.y[idx])
    m = {
        "n": int(len(idx)),
        "artifacts": artifact_metrics(list(ARTIFACTS), y, logits, thresholds, spec=0.95),
        "position": position_metrics(cache.pos[idx], pos),
    }
    return m, logits, pos


def train(args) -> dict:
    import torch
    from torch import nn
    from tqdm import tqdm

    from medqc import __version__
    from medqc.models import CHECKPOINT_FORMAT, build_model
    from medqc.models.card import write_card
    from medqc.models.data import build_cache
    from medqc.models.metrics import choose_thresholds
    from medqc.models.qcnet import count_flops, count_params
    from medqc.analysis.preprocess import PreprocessParams

    if not hasattr(args, "holdout_rules"):
        validate_args(args)
    progress = not getattr(args, "no_progress", False)
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    amp = device.type == "cuda"
    params = PreprocessParams()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(args.cache)

    # ---- real clean CT read first: a folder without CT fails before minutes of data generation
    real_np, real_names = None, []
    real_fraction = float(getattr(args, "real_fraction", 0.05) or 0.0)
    if getattr(args, "real_negatives", None):
        from medqc.models.data import real_negatives

        try:
            real_np, real_names = real_negatives(args.real_negatives, params)
        except MedqcError as e:
            raise UsageError(f"--real-negatives: {e}") from None
        log.info("real negatives: %d slices (%s), %.0f %% of each batch", len(real_np), "; ".join(real_names), 100 * real_fraction)
    inj_np, inj_sev, inj_names = None, None, []
    if getattr(args, "real_injected", None):
        from medqc.models.data import real_injected

        try:
            inj_np, inj_sev, inj_names = real_injected(args.real_injected, params)
        except MedqcError as e:
            raise UsageError(f"--real-injected: {e}") from None
        log.info("real injected: %d slices (%s)", len(inj_np), "; ".join(inj_names))

    # ---- data
    from medqc.models.data import cache_key, generator_version

    gver = args.generator_version if getattr(args, "generator_version", None) is not None else generator_version()

    t0 = time.time()
    tr = build_cache(cache_root / cache_key(args.n_train, args.seed, params, gver), args.n_train, args.seed, params, args.workers, progress, "train data")
    va = build_cache(cache_root / cache_key(args.n_val, args.seed + 1_000_003, params, gver), args.n_val, args.seed + 1_000_003, params, args.workers, progress, "val data")
    data_s = time.time() - t0
    tr_hold = heldout_mask(tr.meta, args.holdout_rules)
    va_hold = heldout_mask(va.meta, args.holdout_rules)
    train_idx = np.flatnonzero(~tr_hold)
    val_idx = np.arange(len(va))
    if len(train_idx) < 8:
        raise UsageError(f"only {len(train_idx)} training slices remain after the --holdout rules; loosen them")
    log.info("data: %d train (%d held out by parameter rules), %d val (%d in held-out ranges), %.0f s",
             len(train_idx), int(tr_hold.sum()), len(val_idx), int(va_hold.sum()), data_s)

    # ---- model
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    kwargs = {"in_channels": params.channels, "num_labels": len(ARTIFACTS)}
    if args.width:
        kwargs["width"] = args.width
    model = build_model(args.model, **kwargs)
    full_kwargs = {k: getattr(model, k) for k in ("in_channels", "num_labels")}
    full_kwargs["width"] = args.width or build_model(args.model).features[0][0].out_channels
    init = getattr(args, "init", None)
    if init:
        from medqc.models import load_checkpoint

        iname, imodel, imeta = load_checkpoint(init)
        if iname != args.model:
            raise UsageError(f"--init {init} holds {iname!r}, not --model {args.model!r}")
        model.load_state_dict(imodel.state_dict())
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    y_all = labels_from_severity(tr.y)
    w_all = np.isfinite(y_all).astype(np.float32)  # faint (ambiguous) severities do not train their class
    y_all = np.nan_to_num(y_all, nan=0.0)
    pos_all = tr.pos.astype(np.float32)
    prev = (y_all[train_idx] * w_all[train_idx]).sum(0) / np.maximum(w_all[train_idx].sum(0), 1)
    pos_weight = torch.tensor(np.clip((1 - prev) / np.maximum(prev, 1e-3), 1.0, 5.0), dtype=torch.float32, device=device)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = min(100, total_steps // 10 + 1)
    planned_steps = total_steps
    t20 = time.time()

    def epochs_left(step: int) -> int:  # validation passes still to come (one per epoch)
        return max(0, math.ceil((total_steps - step) / steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))

    # ---- batches: from the float16 memmap, or from a copy held in device memory (a GPU otherwise waits on
    # the CPU gathering and converting each batch)
    preload = getattr(args, "preload", "auto")
    if preload == "auto":
        preload = "no"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            preload = "yes" if tr.x.nbytes < 0.5 * free else "no"
    x_dev = None
    if preload == "yes":
        x_dev = torch.empty(tuple(tr.x.shape), dtype=torch.float16, device=device)
        for a in range(0, len(tr.x), 1024):
            x_dev[a : a + 1024] = torch.from_numpy(np.ascontiguousarray(tr.x[a : a + 1024])).to(device)
        log.info("training cache held in %s memory (%.1f GB float16)", device.type, tr.x.nbytes / 1e9)

    def batch_images(idx: np.ndarray, flip: np.ndarray):
        if x_dev is not None:
            xt = x_dev.index_select(0, torch.from_numpy(idx).to(device)).float()
            ft = torch.from_numpy(flip).to(device)[:, None, None, None]
            return torch.where(ft, xt.flip(-1), xt)
        xb = np.asarray(tr.x[idx], dtype=np.float32)
        xb[flip] = xb[flip][..., ::-1]
        return torch.from_numpy(np.ascontiguousarray(xb)).to(device)

    # ---- real CT: clean slices as negatives, injected ones labelled by the injector; every class trained on
    # them but noise where it is not injected (the real slice's own noise level is not known)
    real_x = real_y = real_wt = None
    pools = []
    if real_np is not None:
        w = np.ones((len(real_np), len(ARTIFACTS)), np.float32)
        w[:, ARTIFACTS.index("noise")] = 0.0
        pools.append((real_np, np.zeros((len(real_np), len(ARTIFACTS)), np.float32), w))
    if inj_np is not None:
        y = labels_from_severity(inj_sev)
        w = np.isfinite(y).astype(np.float32)
        ni = ARTIFACTS.index("noise")
        w[:, ni] *= (np.nan_to_num(y[:, ni]) == 1.0)
        pools.append((inj_np, np.nan_to_num(y, nan=0.0), w))
    if pools:
        real_x = torch.from_numpy(np.concatenate([p[0] for p in pools])).to(device)
        real_y = torch.from_numpy(np.concatenate([p[1] for p in pools])).to(device)
        real_wt = torch.from_numpy(np.concatenate([p[2] for p in pools])).to(device)
    augment = None
    if getattr(args, "augment", "mirror") == "domain":
        from medqc.models.augment import DomainAugment

        augment = DomainAugment(params)

    history = []
    step = 0
    budget_s = args.max_minutes * 60.0
    t_opt = time.time()
    ckpt_path = out / "qcnet.pt"
    thresholds = {a: 0.5 for a in ARTIFACTS}
    bar = tqdm(total=total_steps, desc="train", unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    epoch = 0
    stopped_early = False
    while step < total_steps:
        model.train()
        order = rng.permutation(train_idx)
        run_loss, run_n = 0.0, 0
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = np.sort(order[b * args.batch_size : (b + 1) * args.batch_size])
            flip = rng.random(len(idx)) < 0.5  # left-right mirror: artifacts and level are unchanged
            xt = batch_images(idx, flip)
            if device.type == "cpu":
                xt = xt.contiguous(memory_format=torch.channels_last)
            yt = torch.from_numpy(y_all[idx]).to(device)
            wt = torch.from_numpy(w_all[idx]).to(device)
            pt = torch.from_numpy(pos_all[idx]).to(device)
            if real_x is not None and real_fraction > 0:
                k = int(rng.binomial(len(idx), real_fraction))
                if k:  # the last k rows become real slices (mirrored at random like the rest)
                    r = torch.from_numpy(rng.integers(0, len(real_x), k)).to(device)
                    xr = real_x.index_select(0, r).float()
                    xr = torch.where(torch.from_numpy(rng.random(k) < 0.5).to(device)[:, None, None, None], xr.flip(-1), xr)
                    xt = torch.cat([xt[: len(idx) - k], xr.to(xt.dtype)], 0)
                    yt = torch.cat([yt[: len(idx) - k], real_y.index_select(0, r)], 0)
                    wt = torch.cat([wt[: len(idx) - k], real_wt.index_select(0, r)], 0)
                    pt = torch.cat([pt[: len(idx) - k], torch.full((k,), float("nan"), device=device)], 0)
            if augment is not None:
                xt, keep = augment(xt, rng)
                wt = wt * keep
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                logits, pos = model(xt)
            logits, pos = logits.float(), pos.float()[:, 0]
            loss_a = (bce(logits, yt) * wt).sum() / wt.sum().clamp(min=1.0)
            ok = torch.isfinite(pt)
            if bool(ok.any()):
                loss_p = nn.functional.smooth_l1_loss(pos[ok] / 100.0, pt[ok] / 100.0, beta=0.5)
            else:
                loss_p = logits.sum() * 0.0
            loss = loss_a + 0.5 * loss_p
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            step += 1
            run_loss += float(loss.detach())
            run_n += 1
            if step % 10 == 0:
                history.append({"step": step, "loss": run_loss / run_n, "loss_artifacts": float(loss_a.detach()), "loss_position": float(loss_p.detach())})
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}")
            bar.update(1)
            if step == 20:
                t20 = time.time()
            if budget_s > 0 and step >= 50 and (step == 50 or step % 100 == 0):
                # fit the schedule to the time budget; the rate is measured after the first (slow) steps and
                # re-measured as the run goes, so a pessimistic early estimate does not cut the run short
                per_step = (time.time() - t20) / (step - 20)
                left = budget_s - (time.time() - t_start) - 90.0 - 0.4 * len(val_idx) * per_step / args.batch_size * (epochs_left(step) + 3)
                fit = max(step + 1, int(left / per_step) + step)
                new_total = min(planned_steps, fit)
                if new_total != total_steps and abs(new_total - total_steps) > 0.02 * total_steps:
                    log.info("time budget: %d of %d planned steps fit (%.2f s/step)", new_total, planned_steps, per_step)
                    total_steps = new_total
                    bar.total = total_steps
                    stopped_early = total_steps < planned_steps
        epoch += 1
        m, logits, _ = evaluate(model, va, val_idx, device, amp=amp)
        thresholds = choose_thresholds(list(ARTIFACTS), labels_from_severity(va.y[val_idx]), logits, args.specificity)
        ep = {"epoch": epoch, "step": step, "train_loss": run_loss / max(1, run_n),
              "val_auroc": {k: v["auroc"] for k, v in m["artifacts"].items()},
              "val_position_median_abs_mm": m["position"].get("median_abs_mm")}
        history.append(ep)
        log.info("epoch %d: %s", epoch, json.dumps(ep))
        _save(ckpt_path, args, model, full_kwargs, params, thresholds, {"val": m}, __version__, CHECKPOINT_FORMAT, step)
        if getattr(args, "keep_epochs", False):
            import shutil

            shutil.copyfile(ckpt_path, out / f"epoch-{epoch:02d}.pt")
    bar.close()
    train_s = time.time() - t_opt

    # ---- final evaluation
    final, logits, pos = evaluate(model, va, val_idx, device, thresholds, amp=amp)
    parts = {"all": final}
    if va_hold.any():
        parts["heldout_params"] = evaluate(model, va, np.flatnonzero(va_hold), device, thresholds, amp=amp)[0]
        parts["in_range"] = evaluate(model, va, np.flatnonzero(~va_hold), device, thresholds, amp=amp)[0]
    model_cpu = model.float().to("cpu").to(memory_format=torch.contiguous_format).eval()
    flops = count_flops(model_cpu, (params.channels, params.size, params.size))
    metrics = {
        "model": args.model,
        "kwargs": full_kwargs,
        "params": count_params(model_cpu),
        "flops_per_slice": flops,
        "seed": args.seed,
        "n_train": int(len(train_idx)),
        "n_train_generated": int(len(tr)),
        "n_val": int(len(val_idx)),
        "n_val_heldout_params": int(va_hold.sum()),
        "holdout_rules": ["".join(r) for r in args.holdout_rules],
        "positive_at_severity": POSITIVE_AT,
        "threshold_specificity": args.specificity,
        "thresholds": thresholds,
        "steps": step,
        "epochs": epoch,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule_shortened_by_time_budget": stopped_early,
        "device": str(device),
        "amp": amp,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "validation": parts,
        "history": history,
        "augment": augment.describe() if augment is not None else "mirror",
        "real_negatives": {"series": real_names, "slices": int(len(real_np)) if real_np is not None else 0,
                           "batch_fraction": real_fraction if real_x is not None else 0.0},
        "real_injected": {"series": inj_names, "slices": int(len(inj_np)) if inj_np is not None else 0},
        "train_label_prevalence": {a: float(prev[k]) for k, a in enumerate(ARTIFACTS)},
        "data_summary": summarise_meta([tr.meta[i] for i in train_idx]),
        "heldout_summary": summarise_meta([va.meta[i] for i in np.flatnonzero(va_hold)]),
        "generator_doc": _generator_doc(),
        "generator_version": gver,
        "init": {"checkpoint": str(init), "version": imeta.get("version"), "steps": (imeta.get("metrics") or {}).get("steps")} if init else None,
        "generator_version_installed": generator_version(),
    }
    try:
        metrics["ort_cpu"] = bench_onnx(model_cpu, params)
    except Exception as e:  # benchmarking is a report figure, not a reason to lose the run
        metrics["ort_cpu"] = {"error": f"{type(e).__name__}: {e}"}
    _save(ckpt_path, args, model_cpu, full_kwargs, params, thresholds, _slim(metrics), __version__, CHECKPOINT_FORMAT, step)
    metrics_path = out / "metrics.json"
    metrics = clean_json(metrics)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    card_path = out / "card.md"
    write_card(card_path, metrics)
    if args.card:
        Path(args.card).parent.mkdir(parents=True, exist_ok=True)
        write_card(Path(args.card), metrics)
    log.info("done in %.0f s", time.time() - t_start)
    return {"checkpoint": ckpt_path, "metrics_path": metrics_path, "card_path": card_path, "metrics": metrics,
            "summary": {k: v["auroc"] for k, v in final["artifacts"].items()} | {"position_median_abs_mm": final["position"].get("median_abs_mm")}}


def _generator_doc() -> str:
    try:
        import medqc.synth.training as tr

        return " ".join((tr.__doc__ or "").split())
    except ImportError:
        return ""


def clean_json(v):
    """Plain JSON (NaN/inf → null, numpy scalars → numbers)."""
    if isinstance(v, dict):
        return {str(k): clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_json(x) for x in v]
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, str):
        return str(v)  # plain str (e.g. torch.__version__ is a str subclass that weights-only loading refuses)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    return str(v)


def _slim(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("history", "data_summary", "heldout_summary")}


def _save(path: Path, args, model, kwargs, params, thresholds, metrics, version, fmt, step) -> None:
    import torch

    sd = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format": fmt,
        "model": args.model,
        "kwargs": dict(kwargs),
        "state_dict": sd,
        "preprocess": params.to_dict(),
        "labels": list(ARTIFACTS),
        "thresholds": dict(thresholds),
        "version": f"{version}+{args.model}.s{args.seed}.step{step}",
        "metrics": clean_json(metrics),
        "seed": args.seed,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def summarise_meta(metas: list) -> dict:
    """Which generator parameters varied, and over what range (numbers) or which values (categories)."""
    keys: dict[str, list] = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, name + ".")
            elif isinstance(v, (list, tuple)):
                if v and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v) and len(v) <= 3:
                    for i, t in enumerate(v):
                        keys.setdefault(f"{name}[{i}]", []).append(t)
            else:
                keys.setdefault(name, []).append(v)

    for m in metas:
        if isinstance(m, dict):
            walk(m)
    out = {}
    for k, vals in sorted(keys.items()):
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len(vals):
            arr = np.asarray(nums, dtype=np.float64)
            out[k] = {"min": float(arr.min()), "max": float(arr.max()), "distinct": int(len(np.unique(arr)))}
        else:
            uniq: dict[str, int] = {}
            for v in vals:
                uniq[str(v)] = uniq.get(str(v), 0) + 1
            if len(uniq) <= 24:
                out[k] = {"values": uniq}
            else:
                out[k] = {"distinct": len(uniq)}
    return out


def bench_onnx(model, params, batch: int = 16, threads: int = 2, reps: int = 10) -> dict:
    """Export the model as a bundle graph (its preprocessing in front: ``medqc export onnx``'s graph) to a
    temporary file and time ONNX Runtime CPU on 512² slices (``threads`` threads, batch ``batch``)."""
    import tempfile

    import onnxruntime as ort
    import torch

    from medqc.export.onnx_export import export_onnx, slice_model
    from medqc.export.specs import ExportSpec
    from medqc.models.ship import bench_file

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        export_onnx(slice_model(model, params), ExportSpec(model="train"), params, p)
        res = bench_file(p, params, batch=batch, threads=threads, reps=reps)
    return {**res, "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "torch": torch.__version__}
