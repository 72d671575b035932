"""`voxauth calibrate DIR`: make the score-normalisation cohort and the calibration that the
service loads (models/scoring/), from a folder of speakers.

The speakers are split in two by a hash of their id (`is_calibration_speaker`): the first part
makes the cohort and the calibration, the second is left for `voxauth eval`, which reports
on it alone. Within the first part, every file is cut into halves; each half enrolls (as
wideband and as telephone companion voiceprint) and is tested by segments of the other half
(all its speech, and its first and second 3 s of net speech), as wideband and as telephone
audio. Each file is also cut unevenly, so that tests and voiceprints longer than a half are
calibrated too: its first 4 s of net speech enroll and the rest tests, and its first 3 s
test against the rest enrolled. The cohort holds one voice per speaker and channel: the mean
of the two halves.
Trial scores are normalised leaving out of the cohort both speakers of the trial.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.pipeline.channel import Channel
from server.scoring.calibration import (
    Calibration,
    Condition,
    ConditionCalibration,
    TailModel,
    fit_condition,
    fit_tail,
)
from server.scoring.normalization import centre, top_n_statistics
from server.scoring.scorer import CALIBRATION_FILE, COHORT_FILE
from server.tools.corpus import Part, Recording, Segment, Side, SpeechCorpus, recordings
from server.tools.evaluation import (
    CALIBRATED_BEFORE,
    ENROLLMENT_SIDE,
    LONG_ENROLLMENT,
    LONG_TEST,
    TEST_SIDE,
    Rate,
    Trials,
    TrialSide,
    Vector,
    embed_side,
    equal_error_rate,
    min_dcf,
)

TEST_SEGMENTS = ((0.0, None), (0.0, 3.0), (3.0, 3.0))
"""(start, seconds) of net speech of each test segment; None: all of it."""


# Of the salts "voxauth-calibration-K:" for K < 100, only K = 2 and K = 92 leave all five
# speakers of tests/data out of the calibration part, so the end-to-end tests never meet
# their own voice in the cohort; 92 holds out more speakers for evaluation (135 of 251).
SPLIT_SALT = "voxauth-calibration-92:"


@dataclass(frozen=True)
class Setting:
    """A choice that calibrate makes by measurement."""

    centring: bool
    top_n: int

    def __str__(self) -> str:
        return f"{'centred' if self.centring else 'not centred'}, top {self.top_n}"


Plan = tuple[tuple[Segment, tuple[Segment, ...]], ...]
"""(enrolled segment, test segments) pairs that make trials."""

SETTINGS = tuple(Setting(c, n) for c in (False, True) for n in (10, 25, 50, 100))


def is_calibration_speaker(speaker: str) -> bool:
    """The deterministic part of the speakers (about half) that calibration may use."""
    digest = hashlib.sha256((SPLIT_SALT + speaker).encode()).hexdigest()
    return int(digest[:8], 16) % 2 == 0


@dataclass(frozen=True, eq=False)
class CohortVoices:
    speakers: list[str]
    embeddings: dict[Channel, Vector]


def cohort_voices(corpus: SpeechCorpus, files: Sequence[Recording]) -> CohortVoices:
    """One voice per speaker and channel: the normalised mean of the two halves' embeddings
    (files whose halves cannot both be embedded are left out)."""
    sides = {Channel.WIDEBAND: Side.WIDEBAND, Channel.TELEPHONE: Side.COMPANION}
    speakers: list[str] = []
    rows: dict[Channel, list[Vector]] = {c: [] for c in Channel}
    for recording in files:
        halves = {
            channel: [corpus.embed(recording, side, Segment(p)).embedding for p in _HALVES]
            for channel, side in sides.items()
        }
        if any(e is None for pair in halves.values() for e in pair):
            continue
        speakers.append(recording.speaker)
        for channel, pair in halves.items():
            mean = np.mean([np.asarray(e, dtype=np.float64) for e in pair], axis=0)
            rows[channel].append(mean / np.linalg.norm(mean))
    return CohortVoices(speakers, {c: np.array(r) for c, r in rows.items()})


_HALVES = (Part.FIRST_HALF, Part.SECOND_HALF)


def _leave_out_statistics(
    side: TrialSide, cohort: Vector, cohort_speakers: list[str], top_n: int
) -> tuple[Vector, Vector]:
    """Cohort statistics of each row with its own speaker and, in turn, each cohort speaker
    left out: [row, j] leaves out cohort voice j as well."""
    scores = side.embeddings @ cohort.T
    own = np.array([[s == c for c in cohort_speakers] for s in side.speakers], dtype=bool)
    own = own.reshape(scores.shape)
    means = np.empty(scores.shape)
    stds = np.empty(scores.shape)
    for j in range(len(cohort_speakers)):
        exclude = own.copy()
        exclude[:, j] = True
        means[:, j], stds[:, j] = top_n_statistics(scores, top_n, exclude)
    return means, stds


def calibration_trials(
    corpus: SpeechCorpus,
    files: Sequence[Recording],
    cohort: CohortVoices,
    condition: Condition,
    setting: Setting,
    *,
    min_enrollment_seconds: float,
    min_test_seconds: float,
    plan: Plan | None = None,
) -> Trials:
    """Scored trials of `plan` (default: the halves) with their speakers, normalised with
    both speakers of each trial left out of the cohort."""
    plan = HALVES_PLAN if plan is None else plan
    top_n = setting.top_n
    index = {speaker: j for j, speaker in enumerate(cohort.speakers)}
    means = {channel: voices.mean(axis=0) for channel, voices in cohort.embeddings.items()}

    def prepared(side: TrialSide, channel: Channel) -> TrialSide:
        if not setting.centring or len(side.speakers) == 0:
            return side
        embeddings = centre(side.embeddings, means[channel])
        return TrialSide(side.speakers, embeddings, side.net_speech_seconds)

    def cohort_of(channel: Channel) -> Vector:
        voices = cohort.embeddings[channel]
        return centre(voices, means[channel]) if setting.centring else voices

    enrollment_cohort = cohort_of(condition.enrollment_channel)
    test_cohort = cohort_of(condition.test_channel)
    blocks: list[Trials] = []
    for enrolled, tested_segments in plan:
        enrollment = embed_side(
            corpus, files, ENROLLMENT_SIDE[condition], enrolled, min_enrollment_seconds
        )
        enrollment = prepared(enrollment, condition.enrollment_channel)
        e_mean, e_std = _leave_out_statistics(enrollment, enrollment_cohort, cohort.speakers, top_n)
        for segment in tested_segments:
            test = embed_side(corpus, files, TEST_SIDE[condition], segment, min_test_seconds)
            test = prepared(test, condition.test_channel)
            t_mean, t_std = _leave_out_statistics(test, test_cohort, cohort.speakers, top_n)
            # Each side's statistics leave out the other side's speaker too.
            of_test = np.array([index.get(s, -1) for s in test.speakers])
            of_enrollment = np.array([index.get(s, -1) for s in enrollment.speakers])
            mean_e, std_e = e_mean[:, of_test], e_std[:, of_test]
            mean_t, std_t = t_mean[:, of_enrollment].T, t_std[:, of_enrollment].T
            cosines = enrollment.embeddings @ test.embeddings.T
            normalized = 0.5 * ((cosines - mean_e) / std_e + (cosines - mean_t) / std_t)
            enrolled_speakers = np.array(enrollment.speakers, dtype=np.str_)
            tested_speakers = np.array(test.speakers, dtype=np.str_)
            same = (enrolled_speakers[:, None] == tested_speakers[None, :]).reshape(cosines.shape)
            tested_seconds = np.broadcast_to(test.net_speech_seconds[None, :], cosines.shape)
            enrolled_seconds = np.broadcast_to(
                enrollment.net_speech_seconds[:, None], cosines.shape
            )
            pairs_e = np.broadcast_to(enrolled_speakers[:, None], cosines.shape)
            pairs_t = np.broadcast_to(tested_speakers[None, :], cosines.shape)
            blocks.append(
                Trials(
                    normalized[same],
                    normalized[~same],
                    tested_seconds[same],
                    tested_seconds[~same],
                    pairs_e[~same],
                    pairs_t[~same],
                    enrolled_seconds[same],
                    enrolled_seconds[~same],
                )
            )
    return _joined(blocks)


def _joined(blocks: Sequence[Trials]) -> Trials:
    def joined(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(b, name) for b in blocks])

    return Trials(
        joined("target"),
        joined("impostor"),
        joined("target_seconds"),
        joined("impostor_seconds"),
        joined("impostor_enrolled"),
        joined("impostor_tested"),
        joined("target_enrollment_seconds"),
        joined("impostor_enrollment_seconds"),
    )


HALVES_PLAN: Plan = tuple(
    (
        Segment(enrolled),
        tuple(Segment(tested, start, seconds) for start, seconds in TEST_SEGMENTS),
    )
    for enrolled, tested in (
        (Part.FIRST_HALF, Part.SECOND_HALF),
        (Part.SECOND_HALF, Part.FIRST_HALF),
    )
)
"""Each half enrolls and the other half's segments test: the target and impostor trials."""
UNEVEN_PLAN: Plan = ((LONG_TEST[0], (LONG_TEST[1],)), (LONG_ENROLLMENT[0], (LONG_ENROLLMENT[1],)))
"""Each file cut unevenly: long tests against short voiceprints, long voiceprints against
short tests. Target trials longer on one side than any half can give, so that the LLR's
dependence on each side's length is measured, not extrapolated, over that range."""
WHOLE_PLAN: Plan = ((Segment(Part.WHOLE), (Segment(Part.WHOLE),)),)
"""Whole files (both halves, up to 17 s) against whole files: impostor trials only (one file
a speaker), longer than any half, so the tail is also measured where checks are long."""


def _check(calibration: ConditionCalibration, trials: Trials, fmr: float) -> str:
    """How the impostor tail model's threshold for `fmr` fares on the trials it was fitted
    on: false matches counted against expected."""
    false_matches = int((trials.impostor >= calibration.threshold(fmr)).sum())
    return (
        f"FMR {fmr:g}: {false_matches} false matches of {len(trials.impostor)}, "
        f"{fmr * len(trials.impostor):.1f} expected"
    )


def _tail_of(trials: Trials) -> TailModel:
    assert trials.impostor_enrolled is not None and trials.impostor_tested is not None
    return fit_tail(trials.impostor, trials.impostor_enrolled, trials.impostor_tested)


TAIL_CHECK_SALT = "voxauth-tail-check:"


def held_apart_check(trials: Trials) -> list[str]:
    """The tail fitted on the trials among one half of the speakers (split by a hash of
    their ids), its thresholds tried on the trials among the other half, both ways round:
    false matches counted against expected, with the 95% interval of the observed rate."""
    assert trials.impostor_enrolled is not None and trials.impostor_tested is not None

    def part_of(speakers: npt.NDArray[np.str_]) -> npt.NDArray[np.int_]:
        return np.array(
            [
                int(hashlib.sha256((TAIL_CHECK_SALT + s).encode()).hexdigest()[:8], 16) % 2
                for s in speakers
            ]
        )

    enrolled, tested = part_of(trials.impostor_enrolled), part_of(trials.impostor_tested)
    lines = []
    for fitted_part in (0, 1):
        fit_on = (enrolled == fitted_part) & (tested == fitted_part)
        check_on = (enrolled != fitted_part) & (tested != fitted_part)
        tail = fit_tail(
            trials.impostor[fit_on],
            trials.impostor_enrolled[fit_on],
            trials.impostor_tested[fit_on],
        )
        held = trials.impostor[check_on]
        for fmr in (1e-3, 1e-4):
            passed = Rate(int((held >= tail.score_at(fmr)).sum()), len(held))
            low, high = passed.interval()
            lines.append(
                f"part {fitted_part} -> {1 - fitted_part}, FMR {fmr:g}: {passed.errors} of "
                f"{passed.trials} ({fmr * passed.trials:.1f} expected; rate 95% interval "
                f"{low:.2e}-{high:.2e})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxauth calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="folder of speakers' audio (FLAC or WAV)")
    parser.add_argument(
        "--out", type=Path, default=Path("models/scoring"), help="where to write the files"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("var/eval-cache"), help="embedding cache folder"
    )
    parser.add_argument("--model-dir", type=Path, help="verified model files")
    args = parser.parse_args(argv)

    from models.ecapa import EcapaEmbedder
    from models.fetch import default_model_dir
    from server.config import ServerConfig
    from server.pipeline import silero
    from server.pipeline.silero import SileroSpeechDetector

    config = ServerConfig.from_environment()
    files = [r for r in recordings(args.directory) if is_calibration_speaker(r.speaker)]
    if len({r.speaker for r in files}) < 10:
        print(
            f"voxauth calibrate: {args.directory} holds too few speakers for calibration",
            file=sys.stderr,
        )
        return 2
    embedder = EcapaEmbedder.load(args.model_dir or config.model_dir or default_model_dir())
    corpus = SpeechCorpus(
        embedder,
        SileroSpeechDetector(),
        max_seconds=config.audio.max_seconds,
        cache_dir=args.cache,
        detector_version=silero.VERSION,
    )
    started = time.perf_counter()
    cohort = cohort_voices(corpus, files)
    trials_of = functools.partial(
        calibration_trials,
        min_enrollment_seconds=config.enrollment.min_utterance_net_speech_seconds,
        min_test_seconds=config.verification.min_net_speech_seconds,
    )
    # Centring and the cohort size N are chosen on these speakers' own trials, by the summed
    # minimum detection cost of the three conditions.
    costs = {}
    for setting in SETTINGS:
        costs[setting] = sum(
            min_dcf(trials_of(corpus, files, cohort, c, setting)) for c in Condition
        )
        print(f"{setting}: summed minDCF(0.01) {costs[setting]:.3f}")
    chosen = min(SETTINGS, key=lambda s: costs[s])
    conditions = {}
    counts = {}
    for condition in Condition:
        halves = trials_of(corpus, files, cohort, condition, chosen)
        uneven = trials_of(corpus, files, cohort, condition, chosen, plan=UNEVEN_PLAN)
        whole = trials_of(corpus, files, cohort, condition, chosen, plan=WHOLE_PLAN)
        trials = _joined([halves, uneven])
        impostors = _joined([trials, whole])
        assert trials.target_enrollment_seconds is not None
        assert trials.impostor_enrollment_seconds is not None
        # The LLR and the target model need targets, which the halves and the uneven cuts
        # have; the tail is fitted on every impostor trial, whole files included.
        fitted = replace(
            fit_condition(
                trials.target,
                trials.target_seconds,
                trials.impostor,
                trials.impostor_seconds,
                target_enrollment_seconds=trials.target_enrollment_seconds,
                impostor_enrollment_seconds=trials.impostor_enrollment_seconds,
            ),
            impostor=_tail_of(impostors),
        )
        conditions[condition] = fitted
        eer, _ = equal_error_rate(halves)
        checks = [_check(fitted, impostors, fmr) for fmr in (1e-3, 1e-4)]
        long_checks = [_check(fitted, whole, fmr) for fmr in (1e-3, 1e-4)]
        uneven_checks = [_check(fitted, uneven, fmr) for fmr in (1e-3, 1e-4)]
        held_apart = held_apart_check(impostors)
        longest_test, longest_voiceprint = fitted.longest_calibrated
        counts[condition.value] = {
            "target_trials": len(trials.target),
            "impostor_trials": len(trials.impostor),
            "halves_target_trials": len(halves.target),
            "halves_impostor_trials": len(halves.impostor),
            "uneven_target_trials": len(uneven.target),
            "uneven_impostor_trials": len(uneven.impostor),
            "target_tests_longer_than_7.6_s": int(
                (trials.target_seconds > CALIBRATED_BEFORE).sum()
            ),
            "target_tests_longer_than_10_s": int((trials.target_seconds > 10.0).sum()),
            "longest_calibrated_test_seconds": round(longest_test, 2),
            "longest_calibrated_voiceprint_seconds": round(longest_voiceprint, 2),
            "whole_file_impostor_trials": len(whole.impostor),
            "whole_file_net_speech_seconds": [
                round(float(whole.impostor_seconds.min()), 1),
                round(float(whole.impostor_seconds.max()), 1),
            ],
            "eer": round(eer, 5),
            "tail_threshold_check": checks,
            "tail_threshold_check_whole_files": long_checks,
            "tail_threshold_check_uneven_cuts": uneven_checks,
            "tail_held_apart_check": held_apart,
        }
        print(
            f"{condition.value}: {len(trials.target)} target, {len(trials.impostor)} impostor "
            f"trials ({len(uneven.target)} / {len(uneven.impostor)} of them of uneven cuts; "
            f"+{len(whole.impostor)} impostor trials of whole files), halves' EER {eer:.2%}; "
            f"calibrated up to {longest_test:.1f} s tests, {longest_voiceprint:.1f} s "
            "voiceprints; "
            + "; ".join(checks)
            + "; whole files: "
            + "; ".join(long_checks)
            + "; uneven cuts: "
            + "; ".join(uneven_checks)
            + "; held apart: "
            + "; ".join(held_apart)
        )
    calibration = Calibration(
        model_id=embedder.model_id,
        cohort_top_n=chosen.top_n,
        centring=chosen.centring,
        conditions=conditions,
        provenance={
            "command": f"voxauth calibrate {args.directory.name}",
            "data": "LibriSpeech train-clean-100 (CC BY 4.0), one file per speaker",
            "split": f"speakers with int(sha256({SPLIT_SALT!r} + id)[:8], 16) even",
            "speakers": sorted({r.speaker for r in files}),
            "summed_min_dcf": {str(s): round(c, 4) for s, c in costs.items()},
            "trials": counts,
        },
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / CALIBRATION_FILE).write_text(calibration.to_json())
    np.savez_compressed(
        args.out / COHORT_FILE,
        model_id=np.array(embedder.model_id),
        speakers=np.array(cohort.speakers),
        **{c.value: cohort.embeddings[c].astype(np.float32) for c in Channel},  # type: ignore[arg-type]
    )
    print(
        f"wrote {args.out / CALIBRATION_FILE} and {args.out / COHORT_FILE} "
        f"({len(cohort.speakers)} cohort voices per channel, {chosen}; "
        f"{time.perf_counter() - started:.0f} s)"
    )
    return 0
