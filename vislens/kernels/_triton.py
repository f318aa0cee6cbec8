"""What the Triton kernels share: block sizes for a GPU or for the CPU interpreter."""

from __future__ import annotations

import os

import triton

# Read when the kernels are decorated, as Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK = 2**20  # elements: Triton refuses larger blocks


def block(n: int, gpu: int, interpreted: int = MAX_BLOCK) -> int:
    """A power-of-two block covering up to n elements of one dimension.

    At most `gpu` on a GPU (registers), or `interpreted` under the interpreter, where each
    program instance costs ~2 ms, so fewer, larger blocks are faster.
    """
    return min(triton.next_power_of_2(max(n, 1)), interpreted if INTERPRET else gpu)
