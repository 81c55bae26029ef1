"""Triton kernels against the eager reference (geometries/*.py and torch.optim), on CPU tensors
under the Triton interpreter.

TRITON_INTERPRET must be set before the kernels are first imported (@triton.jit picks the
interpreter at decoration time), hence the first lines. Shapes are odd on purpose (no multiple of
any block size), blocks are forced small to run the multi-pass paths, and every failure lists the
mismatching elements. bf16 tolerances are two bf16 ulps: the interpreter rounds fp32 -> bf16 by
truncation, the GPU (and torch) to nearest even.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import textwrap

import pytest
import torch

import triton  # noqa: E402,F401  (a missing triton fails the suite: the test command installs it)

from geomcompile.geometries.channel_directed import reweighted_h0, sobolev  # noqa: E402
from geomcompile.geometries.psi import _expand_per_unit, psi_grad, psi_renorm_factors  # noqa: E402
from geomcompile.kernels.channel_directed import channel_directed  # noqa: E402
from geomcompile.kernels.optim_updates import AdamUpdate, SGDUpdate  # noqa: E402
from geomcompile.kernels.psi import psi, psi_renorm  # noqa: E402
from geomcompile.kernels.tables import TableCache  # noqa: E402
from geomcompile.runtime.triton_backend import interpreted  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DTYPES = list(TOL)
REFERENCE = {"h0": reweighted_h0, "sobolev": sobolev}


def test_kernels_run_under_the_interpreter():
    assert interpreted(), ("geomcompile.kernels was imported before TRITON_INTERPRET=1 was set; "
                           "these CPU tests need the interpreter")


def assert_close(got, expected, dtype, what):
    """Like torch.testing.assert_close, listing the first mismatching elements."""
    got, expected = got.detach().float(), expected.detach().float()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(got, expected, **TOL[dtype])
    if bad.any():
        rows = [f"  {tuple(i)}: got {got[tuple(i)].item():.8g}, expected {expected[tuple(i)].item():.8g}"
                for i in bad.nonzero()[:8].tolist()]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} elements mismatch ({TOL[dtype]}):\n"
                    + "\n".join(rows))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


# (shape, out_dim): odd sizes, O = 1, O > 64 (two passes by default), out_dim 1 (conv-transpose),
# zero-size tensors, and three non-contiguous layouts made by `layout` below.
# Rows of 8 or 16 elements (contiguous or channels_last) take the aligned path, in one tile and in two passes.
CD_CASES = [((7, 5, 3), 0), ((5, 7, 3, 3), 1), ((1, 9), 0), ((70, 3), 0), ((0, 4), 0), ((3, 0, 2), 1),
            ((6, 5), "transposed"), ((9, 4), "sliced"), ((4, 3, 3, 3), "channels_last"),
            ((6, 8), 0), ((70, 16), 0), ((8, 4, 2, 2), "channels_last")]


def _grad(shape, layout, dtype, gen):
    """A gradient of `shape` with a given memory layout, and the dim to read it along."""
    if layout == "transposed":                                   # strides (1, O): viewable, not contiguous
        return _randn(shape[::-1], dtype, gen).t(), 0
    if layout == "sliced":                                       # every other column of a wider tensor
        return _randn((shape[0], 2 * shape[1]), dtype, gen)[:, ::2], 0
    if layout == "channels_last":                                # rows dense in memory: read in place
        return _randn(shape, dtype, gen).to(memory_format=torch.channels_last), 0
    return _randn(shape, dtype, gen), layout


@pytest.mark.parametrize("blocks", [None, (4, 8)], ids=["default_blocks", "small_blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_channel_directed_transform_matches_eager(metric, dtype, blocks):
    gen = _gen(0)
    grads, dims = zip(*[_grad(shape, layout, dtype, gen) for shape, layout in CD_CASES])
    expected = [REFERENCE[metric](g, 0.7, dim=d, mix=0.3) for g, d in zip(grads, dims)]
    got = list(grads)                                            # one launch for the whole bucket, in place
    block_o, block_r = blocks or (None, None)
    channel_directed(got, dims, metric, 0.7, 0.3, block_o=block_o, block_r=block_r)
    for (shape, layout), g, e in zip(CD_CASES, got, expected):
        assert_close(g, e, dtype, f"{metric} {shape} {layout}")
    assert got[6].stride() == (1, 6) and got[8].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_channel_directed_without_mix_and_o_equal_one_is_identity_for_sobolev(metric):
    g = _randn((1, 11), torch.float32, _gen(1))
    got = g.clone()
    channel_directed([got], [0], metric, 0.25, 0.0)
    assert_close(got, REFERENCE[metric](g, 0.25, dim=0), torch.float32, metric)
    if metric == "sobolev":
        assert_close(got, g, torch.float32, "sobolev with O = 1 is the identity")


def test_layouts_choose_the_aligned_path_and_channels_last_needs_no_copy():
    from geomcompile.kernels.tables import Operand, Staged
    gen = _gen(11)

    def layout(*tensors, dim=0):
        staged = Staged([Operand(list(tensors), dim)], written_roles=(0,))
        op = staged.operands[0]
        op.set_layout()
        return ("aligned" if op.dense else "dense rows" if op.rows_dense else "strided"), len(staged._copies)

    cl = _randn((8, 4, 2, 2), torch.float32, gen).to(memory_format=torch.channels_last)
    assert layout(_randn((6, 8), torch.float32, gen)) == ("aligned", 0)
    assert layout(_randn((6, 8), torch.bfloat16, gen)) == ("aligned", 0)          # 8 bf16 = 16 bytes
    assert layout(_randn((6, 4), torch.bfloat16, gen)) == ("dense rows", 0)       # 8-byte rows: strided path
    assert layout(cl, torch.empty_like(cl)) == ("aligned", 0)                     # all roles channels_last
    assert layout(_randn((6, 8), torch.float32, gen)[:, ::2]) == ("strided", 0)
    assert layout(_randn((6, 9), torch.float32, gen)[:, 1:]) == ("strided", 0)    # rows 9 apart: not dense
    assert layout(_randn((49,), torch.float32, gen)[1:].view(6, 8)) == ("dense rows", 0)   # base 4 bytes off
    assert layout(_randn((7, 5, 3), torch.float32, gen), dim=1) == ("strided", 0)
    assert layout(cl, cl.contiguous()) == ("aligned", 1)    # mixed formats: the channels_last role is copied


def test_channels_last_fused_step_in_place_matches_eager():
    """A channels_last weight with channels_last gradient and momentum: the aligned path updates them
    in place (no staging copy), like eager transform + torch's step."""
    gen = _gen(12)
    w0 = _randn((8, 4, 3, 3), torch.float32, gen).to(memory_format=torch.channels_last)
    g = _randn((8, 4, 3, 3), torch.float32, gen).to(memory_format=torch.channels_last)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    ref.grad = sobolev(g, 0.5, mix=0.2)
    opt.step()
    w, buf = w0.clone(), torch.empty_like(w0)
    assert buf.is_contiguous(memory_format=torch.channels_last)
    channel_directed([g], [0], "sobolev", 0.5, 0.2, weights=[w], states=[[buf]], first=[True],
                     update=SGDUpdate(0.1, 0.9))
    assert_close(w, ref, torch.float32, "channels_last weight")
    assert_close(buf, opt.state[ref]["momentum_buffer"], torch.float32, "channels_last momentum buffer")
    assert w.is_contiguous(memory_format=torch.channels_last)


# (shape, (unit, dim, group_size))
PSI_CASES = [((7, 5, 3), ("row", 0, None)), ((5, 6, 3), ("group", 1, 2)), ((5, 3), ("tensor", 0, None)),
             ((1, 9), ("row", 0, None)), ((6, 4, 2), ("row", 1, None)), ((0, 3), ("row", 0, None)),
             ((11,), ("row", 0, None)), ((0, 4), ("tensor", 0, None)),
             ((5, 8), ("row", 0, None)), ((6, 16), ("group", 0, 2))]   # aligned path (one tile; multi-pass with block 8)


@pytest.mark.parametrize("block", [None, 8], ids=["one_tile", "multi_pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_psi_grad_matches_eager(dtype, block):
    gen = _gen(2)
    weights = [_randn(s, dtype, gen) for s, _ in PSI_CASES]
    grads = [_randn(s, dtype, gen) for s, _ in PSI_CASES]
    grads[0] = _randn((3, 5, 7), dtype, gen).permute(2, 1, 0)     # non-contiguous gradient, odd strides
    layouts = [lay for _, lay in PSI_CASES]
    expected = [psi_grad(w, g, *lay) for w, g, lay in zip(weights, grads, layouts)]
    got = [g.clone() if i else g for i, g in enumerate(grads)]
    psi(weights, got, layouts, block=block)
    for (shape, lay), g, e in zip(PSI_CASES, got, expected):
        assert_close(g, e, dtype, f"psi_grad {shape} {lay}")


def test_psi_units_larger_than_a_tile_take_the_multi_pass_class_by_default():
    """A 2,056-element row (above the largest one-tile class) next to small rows: each gets its own
    class (one launch each) and both match eager, fused with SGD momentum."""
    from geomcompile.kernels.psi import UNIT_CLASSES
    gen = _gen(13)
    shapes = [(2, UNIT_CLASSES[-1] + 8), (6, 8)]
    weights = [_randn(s, torch.float32, gen) for s in shapes]
    grads = [_randn(s, torch.float32, gen) for s in shapes]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for p, g in zip(ref, grads):
        p.grad = psi_grad(p.detach(), g)
    opt.step()
    bufs = [torch.empty_like(w) for w in weights]
    cache = TableCache()
    psi(weights, grads, [("row", 0, None)] * 2, update=SGDUpdate(0.1, 0.9), states=[[b] for b in bufs],
        first=[True, True], cache=cache, slot="s")
    assert cache.builds == 2, "the large row and the small rows are two size classes, two launches"
    for i, (w, b, p) in enumerate(zip(weights, bufs, ref)):
        assert_close(w, p, torch.float32, f"weight {i} {shapes[i]}")
        assert_close(b, opt.state[p]["momentum_buffer"], torch.float32, f"momentum {i} {shapes[i]}")


def _renorm_reference(w, max_norm, layout, states, powers):
    if w.numel() == 0:                                            # PSI.post_step skips empty weights
        return [w.clone(), *[s.clone() for s in states]], 0
    factors = psi_renorm_factors(w, max_norm, *layout)
    scale = _expand_per_unit(factors, w, *layout)
    out = [(w.float() * scale).to(w.dtype)] + [(s.float() * scale ** p).to(s.dtype) for s, p in zip(states, powers)]
    return out, int((factors != 1).sum())


@pytest.mark.parametrize("block", [None, 8], ids=["one_tile", "multi_pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_psi_renorm_matches_eager_and_counts_units(dtype, block):
    gen = _gen(3)
    layouts = [lay for _, lay in PSI_CASES]
    weights = [_randn(s, dtype, gen, scale=1.5) for s, _ in PSI_CASES]
    states = [[_randn(s, dtype, gen), torch.rand(s, generator=gen).to(dtype), _randn(s, dtype, gen)]
              for s, _ in PSI_CASES]
    powers = (1, 2, 1)
    expected = [_renorm_reference(w, 2.0, lay, st, powers) for w, lay, st in zip(weights, layouts, states)]
    counters = [torch.zeros((), dtype=torch.int64) for _ in weights]
    psi_renorm(weights, layouts, 2.0, states=states, powers=powers, counters=counters, block=block)
    for (shape, lay), w, st, c, (exp, n) in zip(PSI_CASES, weights, states, counters, expected):
        for name, got, e in zip(["weight", "state1", "state2", "state3"], [w, *st], exp):
            assert_close(got, e, dtype, f"renorm {shape} {lay} {name}")
        assert int(c) == n, f"{shape} {lay}: counted {int(c)} renormalised units, eager {n}"
    assert sum(int(c) for c in counters) > 0, "the case renormalised nothing"


# ---- fused with the base update ---------------------------------------------------------------
UPDATES = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1), lambda s: SGDUpdate(lr=0.1)),
    "sgd_momentum_wd_dampening": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
        lambda s: SGDUpdate(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    "sgd_nesterov_maximize": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True, maximize=True),
        lambda s: SGDUpdate(lr=0.1, momentum=0.8, nesterov=True, maximize=True)),
    "adam_wd": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
                lambda s: AdamUpdate(lr=0.01, weight_decay=0.1, step=s)),
    "adamw_maximize": (lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.3, 0.9), weight_decay=0.1, maximize=True),
                       lambda s: AdamUpdate(lr=0.01, beta1=0.3, beta2=0.9, weight_decay=0.1, decoupled=True,
                                            maximize=True, step=s)),
}
FUSED_SHAPES = [((7, 5, 3), 0), ((1, 6), 0), ((4, 6, 3), 1), ((0, 3), 0), ((9, 5), 0)]


def _fused_run(kernel, opt_name, dtype, steps=2, **blocks):
    """Eager transform + torch.optim step (in fp32: the kernels' math) vs the fused kernel on `dtype`
    tensors, same gradients, `steps` steps (the first creates the state)."""
    make_opt, make_update = UPDATES[opt_name]
    gen = _gen(4)
    shapes = [s for s, _ in FUSED_SHAPES]
    dims = [d for _, d in FUSED_SHAPES]
    weights = [_randn(s, dtype, gen, scale=0.8) for s in shapes]
    ref = [torch.nn.Parameter(w.to(torch.float32, copy=True)) for w in weights]
    opt = make_opt(ref)
    n_state = len(make_update(1).state_keys)
    states = [[torch.zeros_like(w) for _ in range(n_state)] for w in weights]
    layouts = [("row", d, None) for d in dims]
    for step in range(1, steps + 1):
        grads = [_randn(s, dtype, gen) for s in shapes]
        for p, g, d, lay in zip(ref, [g.float() for g in grads], dims, layouts):
            p.grad = (sobolev(g, 0.5, dim=d, mix=0.2) if kernel == "sobolev" else
                      reweighted_h0(g, 0.5, dim=d) if kernel == "h0" else psi_grad(p.detach(), g, *lay))
        opt.step()
        first = [step == 1] * len(weights)
        if kernel == "psi":
            psi(weights, grads, layouts, update=make_update(step), states=states, first=first, **blocks)
        else:
            channel_directed(grads, dims, kernel, 0.5, 0.2 if kernel == "sobolev" else 0.0, weights=weights,
                             states=states, first=first, update=make_update(step), **blocks)
    return ref, opt, weights, states, make_update(1).state_keys


@pytest.mark.parametrize("opt_name", list(UPDATES))
@pytest.mark.parametrize("kernel", ["sobolev", "h0", "psi"])
def test_fused_update_matches_eager_transform_then_torch_step(kernel, opt_name):
    # channel_directed: two passes over row chunks; psi: whole units in one tile, and for one SGD and
    # one Adam case also the multi-pass path (slow under the interpreter)
    multi_pass = {"block": 8} if opt_name in ("sgd_momentum_wd_dampening", "adam_wd") else {}
    blocks = multi_pass if kernel == "psi" else {"block_o": 4, "block_r": 8}
    ref, opt, weights, states, keys = _fused_run(kernel, opt_name, torch.float32, **blocks)
    for i, (p, w, st) in enumerate(zip(ref, weights, states)):
        assert_close(w, p, torch.float32, f"{kernel}/{opt_name} weight {i}")
        for key, s in zip(keys, st):
            assert_close(s, opt.state[p][key], torch.float32, f"{kernel}/{opt_name} {key} {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["sobolev", "psi"])
def test_fused_update_low_precision(kernel, dtype):
    ref, opt, weights, states, keys = _fused_run(kernel, "adam_wd", dtype, steps=2)
    for i, (p, w, st) in enumerate(zip(ref, weights, states)):
        assert w.dtype == dtype
        assert_close(w, p, dtype, f"{kernel} weight {i}")


def test_fused_psi_renormalises_inside_the_kernel():
    """max_norm below the rows' norms: the fused kernel renormalises rows and rescales the momentum
    buffer, as PSI.post_step does after torch's step."""
    gen = _gen(5)
    w0 = _randn((6, 7), torch.float32, gen, scale=2.0)
    g = _randn((6, 7), torch.float32, gen)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    p.grad = psi_grad(p.detach(), g)
    opt.step()
    (w_ref, buf_ref), n = _renorm_reference(p.detach(), 3.0, ("row", 0, None), [opt.state[p]["momentum_buffer"]],
                                            (1,))
    for block in (None, 8):
        w, buf, counter = w0.clone(), torch.empty_like(w0), torch.zeros((), dtype=torch.int64)
        psi([w], [g], [("row", 0, None)], update=SGDUpdate(0.05, 0.9), states=[[buf]], first=[True], max_norm=3.0,
            counters=[counter], block=block)
        assert_close(w, w_ref, torch.float32, f"weight (block {block})")
        assert_close(buf, buf_ref, torch.float32, f"momentum buffer (block {block})")
        assert int(counter) == n > 0


# ---- buckets and tables -------------------------------------------------------------------------
def test_bucket_of_50_tensors_in_one_launch_per_size_class_and_table_cache():
    gen = _gen(6)
    shapes = [(1 + (7 * i) % 13, 1 + (5 * i) % 4, 1 + i % 3) for i in range(50)]
    grads = [_randn(s, torch.float32, gen) for s in shapes]
    weights = [_randn(s, torch.float32, gen) for s in shapes]
    cache = TableCache()
    got = [g.clone() for g in grads]
    channel_directed(got, [0] * 50, "sobolev", 0.5, 0.1, cache=cache, slot="cd")
    for i, (g, e) in enumerate(zip(got, [sobolev(g, 0.5, mix=0.1) for g in grads])):
        assert_close(e, g, torch.float32, f"sobolev tensor {i} {shapes[i]}")
    cd_classes = {_cd_schedule(g) for g in grads}
    assert cache.builds == len(cd_classes) > 1, "one table (one launch) per size class and layout"
    layouts = [("row", 0, None)] * 50
    got = [g.clone() for g in grads]
    psi(weights, got, layouts, cache=cache, slot="psi")
    for i, (g, e) in enumerate(zip(got, [psi_grad(w, g) for w, g in zip(weights, grads)])):
        assert_close(g, e, torch.float32, f"psi tensor {i} {shapes[i]}")
    builds = cache.builds
    assert builds == len(cd_classes) + len({_psi_schedule(w, got[i]) for i, w in enumerate(weights)})
    psi(weights, got, layouts, cache=cache, slot="psi")            # same storage: the tables are reused
    assert cache.builds == builds
    got[17] = got[17].clone()                                      # one new gradient: its class rebuilt once
    psi(weights, got, layouts, cache=cache, slot="psi")
    assert cache.builds == builds + 1


def _cd_schedule(g):
    from geomcompile.kernels.channel_directed import schedule_of
    from geomcompile.kernels.tables import Operand, vector_width
    op = Operand([g], 0)
    op.set_layout()
    return schedule_of(g.shape[0], op.dense, vector_width(g.dtype))


def _psi_schedule(w, g):
    from geomcompile.kernels.psi import schedule_of
    from geomcompile.kernels.tables import Operand, vector_width
    op = Operand([g, w], 0)
    op.set_layout()
    return schedule_of(w[0].numel(), op.dense, vector_width(w.dtype))


def test_launchers_reject_mixed_dtypes_and_missing_state():
    a, b = torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="one dtype"):
        channel_directed([a, b], [0, 0], "h0", 1.0)
    with pytest.raises(ValueError, match="state tensor"):
        channel_directed([a], [0], "h0", 1.0, weights=[a.clone()], states=[[]], update=AdamUpdate(0.1, step=1))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        psi([a.double()], [a.double()], [("row", 0, None)])


def test_tensors_of_2_31_elements_run_eager_not_the_int32_kernels():
    from geomcompile.kernels.tables import INDEX_LIMIT
    from geomcompile.runtime.triton_backend import TritonBackend
    huge = torch.zeros(1).expand(INDEX_LIMIT)                 # 2^31 elements, no memory behind them
    backend = TritonBackend()
    assert "2^31 elements" in backend.kernel_problem(huge)
    assert backend.kernel_problem(torch.zeros(INDEX_LIMIT // 2 ** 20, 4)) is None
    with pytest.raises(ValueError, match="fewer than 2\\^31"):
        psi([huge], [huge], [("row", 0, None)])


def test_kernels_compile_for_a_gpu_target():
    """Compile every kernel to a CUDA binary (sm_90) without a GPU: catches what the interpreter lets
    through (types, constexpr use) in a fresh process without TRITON_INTERPRET."""
    code = textwrap.dedent("""
        import os, torch
        os.environ.pop("TRITON_INTERPRET", None)
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from geomcompile.kernels import channel_directed as cd, psi

        def build(c):
            sig = {n: "constexpr" if n in c.constexprs else c.arg_types.get(n, "fp32") for n in c.kernel.arg_names}
            triton.compile(ASTSource(fn=c.kernel, signature=sig, constexprs=c.constexprs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": c.num_warps})

        # one configuration of each kernel and path (tests/test_kernel_report.py compiles them all)
        seen = set()
        for c in cd.configurations() + psi.configurations():
            key = (c.kernel.__name__, c.constexprs["DENSE"], c.constexprs["ONE_TILE"])
            if key not in seen:
                seen.add(key)
                build(c)
        assert len(seen) == 12, seen

        # and without the interpreter, backend="triton" refuses CPU parameters with the fix
        import geomcompile as gc
        from geomcompile.runtime.backends import select_backend
        try:
            select_backend("triton", [torch.zeros(2, 2)])
        except gc.GeomCompileError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("backend='triton' accepted CPU parameters without the interpreter")
        print("compiled")
    """)
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA compiler backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("ptxas, the CUDA assembler triton ships, is missing in this install")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


# ---- pom (FG-SGD): direction, state and retraction against geometries/pom.py ------------------------
from geomcompile.geometries.base import fit_dtype, finite_entries, pass_nonfinite  # noqa: E402
from geomcompile.geometries.pom import (as_components, component_grid, pom_direction, pom_max_group,  # noqa: E402
                                        pom_membership, pom_retract, pom_zeta)
from geomcompile.kernels.pom import groups_of, pom_retract_kernel, pom_transform  # noqa: E402

# odd sizes (no multiple of a tile side), 1-d and 3-d convolutions; filters also of a linear weight
# and one of 40 elements (chunked rows with the small blocks)
POM_SHAPES = {"kernel": [(5, 3, 3, 2), (4, 6, 3, 3), (3, 7, 5), (2, 3, 2, 3, 3)],
              "filter": [(5, 3, 3, 2), (6, 5), (9, 40), (3, 7, 5)]}
POM_RADII = [1.0, 0.37, 2.5, 1.3]


def _pom_reference(w, g, component, manifold, r, group_id, n_groups):
    """POM.pre_step on one weight: the new gradient, R of every group, whether anything was non-finite."""
    wc = finite_entries(as_components(w, component))
    out = {}

    def direction_of(gg):
        d, out["R"] = pom_direction(wc, as_components(gg, component), manifold, r, group_id.reshape(-1), n_groups)
        return fit_dtype(d.reshape(g.shape), g.dtype)
    new = pass_nonfinite(direction_of, g)
    bad = bool((~torch.isfinite(g)).any() or (~torch.isfinite(w)).any())
    return new, out["R"], bad


def _pom_bucket(component, grouping, dtype, gen, layout=None):
    """Weights, gradients and memberships of a bucket; group_size alternates 2 and the whole axis."""
    weights, grads, memberships = [], [], []
    for i, shape in enumerate(POM_SHAPES[component]):
        w, g = _randn(shape, dtype, gen), _randn(shape, dtype, gen, 0.7 + i)
        if layout == "channels_last" and len(shape) == 4:
            w, g = (t.contiguous(memory_format=torch.channels_last) for t in (w, g))
        grid, _, _ = component_grid(shape, component)
        size = 2 if i % 2 == 0 else 0
        gid, n_groups = pom_membership(grid, grouping, size, _gen(7 + i))
        weights.append(w)
        grads.append(g)
        memberships.append((gid, n_groups, pom_max_group(grid, grouping, size)))
    return weights, grads, memberships


def _stats():
    return (torch.zeros((), dtype=torch.int64), torch.zeros(()), torch.zeros((), dtype=torch.int64))


def _check_pom_transform(component, manifold, grouping, dtype, weights, grads, memberships, **blocks):
    expected = [_pom_reference(w, g, component, manifold, r, gid, n)
                for w, g, r, (gid, n, _) in zip(weights, grads, POM_RADII, memberships)]
    got = [g.clone(memory_format=torch.preserve_format) for g in grads]
    stats = [_stats() for _ in grads]
    record = []
    pom_transform(weights, got, component, manifold, POM_RADII,
                  [groups_of(gid, n, most, w.device) for w, (gid, n, most) in zip(weights, memberships)],
                  stats, record=record, **blocks)
    for shape, g, (new, R, bad), (nonfinite, top, normalised) in zip(POM_SHAPES[component], got, expected, stats):
        what = f"pom {component} {manifold} {grouping} {shape}"
        assert_close(torch.nan_to_num(g, nan=7.0), torch.nan_to_num(new, nan=7.0), dtype, what)   # NaN where eager has it
        torch.testing.assert_close(top, R.max(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} max R: {m}")
        assert int(normalised) == int((pom_zeta(R) > 1).sum()), what
        assert int(nonfinite) == int(bad), what
    return got, record


# the loop schedules (small blocks) in fp32; bf16 only changes the loads and stores
@pytest.mark.parametrize("dtype, blocks", [(torch.float32, {}), (torch.float32, {"block_m": 2, "block_n": 16}),
                                           (torch.bfloat16, {})], ids=["fp32", "fp32_small_blocks", "bf16"])
@pytest.mark.parametrize("grouping", ["PI", "PO", "PIO", "none"])
@pytest.mark.parametrize("component, manifold", [("kernel", "sphere"), ("kernel", "oblique"), ("filter", "sphere")])
def test_pom_transform_matches_eager(component, manifold, grouping, dtype, blocks):
    weights, grads, memberships = _pom_bucket(component, grouping, dtype, _gen(3))
    _check_pom_transform(component, manifold, grouping, dtype, weights, grads, memberships, **blocks)


def test_pom_large_gradients_are_normalised_and_counted():
    """Gradients of norm ~1e3: every group's ζ > 1, so the direction is really divided (and counted)."""
    weights, grads, memberships = _pom_bucket("kernel", "PO", torch.float32, _gen(4))
    grads = [g * 1e3 for g in grads]
    got, _ = _check_pom_transform("kernel", "sphere", "PO", torch.float32, weights, grads, memberships)
    assert all(g.norm() < h.norm() / 10 for g, h in zip(got, grads))


@pytest.mark.parametrize("component", ["kernel", "filter"])
def test_pom_channels_last_is_read_in_place(component):
    weights, grads, memberships = _pom_bucket(component, "PI", torch.float32, _gen(5), layout="channels_last")
    got, record = _check_pom_transform(component, "sphere", "PI", torch.float32, weights, grads, memberships)
    assert None not in record, "a channels_last weight was staged through a copy"
    assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pom_nonfinite_entries_pass_through_and_are_counted(dtype):
    weights, grads, memberships = _pom_bucket("kernel", "PO", dtype, _gen(6))
    grads[0][1, 2, 0, 1] = float("nan")
    grads[1][0, 0, 1, 1] = float("inf")
    weights[2][2, 3, 4] = float("-inf")                     # read as 0 by the direction, counted
    got, _ = _check_pom_transform("kernel", "oblique", "PO", dtype, weights, grads, memberships)
    assert torch.isnan(got[0][1, 2, 0, 1]) and torch.isinf(got[1][0, 0, 1, 1])
    assert torch.isfinite(got[0]).sum() == got[0].numel() - 1     # the NaN did not spread over its group


@pytest.mark.parametrize("block_n", [None, 16], ids=["default_blocks", "chunked_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("component, manifold", [("kernel", "sphere"), ("kernel", "oblique"), ("filter", "sphere")])
def test_pom_retract_matches_eager(component, manifold, dtype, block_n):
    gen = _gen(8)
    weights = [_randn(shape, dtype, gen, 3.0) for shape in POM_SHAPES[component]]
    weights[0][1].zero_()                                   # zero components -> r·ones/√count
    weights[1].view(-1)[3] = float("nan")                   # its component stays as it is
    if len(POM_SHAPES[component][2]) == 2:
        weights[2][4, ::2] = 0.0
    expected = [pom_retract(as_components(w, component), manifold, r).reshape(w.shape).to(dtype)
                for w, r in zip(weights, POM_RADII)]
    got = [w.clone() for w in weights]
    pom_retract_kernel(got, component, manifold, POM_RADII, block_n=block_n)
    for shape, g, e in zip(POM_SHAPES[component], got, expected):
        assert_close(torch.nan_to_num(g, nan=7.0), torch.nan_to_num(e, nan=7.0), dtype,
                     f"pom retract {component} {manifold} {shape}")
    assert torch.isnan(got[1].view(-1)[3])


def test_pom_oblique_zero_column_and_strided_weight_retract():
    w = _randn((4, 5, 3, 3), torch.float32, _gen(9))[:, ::2]          # a strided view: G1/G2 strides only
    w[0, 1, :, 2] = 0.0
    expected = pom_retract(as_components(w, "kernel"), "oblique", 0.5).reshape(w.shape)
    pom_retract_kernel([w], "kernel", "oblique", [0.5])
    assert_close(w, expected, torch.float32, "oblique retraction of a strided weight")
    assert_close(w[0, 1, :, 2], torch.full((3,), 0.5 / 3 ** 0.5), torch.float32, "zero column")


def test_pom_launchers_reject_stiefel_and_mixed_dtypes():
    w = torch.randn(3, 2, 3, 3)
    gid, n = pom_membership((3, 2), "PI")
    with pytest.raises(ValueError, match="sphere and oblique"):
        pom_transform([w], [w.clone()], "kernel", "stiefel", [1.0], [groups_of(gid, n, 2, w.device)], [_stats()])
    with pytest.raises(ValueError, match="sphere and oblique"):
        pom_retract_kernel([w], "kernel", "stiefel", [1.0])
    with pytest.raises(ValueError, match="one dtype"):
        pom_transform([w, w.bfloat16()], [w.clone(), w.bfloat16()], "kernel", "sphere", [1.0, 1.0],
                      [groups_of(gid, n, 2, w.device)] * 2, [_stats(), _stats()])


@pytest.mark.parametrize("opt_name", list(UPDATES))
@pytest.mark.parametrize("component, manifold, grouping, blocks", [
    ("kernel", "sphere", "PI", {}), ("kernel", "oblique", "PO", {"block_m": 2}), ("kernel", "sphere", "none", {}),
    ("filter", "sphere", "PIO", {"block_m": 2, "block_n": 16})],        # 40-element filters: row chunks
    ids=["kernel_sphere_PI", "kernel_oblique_PO_member_loops", "kernel_none", "filter_PIO_row_chunks"])
def test_pom_fused_update_matches_direction_then_torch_step_then_retraction(component, manifold, grouping, blocks,
                                                                            opt_name):
    """The fused kernel against POM.pre_step's direction, torch's step and POM.post_step's retraction,
    two steps (the first creates the optimizer state), a NaN gradient entry in the second."""
    make_opt, make_update = UPDATES[opt_name]
    gen = _gen(12)
    weights, _, memberships = _pom_bucket(component, grouping, torch.float32, gen)
    weights = [pom_retract(as_components(w, component), manifold, r).reshape(w.shape) for w, r in
               zip(weights, POM_RADII)]                             # on the manifold, as after install
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = make_opt(ref)
    keys = make_update(1).state_keys
    states = [[torch.zeros_like(w) for _ in keys] for w in weights]
    groups = [groups_of(gid, n, most, w.device) for w, (gid, n, most) in zip(weights, memberships)]
    stats = [_stats() for _ in weights]
    for step in (1, 2):
        grads = [_randn(w.shape, torch.float32, gen, 0.5 + i) for i, w in enumerate(weights)]
        if step == 2:
            grads[1].view(-1)[5] = float("nan")
        for p, g, r, (gid, n, _) in zip(ref, grads, POM_RADII, memberships):
            p.grad = _pom_reference(p.detach(), g, component, manifold, r, gid, n)[0]
        opt.step()
        with torch.no_grad():
            for p, r in zip(ref, POM_RADII):
                p.copy_(pom_retract(as_components(p, component), manifold, r).reshape(p.shape))
        pom_transform(weights, grads, component, manifold, POM_RADII, groups, stats, update=make_update(step),
                      states=states, first=[step == 1] * len(weights), retract_radii=POM_RADII, **blocks)
    for i, (p, w, st) in enumerate(zip(ref, weights, states)):
        what = f"pom fused {component} {manifold} {grouping} {opt_name} tensor {i}"
        assert_close(torch.nan_to_num(w, nan=7.0), torch.nan_to_num(p, nan=7.0), torch.float32, f"{what} weight")
        for key, s in zip(keys, st):
            assert_close(torch.nan_to_num(s, nan=7.0), torch.nan_to_num(opt.state[p][key], nan=7.0), torch.float32,
                         f"{what} {key}")
    assert torch.isnan(weights[1].view(-1)[5]) and int(stats[1][0]) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd_dampening", "adam_wd"])
def test_pom_fused_update_low_precision(dtype, opt_name):
    """16-bit weights and state against the eager chain in fp32 (the kernels' math; torch's own 16-bit
    Adam overflows here: exp_avg_sq underflows to 0 and eps = 1e-8 is 0 in fp16), one step."""
    make_opt, make_update = UPDATES[opt_name]
    gen = _gen(13)
    weights, grads, memberships = _pom_bucket("kernel", "PIO", dtype, gen)
    weights = [pom_retract(as_components(w, "kernel"), "oblique", r).reshape(w.shape).to(dtype)
               for w, r in zip(weights, POM_RADII)]
    ref = [torch.nn.Parameter(w.float()) for w in weights]
    opt = make_opt(ref)
    for p, g, r, (gid, n, _) in zip(ref, grads, POM_RADII, memberships):
        p.grad = _pom_reference(p.detach(), g.float(), "kernel", "oblique", r, gid, n)[0]
    opt.step()
    with torch.no_grad():
        for p, r in zip(ref, POM_RADII):
            p.copy_(pom_retract(as_components(p, "kernel"), "oblique", r).reshape(p.shape))
    keys = make_update(1).state_keys
    states = [[torch.zeros_like(w) for _ in keys] for w in weights]
    pom_transform(weights, grads, "kernel", "oblique", POM_RADII,
                  [groups_of(gid, n, most, w.device) for w, (gid, n, most) in zip(weights, memberships)],
                  [_stats() for _ in weights], update=make_update(1), states=states, first=[True] * len(weights),
                  retract_radii=POM_RADII)
    for i, (p, w, st) in enumerate(zip(ref, weights, states)):
        assert w.dtype == dtype
        assert_close(w, p, dtype, f"pom fused {dtype} {opt_name} weight {i}")
        for key, s in zip(keys, st):
            assert_close(s, opt.state[p][key], dtype, f"pom fused {dtype} {opt_name} {key} {i}")
