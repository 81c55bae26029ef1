"""Triton kernels of geomcompile, installed as ``geomcompile.kernels`` (never a top-level ``kernels``).

One file per kernel family, each with a small Python launcher. Kernels know nothing about FX or YAML.

* ``channel_directed``: re-weighted H0 and Sobolev metrics, alone or fused with SGD / Adam
* ``psi``: PSI gradient, alone or fused with SGD / Adam and the renormalisation; renormalisation alone
* ``spectral``: no fused update kernel; ``_jacobi_eigh_kernel``, the sync-free eigensolver of spectral's small matrices on a GPU
* ``optim_updates``: torch.optim's SGD and Adam element updates as @triton.jit helpers
* ``tables``: the device tables (pointers, shapes, strides) that let one launch serve a bucket's size class
* ``report``: ``python -m geomcompile.kernels.report --target sm_90``: registers, spills, wide loads and
  64-bit divisions of every kernel configuration, compiled without a GPU

Importing a kernel module runs @triton.jit, which picks the Triton interpreter if TRITON_INTERPRET=1
is set *at that moment*; this package imports nothing, so set the variable before the first import.
See docs/triton.md.
"""
