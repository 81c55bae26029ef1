"""Test-wide setup. Triton kernels run on CPU under the Triton interpreter, which must be chosen
before triton is first imported; set TRITON_INTERPRET=0 yourself to run them compiled on a GPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
