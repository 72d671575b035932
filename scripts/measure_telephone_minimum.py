"""Measures how a check's false non-matches at the service's bound fall with its net speech, on
the same trials at every length: the figures behind the telephone minimum of net speech
(VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS_TELEPHONE; README, "Accuracy").

    PYTHONPATH=$PWD:$PWD/proto .venv/bin/python scripts/measure_telephone_minimum.py \
        /work/shared/data/librispeech-train-clean-100 --lengths 3 4 5 6

`voxauth eval --duration N` tests every held-out file whose second half holds N s of net
speech, so the longer the test, the fewer (and the more talkative) the speakers: its figures
at two lengths differ by length and by speakers at once. Here only the files whose second
half holds the longest length are tested (all held-out files still enroll, as in `voxauth
eval`), each cut to the first N s of that speech for every N: the trials are the same pairs
at every length, and what changes is the length alone. Prints per condition and length the
FMR and FNMR at the service's bound for 1 in 10,000 (95% Wilson intervals) and ACCEPTs with a
negative LLR, and between consecutive lengths the genuine checks that change their decision
(with the two-sided sign-test p-value). The minimum of the test's channel is not applied
(every length is scored), the enrollment minimum is. Reads `voxauth eval`'s embedding cache
(`--cache`); lengths it has not embedded are embedded (a minute or two each on two cores).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.ecapa import EcapaEmbedder
from models.fetch import default_model_dir
from server.config import ServerConfig
from server.pipeline import silero
from server.pipeline.silero import SileroSpeechDetector
from server.scoring.calibration import Condition
from server.scoring.scorer import ScoringModel
from server.tools.corpus import Part, Segment, SpeechCorpus, recordings
from server.tools.evaluation import TEST_SIDE, accepted_by, evaluate

Accepted = npt.NDArray[np.bool_]


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test of `gained` against `lost` changed decisions."""
    changed = gained + lost
    if changed == 0:
        return 1.0
    tail = float(sum(math.comb(changed, k) for k in range(min(gained, lost) + 1))) / 2.0**changed
    return min(1.0, 2 * tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--lengths", type=float, nargs="+", default=[3.0, 4.0, 5.0, 6.0])
    parser.add_argument(
        "--condition",
        action="append",
        choices=[c.value for c in Condition],
        help="repeat for several (default: all three)",
    )
    parser.add_argument("--cache", type=Path, default=Path("var/eval-cache"))
    args = parser.parse_args()
    lengths = sorted(args.lengths)
    conditions = [Condition(c) for c in args.condition or [c.value for c in Condition]]

    config = ServerConfig.from_environment()
    policy = config.scoring
    embedder = EcapaEmbedder.load(config.model_dir or default_model_dir())
    scoring = ScoringModel.load(config.scoring, embedder.model_id)
    corpus = SpeechCorpus(
        embedder,
        SileroSpeechDetector(),
        max_seconds=config.audio.max_seconds,
        cache_dir=args.cache,
        detector_version=silero.VERSION,
    )
    fitted_on = set(scoring.calibration.provenance.get("speakers", []))
    held_out = [r for r in recordings(args.directory) if r.speaker not in fitted_on]
    longest = Segment(Part.SECOND_HALF, 0.0, lengths[-1])
    print(f"model: {embedder.model_id}; {len(held_out)} held-out files enroll")
    for condition in conditions:
        tested = [
            r
            for r in held_out
            if corpus.embed(r, TEST_SIDE[condition], longest).embedding is not None
        ]
        print(
            f"{condition.value}: {len(tested)} files whose second half holds "
            f"{lengths[-1]:g} s of net speech are tested at every length"
        )
        calibration = scoring.calibration[condition]
        previous: Accepted | None = None
        for length in lengths:
            result = evaluate(
                corpus,
                held_out,
                scoring,
                condition,
                f"{length:g}",
                policy=policy,
                min_enrollment_seconds=config.enrollment.min_utterance_net_speech_seconds,
                min_test_seconds=0.0,
                test_files=tested,
            )
            trials = result.normalized
            assert trials.target_enrollment_seconds is not None
            accepted = accepted_by(
                calibration,
                policy,
                trials.target,
                trials.target_seconds,
                trials.target_enrollment_seconds,
            )
            fmr, fnmr = result.at_policy
            line = (
                f"  {length:g} s: {len(trials.target)} target / {len(trials.impostor)} impostor "
                f"trials; FMR {fmr}; FNMR {fnmr}; ACCEPT with a negative LLR: "
                f"{result.accepted_against_evidence}"
            )
            if previous is not None:
                if len(previous) != len(accepted):
                    raise RuntimeError("the lengths' trials differ: not one set of files")
                gained = int((accepted & ~previous).sum())
                lost = int((previous & ~accepted).sum())
                line += (
                    f"; against the length before: {gained} genuine checks accepted, {lost} "
                    f"rejected that were not (sign test p = {sign_test(gained, lost):.2f})"
                )
            print(line)
            previous = accepted
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
