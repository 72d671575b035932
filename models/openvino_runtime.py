"""What every OpenVINO network of the service (ECAPA, AASIST, Silero) needs beyond compiling.

The first inference of a process initialises a function-local static inside OpenVINO's Python
bindings (by the stacks of the hang below, on the way from `InferRequest.infer` to
`Tensor.data`) while holding the GIL only part of the time. Two
threads making their first inference at once can deadlock there: one holds the static's guard
and waits for the GIL, the other holds the GIL and waits for the guard. It was seen: `voxauth
attacks features` with two workers hung for minutes in `InferRequest.infer` with both workers
blocked, no CPU used. The service's two workers meet the same race on the first two requests
after a start. So every compiled network runs one inference in the thread that loads it,
before any worker can call it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import openvino as ov


def warm_up(compiled: ov.CompiledModel, example: npt.NDArray[np.float32]) -> None:
    """Run `compiled` once on `example` in a request of its own, reading every output, then
    drop the request (it holds the activations' memory)."""
    request = compiled.create_infer_request()
    request.infer({0: example})
    for index in range(len(compiled.outputs)):
        np.array(request.get_output_tensor(index).data)


def stream_settings(workers: int, threads: int) -> dict[str, int | bool]:
    """Compile settings for `workers` concurrent callers with `threads` intra-op threads
    each, one OpenVINO stream per caller.

    Without pinning: OpenVINO pins each compiled network's stream n to core n, so the speaker
    network's first stream and the countermeasure's, which a check runs side by side, shared
    core 0 while core 1 idled (ECAPA 80 -> 134 ms and AASIST 195 -> 248 ms run together with
    pinning; 74 and 145 ms without, the same as alone; README, "Speed").
    """
    return {
        "NUM_STREAMS": workers,
        "INFERENCE_NUM_THREADS": workers * threads,
        "ENABLE_CPU_PINNING": False,
    }
