"""`voxauth attacks evaluate`: ISO/IEC 30107-3 figures of the service's presentation-attack
detection on the attack corpus's TEST split (speakers nothing was fitted or calibrated on).

- APCER per attack type and channel: the share of attack items the countermeasure takes for
  bona fide at the service's per-channel threshold (the shipped calibration, the target BPCER).
- BPCER per channel: the share of genuine items it refuses.
- IAPAR of the combined system (`--iapar`): attack items made from a test speaker, scored by
  the speaker model against that speaker's voiceprint with the service's scorer, that end in
  ACCEPT (the voice matched and the countermeasure passed it). The voiceprint is enrolled
  from the rest of the speaker's recording (after the 8 s the corpus uses), so no item is
  part of its own enrollment.
- Replay fingerprints: for the corpus's replays, the share whose embedding matches the
  genuine item they were made from (the case of a recorded earlier check played back), and
  for genuine speech, the share of genuine items matching their own speaker's enrollment
  (a genuine re-verification falsely taken for a replay).

Every rate comes with its count and 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

from models.aasist import READOUT_DIM
from models.countermeasure import judged_id
from models.embedder import Embedding
from models.manifest import AASIST_MANIFEST
from models.pad_backend import SPECTRAL_DIM, PadBackEnd, default_backend_path
from server.config import PresentationAttackPolicy
from server.pipeline.channel import Channel
from server.pipeline.presentation import PadCalibration, default_pad_calibration_path
from server.tools.attack_corpus import (
    ATTACKS,
    BONA_FIDE,
    CORPUS_FILE,
    GENUINE_KINDS,
    LINE_CONDITIONS,
    Item,
    Split,
    load_items,
)
from server.tools.evaluation import Rate
from server.tools.pad_backend_fit import (
    ItemFeatures,
    calibration_channels,
    features_max_seconds,
    load_features,
)

Scores = dict[Item, float]


@dataclass(frozen=True)
class PadRow:
    channel: Channel
    kind: str
    rate: Rate
    """APCER for an attack, BPCER for bona fide."""


def pad_rates(scores: Scores, thresholds: dict[Channel, float]) -> list[PadRow]:
    rows = []
    for channel in Channel:
        for kind in (*GENUINE_KINDS, *ATTACKS):
            values = [s for i, s in scores.items() if i.channel is channel and i.kind == kind]
            if not values:
                continue
            threshold = thresholds[channel]
            errors = (
                sum(v < threshold for v in values)
                if kind in GENUINE_KINDS
                else sum(v >= threshold for v in values)
            )
            rows.append(PadRow(channel, kind, Rate(int(errors), len(values))))
    return rows


@dataclass(frozen=True)
class LineRow:
    channel: Channel
    condition: str
    """A line condition (server.tools.attack_corpus.LINE_CONDITIONS) or "none"."""
    bpcer: Rate
    apcer: Rate
    """All attack kinds together."""


def line_condition_of(item: Item) -> str:
    line = item.params.get("line")
    return "none" if not isinstance(line, dict) else str(line.get("condition", "none"))


def line_rates(scores: Scores, thresholds: dict[Channel, float]) -> list[LineRow]:
    """BPCER and APCER per line condition: whether hum, noise or long pauses move the
    countermeasure's decisions on either side."""
    rows = []
    for channel in Channel:
        threshold = thresholds[channel]
        for condition in ("none", *LINE_CONDITIONS):
            chosen = [
                (i, s)
                for i, s in scores.items()
                if i.channel is channel and line_condition_of(i) == condition
            ]
            genuine = [s for i, s in chosen if i.kind in GENUINE_KINDS]
            attacks = [s for i, s in chosen if i.kind not in GENUINE_KINDS]
            if not genuine and not attacks:
                continue
            rows.append(
                LineRow(
                    channel,
                    condition,
                    Rate(sum(v < threshold for v in genuine), len(genuine)),
                    Rate(sum(v >= threshold for v in attacks), len(attacks)),
                )
            )
    return rows


def det_plot(scores: Scores, thresholds: dict[Channel, float], out: Path, model_id: str) -> None:
    """APCER against BPCER as the threshold moves, per channel and attack type, on normal
    deviate axes, with the service's operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    figure, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8])
    for axis, channel in zip(axes, Channel, strict=True):
        genuine = np.sort(
            [s for i, s in scores.items() if i.channel is channel and i.kind in GENUINE_KINDS]
        )
        for kind in ATTACKS:
            attacks = np.sort(
                [s for i, s in scores.items() if i.channel is channel and i.kind == kind]
            )
            if not len(attacks):
                continue
            grid = np.unique(np.concatenate([genuine, attacks]))
            bpcer = np.searchsorted(genuine, grid, side="left") / len(genuine)
            apcer = 1 - np.searchsorted(attacks, grid, side="left") / len(attacks)
            clip = 0.5 / max(len(genuine), len(attacks))
            axis.plot(
                norm.ppf(np.clip(bpcer, clip, 1 - clip)),
                norm.ppf(np.clip(apcer, clip, 1 - clip)),
                label=kind,
            )
        threshold = thresholds[channel]
        operating = np.mean(genuine < threshold)
        axis.axvline(norm.ppf(max(operating, 1e-3)), color="grey", linestyle=":")
        axis.set_title(f"{channel.value}: {len(genuine)} genuine items per curve")
        axis.set_xlabel("BPCER")
        axis.set_xticks(norm.ppf(ticks), [f"{t:g}" for t in ticks])
        axis.set_yticks(norm.ppf(ticks), [f"{t:g}" for t in ticks])
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("APCER")
    axes[0].legend()
    figure.suptitle(f"{model_id} on the attack corpus, test split; dotted: the service's threshold")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def item_scores(
    items: Sequence[Item], found: dict[str, ItemFeatures], backend: PadBackEnd | None
) -> Scores:
    """Each item's score as the service computes it: the back-end's log-odds for the item's
    channel, or with no back-end the raw mean bona-fide logit."""
    return {
        i: (
            found[i.path].raw
            if backend is None
            else backend.score(i.channel.value, found[i.path].features, found[i.path].raw)
        )
        for i in items
        if i.path in found
    }


@dataclass(frozen=True)
class SpeakerChecks:
    accepted: dict[Item, bool]
    """Per item with enough speech: whether the speaker model accepted it."""
    replay_similarity: dict[Item, float]
    """Per replay item: cosine with the embedding of the genuine item it was made from."""
    genuine_to_enrollment: dict[Item, float]
    """Per genuine item: cosine with its speaker's enrollment (replay fingerprint)."""


def speaker_checks(
    corpus: Path, items: Sequence[Item], max_seconds: float | None = None
) -> SpeakerChecks:
    """Runs the service's analyser and scorer (real ECAPA, Silero, shipped calibration) on
    each item, or on its first `max_seconds` (as the PAD features were made)."""
    from models.factory import load_speaker_embedder
    from models.fetch import default_model_dir
    from server.config import AudioLimits, ScoringPolicy, VerificationPolicy
    from server.pipeline.analysis import VoiceAnalyser
    from server.pipeline.decode import TARGET_RATE
    from server.pipeline.silero import SileroSpeechDetector
    from server.pipeline.speech import QualityThresholds
    from server.records import Voiceprint
    from server.scoring.scorer import Scorer, ScoringModel
    from server.tools.attack_corpus import resample

    document = json.loads((corpus / CORPUS_FILE).read_text())
    source = Path(document["source"])
    skip = int(float(document["max_seconds"]) * TARGET_RATE)
    embedder = load_speaker_embedder(default_model_dir())
    analyser = VoiceAnalyser(embedder, SileroSpeechDetector(), QualityThresholds(), AudioLimits())
    policy = ScoringPolicy()
    scorer = Scorer(ScoringModel.load(policy, embedder.model_id), policy, voiceprints=list)
    minimum = VerificationPolicy().min_net_speech_seconds
    voiceprints: dict[str, Voiceprint] = {}
    for item in items:
        if item.speaker in voiceprints or item.kind != BONA_FIDE:
            continue
        audio, rate = sf.read(source / item.source, dtype="float32", always_2d=True)
        rest = resample(audio.mean(axis=1), rate)[skip:]
        sample = analyser.analyse_waveform(rest, min_net_speech_seconds=minimum)
        if sample.embedding is None:
            continue
        voiceprints[item.speaker] = Voiceprint(
            item.speaker,
            embedder.model_id,
            sample.embedding,
            datetime.now(UTC),
            1,
            sample.quality.net_speech_seconds,
            analyser.telephone_embedding(sample.quality.speech),
        )
    _say(f"{len(voiceprints)} voiceprints enrolled from the rest of each recording")
    embeddings: dict[Item, Embedding] = {}
    accepted: dict[Item, bool] = {}
    for number, item in enumerate(items, start=1):
        voiceprint = voiceprints.get(item.speaker)
        if voiceprint is None:
            continue
        waveform, rate = sf.read(corpus / item.path, dtype="float32")
        if max_seconds is not None:
            waveform = waveform[: int(max_seconds * rate)]
        sample = analyser.analyse_waveform(waveform, min_net_speech_seconds=minimum)
        if sample.embedding is None:
            continue
        embeddings[item] = sample.embedding
        score = scorer.score(
            voiceprint, sample.embedding, sample.quality.net_speech_seconds, sample.channel
        )
        accepted[item] = score.accepted
        if number % 200 == 0:
            _say(f"{number}/{len(items)} items through the speaker model")
    genuine = {(i.speaker, i.channel): e for i, e in embeddings.items() if i.kind == BONA_FIDE}
    replay_similarity = {
        i: float(np.dot(e, genuine[(i.speaker, i.channel)]))
        for i, e in embeddings.items()
        if i.kind == "replay" and (i.speaker, i.channel) in genuine
    }
    to_enrollment = {}
    for item, embedding in embeddings.items():
        if item.kind != BONA_FIDE:
            continue
        voiceprint = voiceprints[item.speaker]
        similarity = float(np.dot(embedding, voiceprint.embedding))
        if voiceprint.telephone_embedding is not None:
            similarity = max(similarity, float(np.dot(embedding, voiceprint.telephone_embedding)))
        to_enrollment[item] = similarity
    return SpeakerChecks(accepted, replay_similarity, to_enrollment)


def evaluate_command(args: argparse.Namespace) -> int:
    everything = load_items(args.corpus)
    splits = {Split(value) for value in args.split}
    items = [i for i in everything if i.split in splits]
    found = load_features(args.features)
    if args.raw:
        # The raw checkpoint's figures for comparison: its thresholds from the calibration
        # split's genuine items, by the same normal model the shipped calibration uses.
        backend = None
        model_id = judged_id(AASIST_MANIFEST.model_id)
        genuine = item_scores([i for i in everything if i.kind in GENUINE_KINDS], found, None)
        calibration = PadCalibration(model_id, calibration_channels(genuine, Split.CALIBRATION))
    else:
        backend = PadBackEnd.load(
            args.backend or default_backend_path(),
            judged_id(AASIST_MANIFEST.model_id),
            READOUT_DIM + SPECTRAL_DIM,
        )
        model_id = backend.model_id
        calibration = PadCalibration.load(
            args.calibration or default_pad_calibration_path(), model_id
        )
    scores = item_scores(items, found, backend)
    targets = {
        Channel.WIDEBAND: args.target_bpcer,
        Channel.TELEPHONE: args.target_bpcer_telephone,
    }
    thresholds = {c: e.threshold(targets[c]) for c, e in calibration.channels.items()}
    speakers = len({i.speaker for i in scores})
    seconds = features_max_seconds(args.features)
    print(
        f"{model_id}; {'+'.join(sorted(s.value for s in splits))} split ({speakers} speakers, "
        f"{len(scores)} items"
        + ("" if seconds is None else f", first {seconds:g} s of each")
        + "); "
        "thresholds from the calibration split: "
        + ", ".join(
            f"{c.value} {t:+.2f} (target BPCER {targets[c]:g})" for c, t in thresholds.items()
        )
    )
    print()
    print(f"{'channel':<10} {'kind':<12} {'rate':<6} value (errors/trials; 95% Wilson interval)")
    rows = pad_rates(scores, thresholds)
    for row in rows:
        name = "BPCER" if row.kind in GENUINE_KINDS else "APCER"
        print(f"{row.channel.value:<10} {row.kind:<12} {name:<6} {row.rate}")
    for channel in Channel:
        attacks = [r for r in rows if r.channel is channel and r.kind not in GENUINE_KINDS]
        worst = max(attacks, key=lambda r: r.rate.value)
        print(f"{channel.value:<10} worst APCER: {worst.kind} {worst.rate}")
    lines = line_rates(scores, thresholds)
    if any(row.condition != "none" for row in lines):
        print()
        print("By line condition (all attack kinds together):")
        print(f"{'channel':<10} {'condition':<10} {'BPCER':<36} APCER")
        for line in lines:
            print(f"{line.channel.value:<10} {line.condition:<10} {line.bpcer!s:<36} {line.apcer}")
    if args.det:
        det_plot(scores, thresholds, args.det, model_id)
        print(f"DET plot: {args.det}")
    if args.iapar:
        checks = speaker_checks(
            args.corpus, sorted(scores, key=lambda i: i.path), features_max_seconds(args.features)
        )
        _print_iapar(scores, thresholds, checks)
    return 0


def _print_iapar(scores: Scores, thresholds: dict[Channel, float], checks: SpeakerChecks) -> None:
    print()
    print(
        "Combined system (speaker model against the speaker's own voiceprint, then PAD): "
        "attack items ending in ACCEPT"
    )
    print(
        f"{'channel':<10} {'kind':<12} {'speaker model accepts':<34} "
        "IAPAR (accepted and passed PAD)"
    )
    for channel in Channel:
        for kind in (*GENUINE_KINDS, *ATTACKS):
            decided = [i for i in checks.accepted if i.channel is channel and i.kind == kind]
            if not decided:
                continue
            matched = sum(checks.accepted[i] for i in decided)
            through = sum(checks.accepted[i] and scores[i] >= thresholds[channel] for i in decided)
            label = "accepted (1 - FNMR with PAD)" if kind in GENUINE_KINDS else ""
            print(
                f"{channel.value:<10} {kind:<12} {Rate(matched, len(decided))!s:<34} "
                f"{Rate(through, len(decided))} {label}"
            )
    threshold = 0.93
    replays = list(checks.replay_similarity.values())
    genuine = list(checks.genuine_to_enrollment.values())
    print()
    print(f"Replay fingerprints (cosine >= {threshold}):")
    print(
        "  corpus replay of a recorded check matches that check: "
        f"{Rate(sum(s >= threshold for s in replays), len(replays))}; "
        f"median cosine {np.median(replays):.3f}"
    )
    print(
        "  genuine item falsely matches its speaker's enrollment: "
        f"{Rate(sum(s >= threshold for s in genuine), len(genuine))}; "
        f"highest cosine {max(genuine):.3f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth attacks evaluate",
        description="ISO/IEC 30107-3 figures on the test split: APCER, BPCER, IAPAR, DET plot",
    )
    parser.add_argument("corpus", type=Path)
    parser.add_argument(
        "--features",
        type=Path,
        required=True,
        help="from `voxauth attacks features CORPUS --out FILE` (test and calibration splits)",
    )
    parser.add_argument(
        "--target-bpcer",
        type=float,
        default=PresentationAttackPolicy.target_bpcer,
        help="wideband (default: the service's)",
    )
    parser.add_argument(
        "--target-bpcer-telephone",
        type=float,
        default=PresentationAttackPolicy.target_bpcer_telephone,
        help="telephone (default: the service's)",
    )
    parser.add_argument(
        "--split",
        nargs="+",
        choices=[s.value for s in Split],
        default=[Split.TEST.value],
        help="splits to report on (default: test; a corpus built from another set of speakers, "
        "none of whom anything was fitted on, may use all three)",
    )
    parser.add_argument("--backend", type=Path, help="default: the shipped one")
    parser.add_argument("--calibration", type=Path, help="default: the shipped one")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="the raw checkpoint without the back-end, thresholds from the calibration split",
    )
    parser.add_argument("--det", type=Path, help="write the DET plot here (PNG)")
    parser.add_argument(
        "--iapar",
        action="store_true",
        help="also run every item through the speaker model against its speaker's voiceprint "
        "(enrolled from the rest of the speaker's recording) for the combined system's IAPAR",
    )
    return evaluate_command(parser.parse_args(argv))


def _say(message: str) -> None:
    print(f"voxauth attacks: {message}", file=sys.stderr, flush=True)
