"""A deliberate break and how many fuzz programs catch it: one bit flipped in the first element of
every tensor read back from the SSD (issue 23's first mutation; the others are still to come).

    python tests/mutation/bit_flip_on_reload.py [DIR-WITH-fuzz_programs.py]

runs the fuzzer's 300 derandomized programs (CI's) against the broken library and prints how many
failed, i.e. caught it (the optional argument: another commit's tests/, to compare generators).
The break is applied by wrapping ``SavedTensorHooks.unpack`` in this process: the library's
files are not touched."""
import sys, tempfile, torch
import os
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
from hypothesis import given, settings, HealthCheck
import fuzz_programs
from fuzz_programs import programs, check_program
import logging; logging.disable(logging.WARNING)
import ssdoffload.hooks as H
from ssdoffload.cache import Handle
orig = H.SavedTensorHooks.unpack
def unpack(self, packed):
    out = orig(self, packed)
    if type(packed) is Handle and packed.entry.read_future is not None and out.numel() and out.is_floating_point():
        out = out.clone()
        flat = out.view(-1)
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
        flat[:1].view(ints).bitwise_xor_(1)
    return out
H.SavedTensorHooks.unpack = unpack
root = tempfile.mkdtemp(); n = [0, 0]
@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(programs())
def t(p):
    n[0] += 1
    try:
        check_program(p, root)
    except AssertionError:
        n[1] += 1
t()
print(f"bit flipped on reload: {n[1]} of {n[0]} programs caught it")
