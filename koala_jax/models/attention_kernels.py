"""The ways to compute softmax attention that `ForwardOptions.attention_impl` chooses between, all on
(batch, tokens, heads, head_dim) and all equal to softmax(q k^T / sqrt(head_dim)) v:

- `xla`: jax.nn.dot_product_attention's plain XLA version; materialises the (q_tokens x k_tokens) score
  matrices, in the forward pass and again for the backward pass.
- `cudnn`: cuDNN's fused flash attention (GPU, bfloat16/float16).
- `chunked`: flash attention in plain JAX, on every backend: blocks of queries and keys with an online
  softmax, and a backward pass (jax.custom_vjp) that recomputes each block's scores from the saved
  log-sum-exp, so no (q_tokens x k_tokens) buffer exists in either direction.
- `flash`, `splash`: the Pallas TPU kernels that ship with JAX (jax.experimental.pallas.ops.tpu).
- `auto`: the best of these for the backend (`auto_choice`), announced once per process.

The 640-channel stage of SDXL at 1024 px attends over 4,096 tokens with 10 heads: its score matrices
are 168M elements per image, which is what `chunked`, `flash` and `splash` never hold.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from koala_jax.errors import ConfigError

# Token blocks of SDXL's sequences (4,096 and 1,024 self-attention tokens, 77 text tokens): a 512 x 512
# score tile per head is 1 MiB in float32, inside a TPU core's VMEM and a CPU's L2/L3, and on CPU 256-1024
# blocks ran within noise of each other (docs/performance.md). Shorter sequences are one block.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
# `auto` on CPU is `chunked`: forward+backward it was faster than XLA's attention at every shape measured,
# from 64 tokens x 2 heads to SDXL's 4,096 tokens x 10 heads (2.7x there; XLA's softmax over materialised
# score matrices is memory-bound), in float32 and bfloat16 (docs/performance.md).

_MASKED = -1e30  # finite "minus infinity": a padded key gets exp() = 0 and never turns a row into NaN
_LANES = 128  # the TPU kernels tile tokens and head_dim by whole 128-lane vregs

Attention = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ---------------------------------------------------------------- chunked (flash attention in plain JAX)


def _split(length: int, block: int) -> tuple[int, int]:
    """(block, count): the fewest blocks of at most `block` tokens that cover `length`, all of one size
    and as small as that allows, so the padding stays under one token per block."""
    count = -(-length // block)
    return -(-length // count), count


def _to_blocks(x: jnp.ndarray, block: int, count: int) -> jnp.ndarray:
    """(batch, heads, tokens, dim) -> (count, batch, heads, block, dim), zero-padded at the end."""
    b, h, t, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, block * count - t), (0, 0)))
    return x.reshape(b, h, count, block, d).transpose(2, 0, 1, 3, 4)


def _scores(q: jnp.ndarray, k: jnp.ndarray, start: jnp.ndarray, kv_len: int | None) -> jnp.ndarray:
    """Scaled float32 scores of one (query block, key block) pair; keys from `kv_len` on (the padding,
    None: none) get `_MASKED`."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if kv_len is None:
        return s
    keys = start + jnp.arange(k.shape[2])
    return jnp.where(keys < kv_len, s, _MASKED)


def _blocked_forward(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, kv_len: int | None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(output, log-sum-exp) of blocked inputs: one query block at a time (lax.map), its key blocks
    folded in with a running max and sum (lax.scan), so only one score tile is live."""
    starts = jnp.arange(k.shape[0]) * k.shape[3]

    def query_block(qb: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        b, h, n, d = qb.shape

        def key_block(carry, xs):
            m, total, acc = carry
            kb, vb, start = xs
            s = _scores(qb, kb, start, kv_len)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return (m_new, total * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

        init = (
            jnp.full((b, h, n), _MASKED, jnp.float32),
            jnp.zeros((b, h, n), jnp.float32),
            jnp.zeros((b, h, n, d), jnp.float32),
        )
        (m, total, acc), _ = jax.lax.scan(key_block, init, (k, v, starts))
        return (acc / total[..., None]).astype(qb.dtype), m + jnp.log(total)

    return jax.lax.map(query_block, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, kv_len: int | None) -> jnp.ndarray:
    return _blocked_forward(q, k, v, kv_len)[0]


def _blocked_attention_fwd(q, k, v, kv_len):
    out, lse = _blocked_forward(q, k, v, kv_len)
    return out, (q, k, v, out, lse)


def _blocked_attention_bwd(kv_len, residuals, d_out):
    """Flash attention's backward pass: for each key block (outer scan) and query block (inner scan),
    recompute the probabilities from the saved log-sum-exp and accumulate dk, dv for the key block and
    dq for every query block (a float32 carry the size of q)."""
    q, k, v, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    delta = jnp.einsum("nbhqd,nbhqd->nbhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    starts = jnp.arange(k.shape[0]) * k.shape[3]
    mm = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    def key_block(dq, xs):
        kb, vb, start = xs

        def query_block(carry, ys):
            dk, dv = carry
            qb, dob, lse_b, delta_b = ys
            p = jnp.exp(_scores(qb, kb, start, kv_len) - lse_b[..., None])
            ds = p * (mm("bhqd,bhkd->bhqk", dob, vb) - delta_b[..., None])
            dv = dv + mm("bhqk,bhqd->bhkd", p.astype(dob.dtype), dob)
            dk = dk + mm("bhqk,bhqd->bhkd", ds.astype(qb.dtype), qb) * scale
            return (dk, dv), mm("bhqk,bhkd->bhqd", ds.astype(kb.dtype), kb) * scale

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dk, dv), dq_parts = jax.lax.scan(query_block, (zeros, zeros), (q, d_out, lse, delta))
        return dq + dq_parts, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (k, v, starts))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def chunked_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV
) -> jnp.ndarray:
    """Memory-efficient attention in plain JAX (any backend). Token counts that are not a multiple of
    the block are padded (padded keys masked, padded queries dropped); a sequence shorter than its
    block (the 77 text tokens) is one block, unpadded."""
    (b, tq, h, d), tk = q.shape, k.shape[1]
    bq, nq = _split(tq, block_q)
    bk, nk = _split(tk, block_kv)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = _blocked_attention(
        _to_blocks(heads_first(q), bq, nq),
        _to_blocks(heads_first(k), bk, nk),
        _to_blocks(heads_first(v), bk, nk),
        None if bk * nk == tk else tk,
    )
    return out.transpose(1, 0, 3, 2, 4).reshape(b, nq * bq, h, d)[:, :tq]


# ---------------------------------------------------------------- Pallas TPU kernels

_INTERPRET = contextvars.ContextVar("koala_jax_pallas_interpret", default=False)


@contextlib.contextmanager
def tpu_interpret_mode() -> Iterator[None]:
    """Run the Pallas TPU kernels (`flash`, `splash`) in JAX's TPU interpret mode on any backend: slow,
    for checking them on CPU. Trace (and differentiate) inside the context."""
    from jax.experimental.pallas import tpu as pltpu

    token = _INTERPRET.set(True)
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        _INTERPRET.reset(token)


def _tpu_block(length: int, block: int) -> tuple[int, int]:
    """(padded length, block) for the TPU kernels: the length padded to whole 128-token tiles, and the
    largest multiple of 128 up to `block` that divides it (so nothing is padded beyond the tile)."""
    tiles = -(-length // _LANES)
    per_block = max(n for n in range(1, max(block // _LANES, 1) + 1) if tiles % n == 0)
    return tiles * _LANES, per_block * _LANES


def _tpu_layout(x: jnp.ndarray, length: int) -> jnp.ndarray:
    """(batch, tokens, heads, dim) -> (batch, heads, length, dim padded to 128 lanes), zero-padded."""
    pad_dim = -x.shape[-1] % _LANES
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, pad_dim)))


def _segments(tq: int, tk: int, kv_len: int) -> tuple[jnp.ndarray, jnp.ndarray] | None:
    """Segment ids that keep every query off the padded keys (None when no key is padded)."""
    if tk == kv_len:
        return None
    return jnp.zeros((tq,), jnp.int32), (jnp.arange(tk) >= kv_len).astype(jnp.int32)


def _on_mesh(kernel: Attention, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Run a Pallas kernel per device: XLA cannot partition a Mosaic kernel, so under a device mesh
    (`jax.set_mesh`, as the training loop sets it) the batch is split over every mesh axis with
    shard_map (replicated where the batch does not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v)
    spec = jax.P(mesh.axis_names) if q.shape[0] % mesh.size == 0 else jax.P()
    return jax.shard_map(kernel, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _flash_kernel(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block_q: int, block_kv: int) -> jnp.ndarray:
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    (tq, bq), (tk, bk) = _tpu_block(q.shape[1], block_q), _tpu_block(k.shape[1], block_kv)
    sizes = pallas_flash.BlockSizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )
    segments = _segments(tq, tk, k.shape[1])
    if segments is not None:
        segments = pallas_flash.SegmentIds(*(jnp.broadcast_to(s, (q.shape[0], *s.shape)) for s in segments))
    out = pallas_flash.flash_attention(
        _tpu_layout(q, tq),
        _tpu_layout(k, tk),
        _tpu_layout(v, tk),
        segment_ids=segments,
        sm_scale=q.shape[-1] ** -0.5,
        block_sizes=sizes,
    )
    return out[:, :, : q.shape[1], : q.shape[-1]].transpose(0, 2, 1, 3)


def _splash_kernel(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block_q: int, block_kv: int) -> jnp.ndarray:
    from jax.experimental.pallas.ops.tpu import splash_attention as pallas_splash

    (tq, bq), (tk, bk) = _tpu_block(q.shape[1], block_q), _tpu_block(k.shape[1], block_kv)
    sizes = pallas_splash.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    b, h = q.shape[0], q.shape[2]
    mask = pallas_splash.MultiHeadMask([pallas_splash.FullMask((tq, tk))] * (b * h))
    kernel = pallas_splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
    segments = _segments(tq, tk, k.shape[1])
    segments = None if segments is None else pallas_splash.SegmentIds(*segments)
    scaled_q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the splash kernel does not scale
    # Batch folded into heads (every sample has the same padding): one kernel call, no vmap.
    fold = lambda x, t: _tpu_layout(x, t).reshape(b * h, t, -1)
    out = kernel(fold(scaled_q, tq), fold(k, tk), fold(v, tk), segment_ids=segments).reshape(b, h, tq, -1)
    return out[:, :, : q.shape[1], : q.shape[-1]].transpose(0, 2, 1, 3)


def flash_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV
) -> jnp.ndarray:
    """JAX's Pallas TPU flash-attention kernel. Tokens are padded to whole 128-token tiles (padded keys
    masked through segment ids), head_dim to 128 lanes; blocks are the largest multiples of 128 up to
    `block_q` / `block_kv` that divide the padded lengths."""
    return _on_mesh(lambda q, k, v: _flash_kernel(q, k, v, block_q, block_kv), q, k, v)


def splash_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV
) -> jnp.ndarray:
    """JAX's Pallas TPU splash-attention kernel (a full mask over batch x heads); padding and blocks as
    in `flash_attention`."""
    return _on_mesh(lambda q, k, v: _splash_kernel(q, k, v, block_q, block_kv), q, k, v)


# ---------------------------------------------------------------- choosing one

_BACKENDS = {"cudnn": ("gpu",), "flash": ("tpu",), "splash": ("tpu",)}
_AUTO_RULES = {
    "tpu": "splash (Pallas TPU kernel)",
    "gpu": "cudnn for bfloat16/float16 with head_dim <= 128 (a multiple of 8), else xla",
    "cpu": "chunked (faster than xla on CPU at every size measured, and no score matrices in memory)",
}


def auto_choice(q: jnp.ndarray, backend: str) -> str:
    """What `auto` runs for queries `q` on `backend` ('tpu', 'gpu', anything else is treated as 'cpu')."""
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        cudnn_takes = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
        return "cudnn" if cudnn_takes else "xla"
    return "chunked"


@functools.cache
def _announce(backend: str) -> None:
    """One line per process saying what `auto` picks (traced functions call this many times)."""
    if jax.process_index() == 0:
        print(f"attention_impl=auto on {backend}: {_AUTO_RULES.get(backend, _AUTO_RULES['cpu'])}", flush=True)


def _check_backend(impl: str, backend: str) -> None:
    needed = _BACKENDS.get(impl)
    if needed and backend not in needed and not (impl != "cudnn" and _INTERPRET.get()):
        raise ConfigError(
            f"attention_impl {impl!r} needs a {'/'.join(needed).upper()} (this backend is {backend}); "
            "use 'chunked' (any backend), 'xla' or 'auto'"
        )


def dot_product_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    impl: str = "xla",
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
) -> jnp.ndarray:
    """Softmax attention on (batch, tokens, heads, head_dim) computed by `impl` (see the module
    docstring); `block_q` / `block_kv` are the token blocks of `chunked`, `flash` and `splash`."""
    backend = jax.default_backend()
    if impl == "auto":
        _announce(backend)
        impl = auto_choice(q, backend)
    _check_backend(impl, backend)
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    blocked = {"chunked": chunked_attention, "flash": flash_attention, "splash": splash_attention}[impl]
    return blocked(q, k, v, block_q, block_kv)
