"""`voxauth attacks features`, `fit-backend` and `calibrate`: the PAD back-end's recipe and
its thresholds.

1. `features CORPUS --out FILE`: every item of the attack corpus through the countermeasure as
   the service runs it (OpenVINO export), keeping per item the raw score (mean bona-fide logit
   of its windows) and the back-end's input (models.pad_backend.check_features). One pass over
   the corpus serves fitting, calibration and the published figures.
2. `fit-backend CORPUS --features FILE [FILE ...]`: per channel and kind of attack, an
   L2-regularised logistic regression of bona fide against that kind on the FIT split only
   (every view of it given: whole items, their first 4 s); the regularisation is chosen by
   leave-speakers-out cross-validation within the fit split (folds by speaker, so that no
   speaker is on both sides of a fold). Written to models/scoring/pad_backend.json with its
   provenance. `voxauth attacks calibrate CORPUS --features FILE` then sets the thresholds from
   the calibration split, and `voxauth attacks evaluate` reports on the test split.

Deterministic: Newton's method on a convex loss from zero, folds by a hash of the speaker id,
features from a deterministic corpus, so the same corpus gives the same file (up to the
floating point of the CPU's inference precision, bfloat16 on this machine's reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf

from models.pad_backend import BACKEND_FORMAT, SPECTRAL_DIM, LinearModel
from server.pipeline.channel import Channel
from server.pipeline.presentation import PAD_CALIBRATION_FORMAT, ChannelCalibration
from server.tools.attack_corpus import (
    CORPUS_FILE,
    GENUINE_KINDS,
    Item,
    Split,
    load_items,
)

FEATURES_FORMAT = "voxauth-pad-features/1"
_FOLDS = 5
_PENALTIES = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""L2 penalties tried (on standardised features; the loss is summed over items)."""

Matrix = npt.NDArray[np.float64]
Vector = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ItemFeatures:
    raw: float
    features: Vector


def extract(
    corpus: Path,
    items: Sequence[Item],
    *,
    workers: int = 2,
    precision: str | None = None,
    max_seconds: float | None = None,
) -> dict[str, ItemFeatures]:
    """Every item through the countermeasure; `max_seconds` keeps only the start of each (a
    check at the service's minimum speech is shorter than the corpus's 8 s)."""
    from models.aasist_countermeasure import AasistCountermeasure
    from models.fetch import default_countermeasure_dir

    countermeasure = AasistCountermeasure.load(
        default_countermeasure_dir(), workers=workers, precision=precision
    )

    def one(item: Item) -> tuple[str, ItemFeatures]:
        waveform, rate = sf.read(corpus / item.path, dtype="float32")
        if max_seconds is not None:
            waveform = waveform[: int(max_seconds * rate)]
        # As the service judges a check: one function, so the two cannot drift apart.
        evidence = countermeasure.evidence(waveform)
        return item.path, ItemFeatures(evidence.raw_score, evidence.features)

    found: dict[str, ItemFeatures] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for number, (path, features) in enumerate(pool.map(one, items), start=1):
            found[path] = features
            if number % 200 == 0:
                _say(f"{number}/{len(items)} items ({time.perf_counter() - started:.0f} s)")
    return found


def save_features(
    path: Path, found: dict[str, ItemFeatures], model_id: str, max_seconds: float | None
) -> None:
    paths = sorted(found)
    np.savez_compressed(
        path,
        format=np.array(FEATURES_FORMAT),
        model_id=np.array(model_id),
        max_seconds=np.array(0.0 if max_seconds is None else max_seconds),
        paths=np.array(paths),
        raw=np.array([found[p].raw for p in paths]),
        features=np.stack([found[p].features for p in paths]),
    )


def features_max_seconds(path: Path) -> float | None:
    """How much of each item the features file saw (None: all of it)."""
    with np.load(path) as data:
        seconds = float(data["max_seconds"])
    return seconds or None


def load_features(path: Path) -> dict[str, ItemFeatures]:
    with np.load(path) as data:
        if str(data["format"]) != FEATURES_FORMAT:
            raise ValueError(f"{path} is not a PAD features file ({FEATURES_FORMAT})")
        return {
            str(p): ItemFeatures(float(r), np.asarray(f, dtype=np.float64))
            for p, r, f in zip(data["paths"], data["raw"], data["features"], strict=True)
        }


def fit_logistic(x: Matrix, y: Vector, weights: Vector, penalty: float) -> tuple[Vector, float]:
    """Weighted L2 logistic regression by Newton's method (the loss is convex: from zero it
    converges to the one minimum). x is standardised; the bias is not penalised."""
    design = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(design.shape[1])
    ridge = np.full(design.shape[1], penalty)
    ridge[-1] = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (weights * (p - y)) + ridge * theta
        hessian = (design * (weights * p * (1 - p))[:, None]).T @ design + np.diag(ridge + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def _balanced(y: Vector) -> Vector:
    """Each class weighs as much in total as the other: six attack kinds against one genuine
    kind would otherwise pull the boundary into the genuine speech."""
    positives = y.sum()
    weights: Vector = np.where(
        y == 1, len(y) / (2 * positives), len(y) / (2 * (len(y) - positives))
    )
    return weights


def fold_of(speaker: str) -> int:
    return int(hashlib.sha256(f"voxauth-pad-folds-v1:{speaker}".encode()).hexdigest(), 16) % _FOLDS


def _standardise(x: Matrix) -> tuple[Vector, Vector]:
    scale = x.std(axis=0)
    return x.mean(axis=0), np.where(scale > 1e-9, scale, 1.0)


def fit_channel(
    examples: Sequence[tuple[Item, ItemFeatures]],
) -> tuple[LinearModel, dict[str, Any]]:
    """The channel's model, from its fit-split items, with the cross-validation behind the
    chosen penalty."""
    items = [item for item, _ in examples]
    x = np.stack([features.features for _, features in examples])
    y = np.array([1.0 if i.kind in GENUINE_KINDS else 0.0 for i in items])
    folds = np.array([fold_of(i.speaker) for i in items])
    losses: dict[float, float] = {}
    held_out: dict[float, Vector] = {}
    for penalty in _PENALTIES:
        total = 0.0
        logits_of = np.zeros(len(items))
        for fold in range(_FOLDS):
            train, held = folds != fold, folds == fold
            mean, scale = _standardise(x[train])
            w, b = fit_logistic((x[train] - mean) / scale, y[train], _balanced(y[train]), penalty)
            logits = ((x[held] - mean) / scale) @ w + b
            logits_of[held] = logits
            p = np.clip(1.0 / (1.0 + np.exp(-logits)), 1e-9, 1 - 1e-9)
            balance = _balanced(y[held])
            total += float(-(balance * (y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p))).sum())
        losses[penalty] = total / len(items)
        held_out[penalty] = logits_of
    chosen = min(losses, key=lambda p: (losses[p], -p))
    mean, scale = _standardise(x)
    w, b = fit_logistic((x - mean) / scale, y, _balanced(y), chosen)
    # In units of the genuine items' spread, measured out of fold (a model's scores on its own
    # training items are too confident): the models of the different kinds are then on one
    # scale, and the lowest of them is how far the check is below genuine speech against the
    # kind it most resembles.
    genuine = held_out[chosen][y == 1]
    centre, spread = float(np.mean(genuine)), float(np.std(genuine, ddof=1))
    return LinearModel(mean, scale, w / spread, (b - centre) / spread), {
        "items": len(items),
        "bona_fide": int(y.sum()),
        "speakers": len({i.speaker for i in items}),
        "penalty": chosen,
        "cross_validated_loss": {f"{p:g}": round(v, 4) for p, v in losses.items()},
        "held_out_genuine_logit": {"mean": round(centre, 4), "sd": round(spread, 4)},
    }


def fit_backend(
    corpus: Path,
    views: Sequence[dict[str, ItemFeatures]],
    countermeasure_id: str,
    channels: Sequence[Channel] = tuple(Channel),
) -> dict[str, Any]:
    """Fitted on every view of the fit split's items (the whole items, and e.g. their first
    seconds), so that one model serves checks of any length."""
    document = json.loads((corpus / CORPUS_FILE).read_text())
    fit_items = [i for i in load_items(corpus) if i.split is Split.FIT]
    examples = [(i, found[i.path]) for found in views for i in fit_items if i.path in found]
    kinds = sorted({i.kind for i, _ in examples} - set(GENUINE_KINDS))
    fitted: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    for channel in channels:
        fitted[channel.value], provenance[channel.value] = {}, {}
        for kind in kinds:
            model, details = fit_channel(
                [
                    e
                    for e in examples
                    if e[0].channel is channel and e[0].kind in (*GENUINE_KINDS, kind)
                ]
            )
            fitted[channel.value][kind] = model.as_json()
            provenance[channel.value][kind] = details
    return {
        "format": BACKEND_FORMAT,
        "countermeasure_id": countermeasure_id,
        "features": "mean AASIST readout of the windows (160), then models.pad_backend."
        f"spectral_features of the check ({SPECTRAL_DIM})",
        "score": "the lowest of the log-odds of bona fide against each kind of attack: per "
        "channel and kind, a logistic regression of the fit split's bona-fide items against "
        "that kind's, classes balanced",
        "channels": fitted,
        "provenance": {
            "command": "voxauth attacks fit-backend CORPUS --features FILE [FILE ...]",
            "corpus": corpus_provenance(document),
            "split": Split.FIT.value,
            "speakers": sorted({i.speaker for i, _ in examples}),
            "views": len(views),
            "fit": provenance,
        },
    }


def corpus_provenance(document: dict[str, Any]) -> dict[str, Any]:
    """What made the corpus a file was fitted or calibrated on: its seed and item length, and
    (from format 2 and 3 on) its line conditions' share and its telephone paths."""
    made = {"seed": document["seed"], "max_seconds": document["max_seconds"]}
    for key in ("line_share", "telephone_paths"):
        if key in document:
            made[key] = document[key]
    return made


def calibration_channels(
    scores: dict[Item, float], split: Split = Split.CALIBRATION
) -> dict[Channel, ChannelCalibration]:
    """Per channel, the mean and standard deviation of the genuine items' scores of `split`,
    from which a threshold for any target BPCER follows."""
    channels: dict[Channel, ChannelCalibration] = {}
    for channel in Channel:
        genuine = np.array(
            [
                s
                for i, s in scores.items()
                if i.split is split and i.channel is channel and i.kind in GENUINE_KINDS
            ],
            dtype=np.float64,
        )
        if len(genuine) < 2:
            raise ValueError(f"too few genuine {channel.value} calibration items: {len(genuine)}")
        channels[channel] = ChannelCalibration(
            round(float(np.mean(genuine)), 4),
            round(float(np.std(genuine, ddof=1)), 4),
            len(genuine),
        )
    return channels


def pad_calibration(
    scores: dict[Item, float], model_id: str, provenance: dict[str, Any], *, score: str
) -> dict[str, Any]:
    """The document the server loads (server.pipeline.presentation.PadCalibration). Only
    calibration-split items count."""
    return {
        "format": PAD_CALIBRATION_FORMAT,
        "model_id": model_id,
        "score": score,
        "threshold": "genuine_mean + genuine_sd * Phi^-1(target BPCER): a normal model of the "
        "genuine scores of the channel",
        "channels": {
            channel.value: {
                "genuine_mean": entry.mean,
                "genuine_sd": entry.sd,
                "count": entry.count,
            }
            for channel, entry in calibration_channels(scores).items()
        },
        "provenance": provenance,
    }


def _calibrate(args: argparse.Namespace) -> int:
    """Thresholds of the countermeasure as the service runs it: through the shipped (or
    --backend) back-end, from the features of the calibration split's genuine items."""
    from models.aasist import READOUT_DIM
    from models.countermeasure import judged_id
    from models.manifest import AASIST_MANIFEST
    from models.pad_backend import PadBackEnd, default_backend_path

    document = json.loads((args.corpus / CORPUS_FILE).read_text())
    genuine = [
        i
        for i in load_items(args.corpus)
        if i.split is Split.CALIBRATION and i.kind in GENUINE_KINDS
    ]
    backend = PadBackEnd.load(
        args.backend or default_backend_path(),
        judged_id(AASIST_MANIFEST.model_id),
        READOUT_DIM + SPECTRAL_DIM,
    )
    views = (
        [load_features(path) for path in args.features]
        if args.features
        else [extract(args.corpus, genuine)]
    )
    # One entry per view of each item: the items are keys, so each view gets its own copy.
    scores = {
        dataclasses.replace(i, path=f"{i.path}#{number}"): backend.score(
            i.channel.value, found[i.path].features, found[i.path].raw
        )
        for number, found in enumerate(views)
        for i in genuine
    }
    provenance = {
        "command": "voxauth attacks calibrate CORPUS"
        + (
            " --features FILE [FILE ...] (of `voxauth attacks features CORPUS [--max-seconds S]`)"
            if args.features
            else ""
        ),
        "corpus": corpus_provenance(document),
        "split": Split.CALIBRATION.value,
        "speakers": sorted({i.speaker for i in genuine}),
        "kinds": list(GENUINE_KINDS),
        "views": len(views),
    }
    calibration = pad_calibration(
        scores,
        backend.model_id,
        provenance,
        score="the PAD back-end's log-odds of bona fide for the check's channel "
        "(models/pad_backend.py) over AASIST's readout of the 64,600-sample windows covering the "
        "audio as it arrived (pauses included, those over a second cut to one: "
        "models.countermeasure.judged_audio; OpenVINO at the CPU's native precision) and the "
        "check's spectral statistics",
    )
    args.out.write_text(json.dumps(calibration, indent=1) + "\n")
    for channel, entry in calibration["channels"].items():
        _say(
            f"{channel}: {entry['count']} genuine items, mean {entry['genuine_mean']:+.3f}, "
            f"sd {entry['genuine_sd']:.3f}"
        )
    _say(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth attacks", description="the PAD back-end and its thresholds"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    calibrate = commands.add_parser(
        "calibrate", help="set the countermeasure's per-channel thresholds (calibration split)"
    )
    calibrate.add_argument("corpus", type=Path)
    calibrate.add_argument(
        "--out", type=Path, default=Path("models/scoring/pad_calibration.json"), help="written"
    )
    calibrate.add_argument(
        "--features",
        type=Path,
        nargs="+",
        help="from earlier `voxauth attacks features` runs, instead of scoring again; several "
        "views (whole items, their first 4 s) are pooled, so the thresholds hold for checks of "
        "either length",
    )
    calibrate.add_argument("--backend", type=Path, help="default: the shipped PAD back-end")
    _add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        return _calibrate(args)
    return _run(args)


def _add_commands(commands: Any) -> None:
    features = commands.add_parser(
        "features", help="the countermeasure's raw score and back-end input for every item"
    )
    features.add_argument("corpus", type=Path)
    features.add_argument("--out", type=Path, required=True, help="written (.npz)")
    features.add_argument("--split", nargs="+", choices=[s.value for s in Split])
    features.add_argument("--workers", type=int, default=2)
    features.add_argument(
        "--max-seconds", type=float, help="only the first seconds of each item (default: all)"
    )
    features.add_argument("--precision", choices=["f32", "bf16"], help="default: the CPU's native")
    fit = commands.add_parser("fit-backend", help="fit the PAD back-end on the fit split")
    fit.add_argument("corpus", type=Path)
    fit.add_argument(
        "--features",
        type=Path,
        nargs="+",
        required=True,
        help="from `voxauth attacks features` (several: one view each, e.g. --max-seconds 4)",
    )
    fit.add_argument(
        "--out", type=Path, default=Path("models/scoring/pad_backend.json"), help="written"
    )
    fit.add_argument(
        "--channels",
        nargs="+",
        choices=[c.value for c in Channel],
        default=[Channel.WIDEBAND.value],
        help="channels to fit (default: wideband; the others keep the network's raw score; fit "
        "telephone on a corpus built with --telephone-paths varied)",
    )


def _run(args: argparse.Namespace) -> int:
    from models.countermeasure import judged_id
    from models.manifest import AASIST_MANIFEST

    if args.command == "features":
        items = [
            i for i in load_items(args.corpus) if args.split is None or i.split.value in args.split
        ]
        found = extract(
            args.corpus,
            items,
            workers=args.workers,
            precision=args.precision,
            max_seconds=args.max_seconds,
        )
        save_features(args.out, found, judged_id(AASIST_MANIFEST.model_id), args.max_seconds)
        _say(f"wrote the features of {len(found)} items to {args.out}")
        return 0
    views = [load_features(path) for path in args.features]
    document = fit_backend(
        args.corpus, views, judged_id(AASIST_MANIFEST.model_id), [Channel(c) for c in args.channels]
    )
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    for channel, kinds in document["provenance"]["fit"].items():
        for kind, details in kinds.items():
            _say(
                f"{channel} against {kind}: {details['items']} items ({details['bona_fide']} "
                f"bona fide) of {details['speakers']} speakers, penalty {details['penalty']:g}"
            )
    _say(f"wrote {args.out}")
    return 0


def _say(message: str) -> None:
    print(f"voxauth attacks: {message}", file=sys.stderr, flush=True)
