"""Deliberate breaks of the library and how many fuzz programs catch each (issue 23; three of
the planned fifteen so far).

    python tests/mutation/breaks.py [BREAK ...] [--tests DIR]

runs the fuzzer's 300 derandomized programs (CI's) against the library with one break applied
in this process (a wrapper around one function: the library's files are not touched) and
prints, per break, how many programs failed, i.e. caught it. ``--tests DIR``: another commit's
``tests/`` (its ``fuzz_programs.py``), to compare generators. Breaks:

* ``bit-flip-on-reload``: the lowest bit of the first element of every tensor read back;
* ``inplace-check-off-offloaded``: an offloaded tensor modified in place after it was saved is
  not detected (``Handle.modified_in_place`` always False);
* ``inplace-check-off-kept``: the same for tensors kept in memory (``Saved.get`` returns the
  tensor whatever its version).
"""
import argparse
import os
import sys
import tempfile

import torch

BREAKS = ("bit-flip-on-reload", "inplace-check-off-offloaded", "inplace-check-off-kept")


def apply(name: str):
    """Apply break ``name``; returns a function that undoes it."""
    import ssdoffload.hooks as hooks
    from ssdoffload.cache import Handle

    if name == "bit-flip-on-reload":
        original = hooks.SavedTensorHooks.unpack

        def unpack(self, packed):
            out = original(self, packed)
            if type(packed) is Handle and packed.entry.read_future is not None and out.numel() \
                    and out.is_floating_point():
                out = out.clone()
                ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
                out.view(-1)[:1].view(ints).bitwise_xor_(1)
            return out
        hooks.SavedTensorHooks.unpack = unpack
        return lambda: setattr(hooks.SavedTensorHooks, "unpack", original)
    if name == "inplace-check-off-offloaded":
        original = Handle.modified_in_place
        Handle.modified_in_place = lambda self: False
        return lambda: setattr(Handle, "modified_in_place", original)
    if name == "inplace-check-off-kept":
        original = hooks.Saved.get
        hooks.Saved.get = lambda self: self.tensor
        return lambda: setattr(hooks.Saved, "get", original)
    raise SystemExit(f"unknown break {name!r}: one of {', '.join(BREAKS)}")


def caught(name: str, examples: int = 300) -> tuple:
    from hypothesis import HealthCheck, given, settings

    from fuzz_programs import check_program, programs

    root = tempfile.mkdtemp()
    n = [0, 0]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(programs())
    def run(p):
        n[0] += 1
        try:
            check_program(p, root)
        except AssertionError:
            n[1] += 1
    undo = apply(name)
    try:
        run()
    finally:
        undo()
    return n[1], n[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("breaks", nargs="*", default=list(BREAKS))
    ap.add_argument("--tests", default=os.path.join(os.path.dirname(__file__), ".."))
    a = ap.parse_args()
    sys.path.insert(0, a.tests)
    import logging
    logging.disable(logging.WARNING)
    for name in a.breaks:
        got, of = caught(name)
        print(f"{name}: caught by {got} of {of} programs")


if __name__ == "__main__":
    main()
