"""Triton kernels of the fused LARS and LAMB steps (imported only by :mod:`lars_plugins.fused`).

Every launch covers every tensor of a device/dtype bucket. The tensors are described by a table
(one int64 row per tensor: addresses, element count, first block, flags) and each program of the
grid finds its tensor through a block-to-tensor map, as torch's ``multi_tensor_apply`` does with
its kernel-argument metadata. Two passes per step:

* pass A reads every tensor once. Excluded tensors take their whole (plain) update there. Adapted
  tensors write their block's partial sums of squares; the last program of a tensor to finish
  (an atomic counter per tensor) adds its partials in a fixed order -- so the norms do not depend
  on scheduling -- and computes the trust ratio from them. LAMB's pass A also updates the moments.
* pass B updates the adapted tensors with their ratio.

So LARS reads and writes 7 tensor-sized streams (SGD's fused kernel: 5) and LAMB 10 (AdamW's: 7);
``lr`` and LAMB's step counts are read from device memory, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Table columns (int64). LARS: W, G, BUF, SLOT; LAMB: W, G, M, V, STEP, SLOT; both: the rest.
W = tl.constexpr(0)
G = tl.constexpr(1)
BUF = tl.constexpr(2)  # LARS
M = tl.constexpr(2)  # LAMB
V = tl.constexpr(3)
STEP = tl.constexpr(4)
SLOT = tl.constexpr(5)
NUMEL = tl.constexpr(6)
START_A = tl.constexpr(7)  # the tensor's first block in pass A's grid
START_B = tl.constexpr(8)  # and in pass B's (adapted tensors only)
FLAGS = tl.constexpr(9)
COLUMNS = tl.constexpr(10)
ADAPTED = tl.constexpr(1)  # flag bits: the tensor takes a trust ratio;
FIRST = tl.constexpr(2)  # LARS's momentum buffer is new (buf = d, torch's convention)
OUT = tl.constexpr(4)  # per-tensor outputs: ‖w‖, ‖g‖ (LARS) or ‖u‖ (LAMB), the ratio, spare


@triton.jit
def _pointer(row, column: tl.constexpr, dtype: tl.constexpr, aligned: tl.constexpr):
    pointer = tl.load(row + column).to(tl.pointer_type(dtype))
    if aligned:  # every address was checked on the host: lets the compiler use 16-byte accesses
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load(pointer, offsets, mask, masked: tl.constexpr):
    if masked:
        return tl.load(pointer + offsets, mask=mask, other=0.0).to(tl.float32)
    return tl.load(pointer + offsets).to(tl.float32)


@triton.jit
def _store(pointer, offsets, value, mask, masked: tl.constexpr):
    if masked:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty), mask=mask)
    else:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty))


@triton.jit
def _finite(x):
    return x * 0.0 == 0.0  # false for inf and NaN


@triton.jit
def _min_one(x):
    return tl.where(x > 1.0, 1.0, x)  # NaN stays NaN (tl.minimum would drop it)


@triton.jit
def _learning_rate(lr_pointer, lr_value, lr_is_tensor: tl.constexpr):
    if lr_is_tensor:
        return tl.load(lr_pointer).to(tl.float32)
    return lr_value


@triton.jit
def _block(table, block_tensor, start_column: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor, its table row, its block's offsets and whether the block is full."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    row = table + t * COLUMNS
    numel = tl.load(row + NUMEL)
    local = (pid - tl.load(row + start_column)).to(tl.int64)
    offsets = local * BLOCK + tl.arange(0, BLOCK)
    full = (local + 1) * BLOCK <= numel
    return pid, t, row, numel, offsets, offsets < numel, full


@triton.jit
def _reduce_partials(partials, first_block, n_blocks, RBLOCK: tl.constexpr):
    """Sums of squares of one tensor from its blocks' partials, in a fixed order (deterministic)."""
    acc_a = tl.zeros([RBLOCK], dtype=tl.float32)
    acc_b = tl.zeros([RBLOCK], dtype=tl.float32)
    for k in range(0, n_blocks, RBLOCK):
        index = k + tl.arange(0, RBLOCK)
        mask = index < n_blocks
        where = (first_block + index) * 2
        acc_a += tl.load(partials + where, mask=mask, other=0.0, volatile=True)
        acc_b += tl.load(partials + where + 1, mask=mask, other=0.0, volatile=True)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _arrive(counters, t, n_blocks):
    """Count this program in; True for the last program of tensor ``t`` (which resets the counter).
    The barrier and the release of the atomic publish the partials this block stored."""
    tl.debug_barrier()
    count = tl.atomic_add(counters + t, 1, sem="acq_rel")
    return count == n_blocks - 1


# --- LARS ------------------------------------------------------------------------------------------

@triton.jit
def _lars_update(w_ptr, g_ptr, buf_ptr, offsets, mask, a, b, first, lr, momentum, dampening,
                 HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MASKED: tl.constexpr):
    """d = a·g + b·w; torch.optim.SGD's momentum (first buffer = d); w -= lr·d."""
    g = _load(g_ptr, offsets, mask, MASKED)
    w = _load(w_ptr, offsets, mask, MASKED)
    d = a * g + b * w
    if HAS_MOMENTUM:
        if first:
            buf = d
        else:
            buf = momentum * _load(buf_ptr, offsets, mask, MASKED) + (1.0 - dampening) * d
        buf = buf.to(buf_ptr.dtype.element_ty)  # the update uses the buffer as stored, as torch's does
        _store(buf_ptr, offsets, buf, mask, MASKED)
        buf = buf.to(tl.float32)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    _store(w_ptr, offsets, w - lr * d, mask, MASKED)


@triton.jit
def lars_pass_a(table, block_tensor, partials, counters, out, lr_pointer, lr_value, trust_coefficient,
                weight_decay, eps, momentum, dampening, sign, DTYPE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
                TRUST_CLIP: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    pid, t, row, numel, offsets, mask, full = _block(table, block_tensor, START_A, BLOCK)
    flags = tl.load(row + FLAGS)
    w_ptr = _pointer(row, W, DTYPE, ALIGNED)
    g_ptr = _pointer(row, G, DTYPE, ALIGNED)
    lr = _learning_rate(lr_pointer, lr_value, LR_IS_TENSOR)
    if (flags & ADAPTED) != 0:
        if full:
            w = _load(w_ptr, offsets, mask, False)
            g = _load(g_ptr, offsets, mask, False)
        else:
            w = _load(w_ptr, offsets, mask, True)
            g = _load(g_ptr, offsets, mask, True)
        tl.store(partials + pid * 2, tl.sum(w * w, axis=0))
        tl.store(partials + pid * 2 + 1, tl.sum(g * g, axis=0))
        n_blocks = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
        if _arrive(counters, t, n_blocks):
            first_block = tl.load(row + START_A)
            w_sq, g_sq = _reduce_partials(partials, first_block, n_blocks, RBLOCK)
            w_norm = tl.sqrt(w_sq)
            g_norm = tl.sqrt(g_sq)
            # lars_plugins.functional.trust_ratio, the same rule and fallbacks
            denominator = g_norm + weight_decay * w_norm + eps
            defined = (w_norm > 0) & (denominator > 0)
            ratio = tl.where(defined, trust_coefficient * w_norm / tl.where(defined, denominator, 1.0),
                             trust_coefficient)
            ratio = tl.where(_finite(w_norm) & _finite(g_norm), ratio, float("nan"))
            if TRUST_CLIP:
                ratio = _min_one(ratio / lr)
            tl.store(out + t * OUT, w_norm)
            tl.store(out + t * OUT + 1, g_norm)
            tl.store(out + t * OUT + 2, ratio)
            tl.store(tl.load(row + SLOT).to(tl.pointer_type(tl.float32)), ratio)
            tl.store(counters + t, 0)
    else:  # excluded: d = ±g, the whole update now
        buf_ptr = _pointer(row, BUF, DTYPE, ALIGNED)
        first = (flags & FIRST) != 0
        if full:
            _lars_update(w_ptr, g_ptr, buf_ptr, offsets, mask, sign, 0.0, first, lr, momentum, dampening,
                         HAS_MOMENTUM, NESTEROV, False)
        else:
            _lars_update(w_ptr, g_ptr, buf_ptr, offsets, mask, sign, 0.0, first, lr, momentum, dampening,
                         HAS_MOMENTUM, NESTEROV, True)


@triton.jit
def lars_pass_b(table, block_tensor, out, lr_pointer, lr_value, weight_decay, momentum, dampening, sign,
                DTYPE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, row, numel, offsets, mask, full = _block(table, block_tensor, START_B, BLOCK)
    flags = tl.load(row + FLAGS)
    w_ptr = _pointer(row, W, DTYPE, ALIGNED)
    g_ptr = _pointer(row, G, DTYPE, ALIGNED)
    buf_ptr = _pointer(row, BUF, DTYPE, ALIGNED)
    lr = _learning_rate(lr_pointer, lr_value, LR_IS_TENSOR)
    ratio = tl.load(out + t * OUT + 2)
    first = (flags & FIRST) != 0
    if full:
        _lars_update(w_ptr, g_ptr, buf_ptr, offsets, mask, sign * ratio, ratio * weight_decay, first, lr, momentum,
                     dampening, HAS_MOMENTUM, NESTEROV, False)
    else:
        _lars_update(w_ptr, g_ptr, buf_ptr, offsets, mask, sign * ratio, ratio * weight_decay, first, lr, momentum,
                     dampening, HAS_MOMENTUM, NESTEROV, True)


# --- LAMB ------------------------------------------------------------------------------------------

@triton.jit
def _corrections(step, log_beta1, log_beta2, BIAS_CORRECTION: tl.constexpr):
    """(1 - β1^t, √(1 - β2^t)), in float64: 1 - β2^t in float32 loses digits to cancellation."""
    if BIAS_CORRECTION:
        t = step.to(tl.float64)
        c1 = 1.0 - tl.exp(t * log_beta1)
        c2 = 1.0 - tl.exp(t * log_beta2)
        return c1.to(tl.float32), tl.sqrt(c2).to(tl.float32)
    return 1.0, 1.0


@triton.jit
def _lamb_direction(m, v, w, correction1, root_correction2, eps, decay):
    """u = m̂/(√v̂ + ε) + wd·w, in the order of torch's Adam: (√v / √c2 + ε), then m / denom / c1."""
    return m / (tl.sqrt(v) / root_correction2 + eps) / correction1 + decay * w


@triton.jit
def _lamb_moments(row, offsets, mask, sign, one_minus_beta1, beta2, one_minus_beta2, DTYPE: tl.constexpr,
                  ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Adam's moments updated and stored; returned as stored (the values pass B reads back)."""
    g_ptr = _pointer(row, G, DTYPE, ALIGNED)
    m_ptr = _pointer(row, M, DTYPE, ALIGNED)
    v_ptr = _pointer(row, V, DTYPE, ALIGNED)
    g = sign * _load(g_ptr, offsets, mask, MASKED)
    m = _load(m_ptr, offsets, mask, MASKED)
    v = _load(v_ptr, offsets, mask, MASKED)
    m = (m + one_minus_beta1 * (g - m)).to(DTYPE)  # torch's lerp_ for a weight below 0.5
    v = (beta2 * v + one_minus_beta2 * g * g).to(DTYPE)
    _store(m_ptr, offsets, m, mask, MASKED)
    _store(v_ptr, offsets, v, mask, MASKED)
    return m.to(tl.float32), v.to(tl.float32)


@triton.jit
def lamb_pass_a(table, block_tensor, partials, counters, out, lr_pointer, lr_value, one_minus_beta1, beta2,
                one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, bound_low, bound_high, sign,
                DTYPE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                BOUNDED: tl.constexpr, TRUST_CLIP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                RBLOCK: tl.constexpr):
    pid, t, row, numel, offsets, mask, full = _block(table, block_tensor, START_A, BLOCK)
    flags = tl.load(row + FLAGS)
    step_ptr = tl.load(row + STEP).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr) + 1.0  # the last program of the tensor stores it, after every program read it
    correction1, root_correction2 = _corrections(step, log_beta1, log_beta2, BIAS_CORRECTION)
    w_ptr = _pointer(row, W, DTYPE, ALIGNED)
    if full:
        m, v = _lamb_moments(row, offsets, mask, sign, one_minus_beta1, beta2, one_minus_beta2, DTYPE, ALIGNED, False)
        w = _load(w_ptr, offsets, mask, False)
    else:
        m, v = _lamb_moments(row, offsets, mask, sign, one_minus_beta1, beta2, one_minus_beta2, DTYPE, ALIGNED, True)
        w = _load(w_ptr, offsets, mask, True)
    adapted = (flags & ADAPTED) != 0
    if adapted:
        u = _lamb_direction(m, v, w, correction1, root_correction2, eps, weight_decay)
        u = tl.where(mask, u, 0.0)  # masked lanes: m = v = 0 gives 0/ε = 0, but keep the sum exact
        tl.store(partials + pid * 2, tl.sum(w * w, axis=0))
        tl.store(partials + pid * 2 + 1, tl.sum(u * u, axis=0))
    else:  # excluded: the plain AdamW step without decay, now
        u = _lamb_direction(m, v, w, correction1, root_correction2, eps, 0.0)
        lr = _learning_rate(lr_pointer, lr_value, LR_IS_TENSOR)
        if full:
            _store(w_ptr, offsets, w - lr * u, mask, False)
        else:
            _store(w_ptr, offsets, w - lr * u, mask, True)
    n_blocks = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
    if _arrive(counters, t, n_blocks):
        if adapted:
            first_block = tl.load(row + START_A)
            w_sq, u_sq = _reduce_partials(partials, first_block, n_blocks, RBLOCK)
            w_norm = tl.sqrt(w_sq)
            u_norm = tl.sqrt(u_sq)
            # lars_plugins.functional.lamb_trust_ratio, the same rule and fallbacks
            phi = w_norm
            if BOUNDED:
                phi = tl.where(phi < bound_low, bound_low, tl.where(phi > bound_high, bound_high, phi))
            defined = (w_norm > 0) & (u_norm > 0)
            ratio = tl.where(defined, phi / tl.where(defined, u_norm, 1.0), 1.0)
            ratio = tl.where(_finite(w_norm) & _finite(u_norm), ratio, float("nan"))
            if TRUST_CLIP:
                ratio = _min_one(ratio)
            tl.store(out + t * OUT, w_norm)
            tl.store(out + t * OUT + 1, u_norm)
            tl.store(out + t * OUT + 2, ratio)
            tl.store(tl.load(row + SLOT).to(tl.pointer_type(tl.float32)), ratio)
        tl.store(step_ptr, step)
        tl.store(counters + t, 0)


@triton.jit
def lamb_pass_b(table, block_tensor, out, lr_pointer, lr_value, log_beta1, log_beta2, eps, weight_decay,
                DTYPE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, row, numel, offsets, mask, full = _block(table, block_tensor, START_B, BLOCK)
    step = tl.load(tl.load(row + STEP).to(tl.pointer_type(tl.float32)))  # stored by pass A
    correction1, root_correction2 = _corrections(step, log_beta1, log_beta2, BIAS_CORRECTION)
    w_ptr = _pointer(row, W, DTYPE, ALIGNED)
    m_ptr = _pointer(row, M, DTYPE, ALIGNED)
    v_ptr = _pointer(row, V, DTYPE, ALIGNED)
    scale = _learning_rate(lr_pointer, lr_value, LR_IS_TENSOR) * tl.load(out + t * OUT + 2)
    if full:
        w = _load(w_ptr, offsets, mask, False)
        u = _lamb_direction(_load(m_ptr, offsets, mask, False), _load(v_ptr, offsets, mask, False), w,
                            correction1, root_correction2, eps, weight_decay)
        _store(w_ptr, offsets, w - scale * u, mask, False)
    else:
        w = _load(w_ptr, offsets, mask, True)
        u = _lamb_direction(_load(m_ptr, offsets, mask, True), _load(v_ptr, offsets, mask, True), w,
                            correction1, root_correction2, eps, weight_decay)
        _store(w_ptr, offsets, w - scale * u, mask, True)
