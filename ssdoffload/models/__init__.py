"""Reference models the library itself uses: the GPT the planner profiles (``plan
--profile``) and the benchmark trains. Tests and examples use it too; it is not part of the
offloading API (no library module imports the benchmark)."""
from .gpt import GPT, GPTConfig, synthetic_batch

__all__ = ["GPT", "GPTConfig", "synthetic_batch"]
