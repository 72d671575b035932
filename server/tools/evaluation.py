"""`voxauth eval DIR`: accuracy of the service's own scoring path on a folder of speakers.

Every file is split in two: the first half enrolls, the second half verifies. A trial pairs a
voiceprint with a test; it is a target trial when both come from the same speaker and an
impostor trial otherwise. Each trial is scored as the service scores it: cosine of the speech's
embeddings, AS-norm against the shipped cohort (models/scoring/), and the decision threshold
that the shipped calibration sets for the target false-match rate and the trial's net speech.
Speakers whose audio made the cohort or the calibration are left out, so no figure comes from
data the scoring was fitted on. Tests with less net speech than the service needs on their
channel (VerificationPolicy.min_net_speech_for) are left out, as the service answers them
INCONCLUSIVE.

Conditions: wideband (voiceprint and test as recorded), wideband-to-telephone (wideband
voiceprint, test through a simulated G.711 call), telephone (the companion voiceprint that
enrollment makes from the same speech through the simulated call, and a telephone test).
Test durations: any number of seconds of net speech from the start of the second half (3 s,
8 s, ...; `minimum`: the service's minimum for the test's channel), or all of it;
or, with the file cut unevenly, long tests (all after the first 4.5 s of net speech, against
a voiceprint of the first 4 s) and long voiceprints (all after 4 s, tested by the first 3 s).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from server.api.console.compliance import write_evaluation
from server.config import ScoringPolicy, VerificationPolicy
from server.pipeline.channel import Channel
from server.scoring.calibration import Condition, ConditionCalibration
from server.scoring.normalization import as_norm_matrix, top_n_statistics
from server.scoring.scorer import ScoringModel
from server.tools.corpus import Part, Recording, Segment, Side, SpeechCorpus, recordings
from server.tools.distortions import Distortion

Vector = npt.NDArray[np.float64]

ENROLLMENT_SIDE = {
    Condition.WIDEBAND: Side.WIDEBAND,
    Condition.WIDEBAND_TO_TELEPHONE: Side.WIDEBAND,
    Condition.TELEPHONE: Side.COMPANION,
}
TEST_SIDE = {
    Condition.WIDEBAND: Side.WIDEBAND,
    Condition.WIDEBAND_TO_TELEPHONE: Side.TELEPHONE,
    Condition.TELEPHONE: Side.TELEPHONE,
}
DURATIONS = {"3": 3.0, "8": 8.0, "full": None}
"""Named net speech of the second half's test segment; None: all of it. `--duration` also
takes any other number of seconds (`duration_choice`)."""

# The one file a speaker has, cut unevenly, gives what halves cannot: tests longer than half a
# file (against a short voiceprint) and voiceprints longer than half a file (against a short
# test). Between the two sides a gap of net speech, because a telephone side's speech is found
# by the VAD on the call's audio: on the 135 held-out second halves it found 0.13 s more to
# 1.2 s less than the wideband VAD, so the same net-speech point can lie earlier or later.
LONG_TEST = (Segment(Part.WHOLE, 0.0, 4.0), Segment(Part.WHOLE, 4.5))
"""(voiceprint, test): the first 4 s of the file's net speech enroll, all after 4.5 s tests
(up to about 12 s)."""
LONG_ENROLLMENT = (Segment(Part.WHOLE, 4.0), Segment(Part.WHOLE, 0.0, 3.0))
"""(voiceprint, test): the first 3 s test, all after 4 s enrolls (up to about 12 s)."""
LAYOUTS: dict[str, tuple[Segment, Segment]] = {
    **{
        name: (Segment(Part.FIRST_HALF), Segment(Part.SECOND_HALF, 0.0, seconds))
        for name, seconds in DURATIONS.items()
    },
    "long": LONG_TEST,
    "long-enrollment": LONG_ENROLLMENT,
}
"""What `--duration` chooses by name: (voiceprint, test) segments of each file."""


def duration_choice(text: str) -> str:
    """A `--duration` value: a name of LAYOUTS, or a positive number of seconds of net speech
    of the second half (written as `:g` writes it, so "4.0" and "4" are one choice and share
    the cache's segments)."""
    if text in LAYOUTS or text == MINIMUM:
        return text
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a positive number of seconds nor one of "
            f"{', '.join(sorted([*LAYOUTS, MINIMUM]))}"
        )
    return f"{seconds:g}"


MINIMUM = "minimum"
"""`--duration minimum`: each test as long as the service's minimum for its channel."""


def service_minimum(policy: VerificationPolicy, channel: Channel) -> float:
    """The net speech the service needs for a decision on a test of `channel`: tests with
    less are left out, as the service would answer them INCONCLUSIVE."""
    return policy.min_net_speech_for(telephone=channel is Channel.TELEPHONE)


def layout(duration: str) -> tuple[Segment, Segment]:
    """(voiceprint, test) segments of each file for a `duration_choice`."""
    if duration in LAYOUTS:
        return LAYOUTS[duration]
    return Segment(Part.FIRST_HALF), Segment(Part.SECOND_HALF, 0.0, float(duration))


CALIBRATED_BEFORE = 7.6
"""The longest test the halves-only calibration (format 1) measured: the report shows the
tests longer than this apart."""

# Detection cost of NIST SRE: a target prior of 1%, misses and false alarms costing the same.
DCF_TARGET_PRIOR = 0.01
REPORTED_FMRS = (1e-3, 1e-4)
_Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True, eq=False)
class TrialSide:
    """Embeddings of one side of the trials (voiceprints or tests), one row each."""

    speakers: list[str]
    embeddings: Vector
    net_speech_seconds: Vector


@dataclass(frozen=True, eq=False)
class Trials:
    """Scores of target and impostor trials, with each trial's net speech: the test's, and
    (where the calibration needs it) the voiceprint's."""

    target: Vector
    impostor: Vector
    target_seconds: Vector
    impostor_seconds: Vector
    impostor_enrolled: npt.NDArray[np.str_] | None = None
    """The enrolled speaker of each impostor trial, where the bootstrap over speakers needs it."""
    impostor_tested: npt.NDArray[np.str_] | None = None
    target_enrollment_seconds: Vector | None = None
    impostor_enrollment_seconds: Vector | None = None

    def with_scores(self, target: Vector, impostor: Vector) -> Trials:
        return replace(self, target=target, impostor=impostor)


@dataclass(frozen=True)
class Rate:
    errors: int
    trials: int

    @property
    def value(self) -> float:
        return self.errors / self.trials if self.trials else float("nan")

    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval: sound also for 0 errors, where it is not 0..0."""
        n, p = self.trials, self.value
        if n == 0:
            return float("nan"), float("nan")
        centre = (p + _Z95**2 / (2 * n)) / (1 + _Z95**2 / n)
        half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / (1 + _Z95**2 / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def __str__(self) -> str:
        low, high = self.interval()
        return f"{self.value:.2%} ({self.errors}/{self.trials}; {low:.2%}-{high:.2%})"


# --- metrics -----------------------------------------------------------------------------------


def error_curve(trials: Trials) -> tuple[Vector, Vector, Vector]:
    """(thresholds, FMR, FNMR) at every distinct score, accepting score >= threshold."""
    thresholds = np.unique(np.concatenate([trials.target, trials.impostor]))
    target = np.sort(trials.target)
    impostor = np.sort(trials.impostor)
    fnmr = np.searchsorted(target, thresholds, side="left") / len(target)
    fmr = 1.0 - np.searchsorted(impostor, thresholds, side="left") / len(impostor)
    return thresholds, fmr, fnmr


def equal_error_rate(trials: Trials) -> tuple[float, float]:
    """(EER, threshold): where the false-match and false-non-match rates cross."""
    thresholds, fmr, fnmr = error_curve(trials)
    crossing = int(np.argmin(np.abs(fmr - fnmr)))
    return float((fmr[crossing] + fnmr[crossing]) / 2), float(thresholds[crossing])


def min_dcf(trials: Trials, target_prior: float = DCF_TARGET_PRIOR) -> float:
    """Minimum normalised detection cost over all thresholds."""
    _, fmr, fnmr = error_curve(trials)
    cost = target_prior * fnmr + (1 - target_prior) * fmr
    return float(min(cost.min(), 1.0) / min(target_prior, 1 - target_prior))


def threshold_for_fmr(impostor: Vector, max_fmr: float) -> float:
    """The lowest threshold whose false-match rate on these impostor scores is at most
    max_fmr."""
    allowed = int(np.floor(max_fmr * len(impostor)))
    ranked = np.sort(impostor)[::-1]
    if allowed >= len(ranked):
        return float(ranked[-1])
    # Accepting needs score >= threshold, so sit just above the (allowed+1)-th highest impostor.
    return float(np.nextafter(ranked[allowed], np.inf))


def fnmr_at_fmr(trials: Trials, max_fmr: float) -> Rate:
    threshold = threshold_for_fmr(trials.impostor, max_fmr)
    return Rate(int((trials.target < threshold).sum()), len(trials.target))


def cllr(target_llr: Vector, impostor_llr: Vector) -> float:
    """Cost of the log-likelihood ratios in bits: 0 perfect, 1 as useless as no answer."""
    return float(
        (np.logaddexp(0, -target_llr).mean() + np.logaddexp(0, impostor_llr).mean())
        / (2 * math.log(2))
    )


# --- trials ------------------------------------------------------------------------------------


def embed_side(
    corpus: SpeechCorpus,
    files: Sequence[Recording],
    side: Side,
    segment: Segment,
    minimum: float,
    distortion: Distortion | None = None,
) -> TrialSide:
    """Embeddings of `segment` of each file; files with less net speech than `minimum` (or
    than the segment asks for) are left out, as the service would refuse them."""
    speakers, rows, seconds = [], [], []
    for recording in files:
        embedded = corpus.embed(recording, side, segment, distortion)
        if embedded.embedding is None or embedded.net_speech_seconds < minimum:
            continue
        speakers.append(recording.speaker)
        rows.append(embedded.embedding.astype(np.float64))
        seconds.append(embedded.net_speech_seconds)
    return TrialSide(
        speakers,
        np.array(rows, dtype=np.float64).reshape(len(rows), corpus.dimension),
        np.array(seconds),
    )


def prepared(scoring: ScoringModel, side: TrialSide, channel: Channel) -> TrialSide:
    """The side's embeddings as the service compares them (centred, when it centres)."""
    if len(side.speakers) == 0:
        return side
    return TrialSide(
        side.speakers, scoring.prepare(side.embeddings, channel), side.net_speech_seconds
    )


def score_trials(
    enrollment: TrialSide,
    test: TrialSide,
    *,
    normalize: tuple[tuple[Vector, Vector], tuple[Vector, Vector]] | None,
    skip: npt.NDArray[np.bool_] | None = None,
) -> Trials:
    """All (voiceprint, test) pairs; AS-norm when `normalize` holds both sides' cohort
    statistics. `skip` marks pairs that are no trial (the same speech on both sides)."""
    scores = enrollment.embeddings @ test.embeddings.T
    if normalize is not None:
        scores = as_norm_matrix(scores, *normalize)
    same = np.array([[a == b for b in test.speakers] for a in enrollment.speakers], dtype=bool)
    same = same.reshape(scores.shape)
    tested = np.broadcast_to(test.net_speech_seconds[None, :], scores.shape)
    enrolled = np.broadcast_to(enrollment.net_speech_seconds[:, None], scores.shape)
    valid = np.ones_like(same) if skip is None else ~skip
    return Trials(
        scores[same & valid],
        scores[~same & valid],
        tested[same & valid],
        tested[~same & valid],
        target_enrollment_seconds=enrolled[same & valid],
        impostor_enrollment_seconds=enrolled[~same & valid],
    )


# --- the command -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConditionResult:
    condition: Condition
    duration: str
    distortion: Distortion | None
    raw: Trials
    normalized: Trials
    llr_target: Vector
    llr_impostor: Vector
    at_policy: tuple[Rate, Rate]
    """(FMR, FNMR) at the service's own bound (the threshold for the target false-match rate
    and its LLR floors)."""
    long_at_policy: tuple[Rate, Rate]
    """The same for the trials whose test is longer than CALIBRATED_BEFORE."""
    accepted_against_evidence: int
    """Trials the service would accept with a negative LLR; 0 unless the floors fail."""
    files: int
    tests: int
    """Test segments with the net speech the service needs, of `files`."""
    median_test_seconds: float

    @property
    def name(self) -> str:
        seconds = self.duration.replace(".", "", 1).isdigit()
        duration = f"{self.duration} s" if seconds else self.duration
        through = "" if self.distortion is None else f" through {self.distortion.value}"
        return f"{self.condition.value}, {duration} test{through}"


def evaluate(
    corpus: SpeechCorpus,
    files: Sequence[Recording],
    scoring: ScoringModel,
    condition: Condition,
    duration: str,
    *,
    policy: ScoringPolicy,
    min_enrollment_seconds: float,
    min_test_seconds: float,
    distortion: Distortion | None = None,
    test_files: Sequence[Recording] | None = None,
) -> ConditionResult:
    """`distortion`: what the tests go through (a domain shift); the condition must be the
    one the service scores its channel on. `test_files`: the files tested (default: `files`,
    which enroll), to compare lengths on the same trials."""
    enrolled_segment, tested_segment = layout(duration)
    enrollment = embed_side(
        corpus, files, ENROLLMENT_SIDE[condition], enrolled_segment, min_enrollment_seconds
    )
    test = embed_side(
        corpus,
        files if test_files is None else test_files,
        TEST_SIDE[condition],
        tested_segment,
        min_test_seconds,
        distortion,
    )
    enrollment_cohort = scoring.cohort(condition.enrollment_channel)
    test_cohort = scoring.cohort(condition.test_channel)
    top_n = scoring.calibration.cohort_top_n
    # The plain cosine, as the service scored before normalisation, for comparison.
    raw = score_trials(enrollment, test, normalize=None)
    enrollment = prepared(scoring, enrollment, condition.enrollment_channel)
    test = prepared(scoring, test, condition.test_channel)
    normalize = (
        top_n_statistics(enrollment.embeddings @ enrollment_cohort.embeddings.T, top_n),
        top_n_statistics(test.embeddings @ test_cohort.embeddings.T, top_n),
    )
    normalized = score_trials(enrollment, test, normalize=normalize)
    calibration = scoring.calibration[condition]
    llr = np.vectorize(calibration.llr, otypes=[np.float64])
    llr_target = llr(
        normalized.target, normalized.target_seconds, normalized.target_enrollment_seconds
    )
    llr_impostor = llr(
        normalized.impostor, normalized.impostor_seconds, normalized.impostor_enrollment_seconds
    )
    accepted_target = accepted_by(
        calibration,
        policy,
        normalized.target,
        normalized.target_seconds,
        _enrollment_seconds(normalized.target_enrollment_seconds),
    )
    accepted_impostor = accepted_by(
        calibration,
        policy,
        normalized.impostor,
        normalized.impostor_seconds,
        _enrollment_seconds(normalized.impostor_enrollment_seconds),
    )
    long_target = normalized.target_seconds > CALIBRATED_BEFORE
    long_impostor = normalized.impostor_seconds > CALIBRATED_BEFORE
    return ConditionResult(
        condition,
        duration,
        distortion,
        raw,
        normalized,
        llr_target,
        llr_impostor,
        (
            Rate(int(accepted_impostor.sum()), len(normalized.impostor)),
            Rate(int((~accepted_target).sum()), len(normalized.target)),
        ),
        (
            Rate(int(accepted_impostor[long_impostor].sum()), int(long_impostor.sum())),
            Rate(int((~accepted_target[long_target]).sum()), int(long_target.sum())),
        ),
        int(
            (accepted_target & (llr_target < 0)).sum()
            + (accepted_impostor & (llr_impostor < 0)).sum()
        ),
        len(files),
        len(test.speakers),
        float(np.median(test.net_speech_seconds)) if len(test.speakers) else 0.0,
    )


def shift_condition(distortion: Distortion) -> Condition:
    """How the service scores a distorted test: wideband against the wideband voiceprint,
    telephone against the telephone companion."""
    return Condition.WIDEBAND if distortion.channel is Channel.WIDEBAND else Condition.TELEPHONE


def _enrollment_seconds(seconds: Vector | None) -> Vector:
    if seconds is None:
        raise ValueError("these trials do not say how long their voiceprints are")
    return seconds


def accepted_by(
    calibration: ConditionCalibration,
    policy: ScoringPolicy,
    scores: Vector,
    seconds: Vector,
    enrollment_seconds: Vector,
) -> npt.NDArray[np.bool_]:
    """Which trials the service would accept: its own bound for each trial's lengths."""
    needed = np.array(
        [
            calibration.bound(
                policy.target_fmr,
                float(length),
                enrollment_seconds=float(enrolled),
                min_llr=policy.min_llr,
                evidence_from_seconds=policy.evidence_from_seconds,
            ).normalized
            for length, enrolled in zip(seconds, enrollment_seconds, strict=True)
        ]
    )
    accepted: npt.NDArray[np.bool_] = scores >= needed
    return accepted


def _report(result: ConditionResult, target_fmr: float) -> list[str]:
    lines = []
    for name, trials in (("cosine", result.raw), ("AS-norm", result.normalized)):
        eer, _ = equal_error_rate(trials)
        eer_rate = Rate(round(eer * len(trials.target)), len(trials.target))
        low, high = eer_rate.interval()
        lines.append(
            f"  {name:8} EER {eer:.2%} ({low:.2%}-{high:.2%})  "
            f"minDCF(0.01) {min_dcf(trials):.3f}  "
            + "  ".join(f"FNMR@FMR{fmr:g} {fnmr_at_fmr(trials, fmr)}" for fmr in REPORTED_FMRS)
        )
    fmr, fnmr = result.at_policy
    lines.append(
        f"  service  at its threshold for FMR {target_fmr:g}: FMR {fmr}, FNMR {fnmr}; "
        f"Cllr {cllr(result.llr_target, result.llr_impostor):.3f}; "
        f"ACCEPT with a negative LLR: {result.accepted_against_evidence}"
    )
    long_fmr, long_fnmr = result.long_at_policy
    if long_fmr.trials or long_fnmr.trials:
        lines.append(
            f"  tests longer than {CALIBRATED_BEFORE:g} s: FMR {long_fmr}, FNMR {long_fnmr}"
        )
    return lines


def _figures(result: ConditionResult, target_fmr: float) -> dict[str, object]:
    """One condition's figures as `voxauth report` shows them."""
    fmr, fnmr = result.at_policy
    return {
        "name": result.name,
        "target_trials": len(result.raw.target),
        "impostor_trials": len(result.raw.impostor),
        "eer_cosine": equal_error_rate(result.raw)[0],
        "eer_normalized": equal_error_rate(result.normalized)[0],
        "fmr_at_policy": str(fmr),
        "fnmr_at_policy": str(fnmr),
        "report": _report(result, target_fmr),
    }


def write_det_plot(results: Sequence[ConditionResult], path: Path) -> None:
    """DET curves (probit axes) of every condition, AS-norm solid and plain cosine dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probit = np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])
    ticks = [0.0001, 0.001, 0.01, 0.05, 0.2, 0.4]
    labels = [f"{t * 100:g}%" for t in ticks]
    figure, axes = plt.subplots(figsize=(7, 6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, result in enumerate(results):
        for trials, style, name in (
            (result.normalized, "-", "AS-norm"),
            (result.raw, "--", "cosine"),
        ):
            _, fmr, fnmr = error_curve(trials)
            keep = (fmr > 0) & (fnmr > 0) & (fmr < 1) & (fnmr < 1)
            eer, _ = equal_error_rate(trials)
            axes.plot(
                probit(fmr[keep]),
                probit(fnmr[keep]),
                style,
                color=colours[index % len(colours)],
                label=f"{result.name}, {name} (EER {eer:.2%})",
            )
    axes.set_xticks(probit(ticks), labels)
    axes.set_yticks(probit(ticks), labels)
    axes.set_xlim(probit(0.00005), probit(0.5))
    axes.set_ylim(probit(0.0005), probit(0.5))
    axes.set_xlabel("false-match rate")
    axes.set_ylabel("false-non-match rate")
    axes.set_title("voxauth eval: DET curves")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxauth eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="folder of speakers' audio (FLAC or WAV)")
    parser.add_argument(
        "--condition",
        action="append",
        choices=[c.value for c in Condition],
        help="channel condition; repeat for several (default: all three)",
    )
    parser.add_argument(
        "--duration",
        action="append",
        type=duration_choice,
        help="net speech of each test (a number of seconds, e.g. 3, 8, or full: of the "
        "second half against the first; minimum: the service's minimum for the test's "
        "channel; "
        "long: all after the file's first 4.5 s against its first 4 s; long-enrollment: the "
        "first 3 s against all after 4 s); repeat for several (default: full)",
    )
    parser.add_argument(
        "--shift",
        action="append",
        choices=[d.value for d in Distortion] + ["all"],
        help="also test through a domain shift (noise, room, codec, speed, word strings); "
        "repeat for several, or 'all'",
    )
    parser.add_argument(
        "--target-fmr",
        type=float,
        help="false-match rate the threshold is set for (default: config)",
    )
    parser.add_argument("--det", type=Path, default=Path("var/det.png"), help="DET plot (PNG)")
    parser.add_argument(
        "--results",
        type=Path,
        help="the figures as JSON, for `voxauth report` and the console (default "
        "VOXAUTH_EVAL_RESULTS, var/eval.json)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("var/eval-cache"), help="embedding cache folder"
    )
    parser.add_argument("--model-dir", type=Path, help="verified model files")
    parser.add_argument(
        "--all-trials",
        action="store_true",
        help="score halves with less net speech than the service's minimums too",
    )
    args = parser.parse_args(argv)

    from models.ecapa import EcapaEmbedder
    from models.fetch import default_model_dir
    from server.config import ServerConfig
    from server.pipeline import silero
    from server.pipeline.silero import SileroSpeechDetector

    config = ServerConfig.from_environment()
    target_fmr = config.scoring.target_fmr if args.target_fmr is None else args.target_fmr
    policy = replace(config.scoring, target_fmr=target_fmr)
    conditions = [Condition(c) for c in args.condition or [c.value for c in Condition]]
    durations = args.duration or ["full"]
    shifts = (
        list(Distortion)
        if "all" in (args.shift or [])
        else [Distortion(d) for d in args.shift or []]
    )
    all_files = recordings(args.directory)
    if not all_files:
        print(f"voxauth eval: no .flac or .wav files under {args.directory}", file=sys.stderr)
        return 2
    embedder = EcapaEmbedder.load(args.model_dir or config.model_dir or default_model_dir())
    scoring = ScoringModel.load(config.scoring, embedder.model_id)
    fitted_on = set(scoring.calibration.provenance.get("speakers", []))
    files = [r for r in all_files if r.speaker not in fitted_on]
    corpus = SpeechCorpus(
        embedder,
        SileroSpeechDetector(),
        max_seconds=config.audio.max_seconds,
        cache_dir=args.cache,
        detector_version=silero.VERSION,
    )
    min_enrollment = 0.0 if args.all_trials else config.enrollment.min_utterance_net_speech_seconds
    started = time.perf_counter()
    print(f"model: {embedder.model_id}")
    held_out = len({r.speaker for r in files})
    print(
        f"speakers: {held_out} held out of {len({r.speaker for r in all_files})} "
        f"({len(all_files) - len(files)} files left out: their speakers made the cohort or the "
        "calibration)"
    )
    runs: list[tuple[Condition, str, Distortion | None]] = [
        (condition, duration, None) for duration in durations for condition in conditions
    ]
    runs += [(shift_condition(d), duration, d) for duration in durations for d in shifts]
    if MINIMUM in durations:
        print(
            "the service's minimums: "
            + ", ".join(
                f"{channel.value} {service_minimum(config.verification, channel):g} s"
                for channel in Channel
            )
        )
    results = []
    for condition, duration, distortion in runs:
        tested_channel = condition.test_channel
        needed = service_minimum(config.verification, tested_channel)
        if duration == MINIMUM:
            duration = f"{needed:g}"
        result = evaluate(
            corpus,
            files,
            scoring,
            condition,
            duration,
            policy=policy,
            min_enrollment_seconds=min_enrollment,
            min_test_seconds=0.0 if args.all_trials else needed,
            distortion=distortion,
        )
        name = result.name
        if len(result.raw.target) == 0 or len(result.raw.impostor) == 0:
            print(f"{name}: no trials (no test half holds that much net speech)")
            continue
        print(
            f"{name}: {len(result.raw.target)} target, {len(result.raw.impostor)} impostor "
            f"trials; tests with enough speech: {result.tests} of {result.files} files, "
            f"median net speech {result.median_test_seconds:.1f} s"
        )
        for line in _report(result, target_fmr):
            print(line)
        results.append(result)
    if not results:
        print("voxauth eval: need at least two speakers with enough speech", file=sys.stderr)
        return 2
    write_det_plot(results, args.det)
    write_evaluation(
        args.results or config.eval_results_path,
        model=embedder.model_id,
        target_fmr=target_fmr,
        speakers=held_out,
        conditions=[_figures(result, target_fmr) for result in results],
        det_plot=args.det,
    )
    print(
        f"DET curves: {args.det}  ({time.perf_counter() - started:.0f} s, "
        f"{corpus.computed} segments embedded, the rest from {args.cache})"
    )
    return 0
