"""Offline rewrites of a runtime model that make int8 work with every Linear in int8 on Paddle
Inference 2.6.2 (CPU, oneDNN); `quantize` applies them before calibration (QuantSettings
`smooth`, `outlier_channels`, `weight_scales='fixed'`). Findings and figures:
docs/int8-methods.md.

1. SmoothQuant (Xiao et al. 2022). Static per-tensor int8 activation scales lose the small
   channels of an activation whose range is set by a few outlier channels (the layer-norm outputs
   of BERT-family encoders; the GELU output). Per input channel j of a Linear y = x W:

       s_j = max|x_j| ** alpha / max_k |W_jk| ** (1 - alpha)        (x over the calibration batches)
       y = (x / s) (diag(s) W)                                       (exact in real arithmetic)

   Where 1/s goes: `attn_out` (input: the attention context softmax(QK^T) V): folded into the V
   columns of the fused QKV weight and bias (context channel j is V channel j), free at run time.
   `qkv`, `ffn_in` (input: a layer norm's output) and `ffn_out` (input: GELU's output): an
   `elementwise_mul` by the constant 1/s in front of the Linear. Folding it into the layer norm's
   gamma and beta, as SmoothQuant does for pre-LN decoders, is NOT exact here: these encoders are
   post-LN, and the same layer-norm output is also the residual input of the next add
   (`x + Attention(x)`, `x + FFN(x)`), which would then be x / s. GELU is not homogeneous, so the
   FFN-out factor cannot go into the FFN-in weights either.

2. Outlier channels (LLM.int8()-style decomposition). The k input channels of largest calibration
   |x| of a Linear get 1/s = 0 in that mul and zero weight rows in the int8 Linear, and go through
   an fp32 side path instead: index_select of those channels, a [k, N] matmul with their original
   weight rows, added to the Linear's biased output.

3. Weight scales. Paddle 2.6.2's oneDNN int8 pass derives the per-output-channel scale of an fc
   weight [K, N] from the wrong axis (`ComputePropagateScalesOnednnPass::GetScales`, axis 0,
   reads `data[j + i * rows]`): the max of the i-th run of K consecutive values, not of column i,
   so large weights of many output channels are clipped. `add_weight_scales` gives a weight one
   scale of its own, which the pass keeps; `group_rows_for_chunks` reorders the FFN's
   intermediate channels (exact) so that the pass's per-channel scales of the FFN-out weight
   [4K, K] come out right (each run of 4 rows then holds a row as large as its column's max).

Every rewrite keeps the fp32 function (`check_equivalent` within `EQUIVALENCE_TOL`, checked by
`smooth_model` and `quantize`). paddle is imported only inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.convert.errors import ConversionError

SMOOTH_PREFIX = "smoothquant"  # names of the inserted 1/s parameters and mul outputs
SMOOTHABLE_KINDS = ("qkv", "attn_out", "ffn_in", "ffn_out")
EQUIVALENCE_TOL = 1e-4  # max |fp32 output before - after| allowed for the rewrite
MIN_SCALE = 1e-5


def smoothing_scales(x_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max_k|W_jk|^(1-alpha) for a Linear y = x W with W of shape
    [in, out] (Paddle's layout; row j is input channel j). Channels that never fire (max|X_j|
    = 0) or have all-zero weights get s_j = 1, and s is kept at least MIN_SCALE."""
    assert 0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"
    x = np.asarray(x_absmax, np.float64)
    w_absmax = np.abs(np.asarray(w, np.float64)).max(axis=1)
    assert x.shape == w_absmax.shape, f"{x.shape} activation channels vs {w_absmax.shape} weight rows"
    with np.errstate(divide="ignore", invalid="ignore"):
        s = x ** alpha / w_absmax ** (1.0 - alpha)
    s = np.where((x > 0) & (w_absmax > 0) & np.isfinite(s), s, 1.0)
    return np.maximum(s, MIN_SCALE).astype(np.float32)


@dataclass(frozen=True)
class SmoothTarget:
    index: int  # position among the program's Linears (quantize.linear_layers order)
    kind: str
    x: str  # the Linear's input activation
    weight: str
    how: str  # 'mul' (an inserted elementwise_mul by 1/s) | 'fold_v' (into the QKV weight's V columns)
    v_weight: str | None = None  # fold_v: the fused QKV weight and bias whose V columns take 1/s
    v_bias: str | None = None
    v_offset: int = 0  # first V column in them
    outliers: tuple[int, ...] = ()  # 'mul': input channels taken out of the int8 Linear (an fp32 side path)


# ----------------------------------------------------------------------------- program structure


def _ops_io(op) -> tuple[dict, dict]:
    return ({v.parameter: list(v.arguments) for v in op.inputs if v.arguments},
            {v.parameter: list(v.arguments) for v in op.outputs if v.arguments})


def _v_source(desc, attn_in: str) -> tuple[str, str, int]:
    """(fused QKV weight, its bias, first V column) feeding the attention context `attn_in`:
    attn_in <- reshape2 <- transpose2 <- matmul_v2(probs, V) ; V <- transpose2 <- reshape2 <-
    split(qkv + bias, num=3 or sections, last axis)[k] ; qkv <- elementwise_add(matmul_v2(x, W), b)."""
    block = desc.blocks[0]
    made_by = {}
    for op in block.ops:
        ins, outs = _ops_io(op)
        for names in outs.values():
            for n in names:
                made_by[n] = (op, ins, outs)

    def back(name: str, *through: str) -> str:
        while name in made_by and made_by[name][0].type in through:
            name = made_by[name][1]["X"][0]
        return name

    ctx = back(attn_in, "reshape2", "transpose2")
    op, ins, _ = made_by.get(ctx, (None, {}, {}))
    if op is None or op.type != "matmul_v2":
        raise ConversionError(f"attention output input {attn_in}: no probs x V matmul behind it")
    v = back(ins["Y"][0], "reshape2", "transpose2")
    split, sins, souts = made_by.get(v, (None, {}, {}))
    if split is None or split.type != "split":
        raise ConversionError(f"attention V {v}: not an output of the fused QKV split")
    attrs = {a.name: a for a in split.attrs}
    k = souts["Out"].index(v)
    add, ains, _ = made_by[sins["X"][0]]
    mm, mins, _ = made_by[ains["X"][0]]
    if add.type != "elementwise_add" or mm.type != "matmul_v2":
        raise ConversionError(f"attention V {v}: the fused QKV Linear is not matmul_v2 + bias")
    weight, bias = mins["Y"][0], ains["Y"][0]
    dims = {d.name: list(d.type.lod_tensor.tensor.dims) for d in block.vars}
    total = dims[weight][-1]
    sections = list(attrs["sections"].ints) if "sections" in attrs else []
    if not sections:
        num = attrs["num"].i
        sections = [total // num] * num
    axis = attrs["axis"].i
    if axis not in (-1, len(dims[sins["X"][0]]) - 1) or sum(sections) != total:
        raise ConversionError(f"the QKV split {split.type} is not along the last axis in sections of {total}")
    return weight, bias, int(sum(sections[:k]))


def smooth_targets(desc, kinds: Sequence[str]) -> list[SmoothTarget]:
    """The Linears of `kinds` in a (not yet smoothed) program, with where their 1/s goes."""
    from pipeline.convert.quantize import linear_layers

    out = []
    for i, (kind, x, w) in enumerate(linear_layers(desc)):
        if kind not in kinds:
            continue
        if x.startswith(SMOOTH_PREFIX):
            raise ConversionError("the program is already smoothed")
        if kind == "attn_out":
            vw, vb, off = _v_source(desc, x)
            out.append(SmoothTarget(i, kind, x, w, "fold_v", vw, vb, off))
        else:
            out.append(SmoothTarget(i, kind, x, w, "mul"))
    return out


# ----------------------------------------------------------------------------- running the static program


def _static_model(model_dir: Path, program_file: str, params_file: str):
    """(program, feed names, fetch vars, scope, executor) of an inference model, loaded once."""
    import paddle

    paddle.enable_static()
    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(scope):
        program, feeds, fetches = paddle.static.load_inference_model(
            str(model_dir), exe, model_filename=program_file, params_filename=params_file)
    return program, feeds, fetches, scope, exe


def read_params(model_dir: Path, program_file: str, params_file: str) -> dict[str, np.ndarray]:
    import paddle

    program, _, _, scope, _ = _static_model(model_dir, program_file, params_file)
    try:
        return {v.name: np.array(scope.find_var(v.name).get_tensor()) for v in program.list_vars()
                if v.persistable and v.name not in ("feed", "fetch")}
    finally:
        paddle.disable_static()


def run_static(model_dir: Path, program_file: str, params_file: str, batches: Sequence[dict[str, np.ndarray]],
               extra: Sequence[str] = ()) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The model's outputs for each batch (the static executor, fp32 reference kernels), and the
    tensors named in `extra` per batch."""
    import paddle

    program, feeds, fetches, scope, exe = _static_model(model_dir, program_file, params_file)
    try:
        outs, got = [], {n: [] for n in extra}
        fetch_list = list(fetches) + [program.global_block().var(n) for n in extra]
        with paddle.static.scope_guard(scope):
            for b in batches:
                res = exe.run(program, feed={k: b[k] for k in feeds}, fetch_list=fetch_list)
                outs.append(np.asarray(res[0]))
                for n, r in zip(extra, res[len(fetches):]):
                    got[n].append(np.asarray(r))
        return outs, got
    finally:
        paddle.disable_static()


def channel_absmax(model_dir: Path, program_file: str, params_file: str, batches: Sequence[dict[str, np.ndarray]],
                   names: Sequence[str]) -> dict[str, np.ndarray]:
    """max |x_j| per channel (the last axis) of each named activation over all batches and
    positions (padding included: the int8 kernels see those rows too)."""
    _, got = run_static(model_dir, program_file, params_file, batches, names)
    return {n: np.max([np.abs(a).reshape(-1, a.shape[-1]).max(axis=0) for a in arrs], axis=0)
            for n, arrs in got.items()}


# ----------------------------------------------------------------------------- the rewrite


def rewrite(desc, params: dict[str, np.ndarray], targets: Sequence[SmoothTarget],
            scales: dict[int, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
    """The smoothed program (serialized) and parameters: for each target, W rows * s and 1/s
    where `how` says; a target's `outliers` channels get 1/s = 0 and zero rows in the int8
    Linear and go through an fp32 side path instead: index_select of those channels of the raw
    input, a matmul with their original weight rows, added to the Linear's biased output
    (LLM.int8()-style decomposition). `params` is not modified."""
    import paddle

    params = dict(params)
    paddle.enable_static()
    try:
        program = paddle.static.Program.parse_from_string(desc.SerializeToString())
        _rewrite_block(program.global_block(), params, targets, scales)
        program._sync_with_cpp()
        return program.desc.serialize_to_string(), params
    finally:
        paddle.disable_static()


def _rewrite_block(block, params: dict[str, np.ndarray], targets: Sequence[SmoothTarget],
                   scales: dict[int, np.ndarray]) -> None:
    # folds into the QKV weights first: a QKV side path then copies rows that already hold them
    for t in sorted(targets, key=lambda t: t.how != "fold_v"):
        s = scales[t.index].astype(np.float32)
        params[t.weight] = params[t.weight] * s[:, None]
        if t.how == "fold_v":
            sl = slice(t.v_offset, t.v_offset + len(s))
            w, b = params[t.v_weight].copy(), params[t.v_bias].copy()
            w[:, sl] /= s[None, :]
            b[sl] /= s
            params[t.v_weight], params[t.v_bias] = w, b
            continue
        inv_name, out_name = f"{SMOOTH_PREFIX}_{t.index}.inv_scale", f"{SMOOTH_PREFIX}_{t.index}.{t.x}"
        x = block.var(t.x)
        block.create_var(name=inv_name, shape=[len(s)], dtype="float32", persistable=True)
        block.create_var(name=out_name, shape=x.shape, dtype=x.dtype, persistable=False)
        inv = (1.0 / s).astype(np.float32)
        if t.outliers:
            idx = np.array(t.outliers, np.int64)
            w_side = params[t.weight][idx] / s[idx, None]  # the original rows
            inv[idx] = 0.0
            w = params[t.weight].copy()
            w[idx] = 0.0
            params[t.weight] = w
        params[inv_name] = inv
        at = next(i for i, op in enumerate(block.ops)
                  if op.type == "matmul_v2" and op.input("X") == [t.x] and op.input("Y") == [t.weight])
        block._insert_op(at, type="elementwise_mul", inputs={"X": [t.x], "Y": [inv_name]},
                         outputs={"Out": [out_name]}, attrs={"axis": -1})
        block.ops[at + 1]._rename_input(t.x, out_name)
        if t.outliers:
            _add_side_path(block, params, t, at + 1, idx, w_side)


def _add_side_path(block, params: dict[str, np.ndarray], t: SmoothTarget, mm_at: int, idx: np.ndarray,
                   w_side: np.ndarray) -> None:
    """y = Linear(x) + x[..., idx] @ w_side, added after the Linear's bias add (op `mm_at` is its
    matmul_v2); later readers of the biased output read the sum."""
    mm_out = block.ops[mm_at].output("Out")[0]
    add_at = next(i for i in range(mm_at + 1, len(block.ops))
                  if block.ops[i].type == "elementwise_add" and block.ops[i].input("X") == [mm_out])
    biased = block.ops[add_at].output("Out")[0]
    p = f"{SMOOTH_PREFIX}_{t.index}"
    names = {"idx": f"{p}.outlier_index", "w": f"{p}.outlier_w", "xo": f"{p}.outlier_x", "yo": f"{p}.outlier_y",
             "sum": f"{p}.{biased}"}
    x, y = block.var(t.x), block.var(biased)
    block.create_var(name=names["idx"], shape=[len(idx)], dtype="int64", persistable=True)
    block.create_var(name=names["w"], shape=list(w_side.shape), dtype="float32", persistable=True)
    block.create_var(name=names["xo"], shape=list(x.shape[:-1]) + [len(idx)], dtype="float32", persistable=False)
    for n in ("yo", "sum"):
        block.create_var(name=names[n], shape=y.shape, dtype="float32", persistable=False)
    params[names["idx"]], params[names["w"]] = idx, np.ascontiguousarray(w_side, np.float32)
    readers = [op for op in block.ops[add_at + 1:] if biased in op.input_arg_names]
    ops = [("index_select", {"X": [t.x], "Index": [names["idx"]]}, {"Out": [names["xo"]]}, {"dim": len(x.shape) - 1}),
           ("matmul_v2", {"X": [names["xo"]], "Y": [names["w"]]}, {"Out": [names["yo"]]},
            {"trans_x": False, "trans_y": False}),
           ("elementwise_add", {"X": [biased], "Y": [names["yo"]]}, {"Out": [names["sum"]]}, {"axis": -1})]
    for k, (typ, ins, outs, attrs) in enumerate(ops):
        block._insert_op(add_at + 1 + k, type=typ, inputs=ins, outputs=outs, attrs=attrs)
    for op in readers:
        op._rename_input(biased, names["sum"])


def write_model(dst: Path, program_bytes: bytes, params: dict[str, np.ndarray], program_file: str,
                params_file: str) -> None:
    """Program and combined parameter file (Paddle's save_vars: vars sorted by name)."""
    import paddle

    dst.mkdir(parents=True, exist_ok=True)
    (dst / program_file).write_bytes(program_bytes)
    paddle.enable_static()
    try:
        program = paddle.static.Program.parse_from_string(program_bytes)
        persist = [v for v in program.list_vars() if v.persistable and v.name not in ("feed", "fetch")]
        missing = sorted({v.name for v in persist} - set(params))
        if missing:
            raise ConversionError(f"no values for the parameters {missing[:5]}")
        scope = paddle.static.Scope()
        place = paddle.CPUPlace()
        with paddle.static.scope_guard(scope):
            for v in persist:
                scope.var(v.name).get_tensor().set(np.ascontiguousarray(params[v.name]), place)
            paddle.static.save_vars(paddle.static.Executor(place), str(dst), main_program=program, vars=persist,
                                    filename=params_file)
    finally:
        paddle.disable_static()


@dataclass
class SmoothResult:
    targets: list[SmoothTarget]
    scales: dict[int, np.ndarray]
    max_abs_output_diff: float
    record: dict


def smooth_model(src_dir: Path, dst_dir: Path, batches: Sequence[dict[str, np.ndarray]],
                 alphas: dict[str, float | None], outliers: dict[str, int] | None = None,
                 program_file: str = "inference.pdmodel", params_file: str = "inference.pdiparams",
                 check_batches: int = 2) -> SmoothResult:
    """Write the smoothed copy of the model in `src_dir` (program + params only) into
    `dst_dir`: the Linears of each kind in `alphas` smoothed with that alpha (None: s = 1), and
    for each kind in `outliers` its k input channels of largest calibration |x| taken out of the
    int8 Linear into an fp32 side path; scales from `batches`. Raise ConversionError if the
    rewritten model's fp32 outputs differ from the source's by more than EQUIVALENCE_TOL on the
    first `check_batches` batches."""
    from dataclasses import replace

    from paddle.base.proto import framework_pb2

    outliers = {k: n for k, n in (outliers or {}).items() if n}
    kinds = list(dict.fromkeys([*alphas, *outliers]))
    desc = framework_pb2.ProgramDesc.FromString((src_dir / program_file).read_bytes())
    targets = smooth_targets(desc, kinds)
    if not targets:
        raise ConversionError(f"no Linears of kinds {kinds} to smooth")
    bad = [t.kind for t in targets if t.how != "mul" and t.kind in outliers]
    if bad:
        raise ConversionError(f"outlier channels can be split off only where a 1/s mul is inserted, not {bad[0]}")
    params = read_params(src_dir, program_file, params_file)
    amax = channel_absmax(src_dir, program_file, params_file, batches, sorted({t.x for t in targets}))
    scales = {t.index: (smoothing_scales(amax[t.x], params[t.weight], alphas[t.kind])
                        if alphas.get(t.kind) is not None else np.ones(len(amax[t.x]), np.float32))
              for t in targets}

    def top(t: SmoothTarget) -> tuple[int, ...]:  # the k channels of largest calibration |x|, in order
        return tuple(int(i) for i in np.sort(np.argsort(-amax[t.x], kind="stable")[:outliers[t.kind]]))

    targets = [replace(t, outliers=top(t)) if t.kind in outliers else t for t in targets]
    program_bytes, new_params = rewrite(desc, params, targets, scales)
    write_model(dst_dir, program_bytes, new_params, program_file, params_file)
    diff = check_equivalent(src_dir, dst_dir, batches[:check_batches], program_file, params_file)
    if not diff <= EQUIVALENCE_TOL:
        raise ConversionError(f"the smoothed model's fp32 outputs differ from the source's by {diff:.3g} "
                              f"(> {EQUIVALENCE_TOL}); the rewrite is not exact")
    record = {
        "alpha": dict(alphas), "outlier_channels": dict(outliers), "linears": len(targets),
        "where": {t.kind: t.how for t in targets},
        "max_abs_fp32_output_diff": float(diff),
        # the int8 input's max channel range / its median channel range (median over the Linears)
        "activation_range_ratio": {
            "before_median": float(np.median([_spread(amax[t.x]) for t in targets])),
            "after_median": float(np.median([_spread(_int8_range(amax[t.x], scales[t.index], t)) for t in targets])),
        },
    }
    return SmoothResult(targets, scales, float(diff), record)


def _int8_range(amax: np.ndarray, s: np.ndarray, t: SmoothTarget) -> np.ndarray:
    r = amax / s
    r[list(t.outliers)] = 0.0
    return r


def _spread(a: np.ndarray) -> float:
    return float(a.max() / max(np.median(a), 1e-12))


def check_equivalent(a_dir: Path, b_dir: Path, batches: Sequence[dict[str, np.ndarray]],
                     program_file: str = "inference.pdmodel", params_file: str = "inference.pdiparams") -> float:
    """max |output_a - output_b| over `batches` (static executor, fp32)."""
    a, _ = run_static(a_dir, program_file, params_file, batches)
    b, _ = run_static(b_dir, program_file, params_file, batches)
    return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b)))




# ----------------------------------------------------------------------------- weight scales Paddle keeps


def add_weight_scales(model_dir: Path, weights: Sequence[str], program_file: str = "inference.pdmodel",
                      params_file: str = "inference.pdiparams") -> int:
    """Give each named Linear weight a quantize_linear/dequantize_linear pair with ONE scale
    (its abs max): Paddle 2.6's oneDNN passes then quantise that weight per tensor with this scale
    instead of computing per-channel scales themselves, which they get wrong for fc weights
    (`ComputePropagateScalesOnednnPass::GetScales`, axis 0, reads `data[j + i * rows]`: the max
    of the i-th run of `rows` consecutive values instead of column i, so large weights of many
    output channels are clipped; docs/int8-methods.md). A scale recorded from a quantize op is
    kept because that pass only inserts scales for weights that have none. Returns how many."""
    import paddle

    params = read_params(model_dir, program_file, params_file)
    paddle.enable_static()
    try:
        program = paddle.static.Program.parse_from_string((model_dir / program_file).read_bytes())
        block = program.global_block()
        done = 0
        for w in weights:
            at = [i for i, op in enumerate(block.ops) if op.type == "matmul_v2" and op.input("Y") == [w]]
            if len(at) != 1:
                raise ConversionError(f"weight {w} feeds {len(at)} matmul_v2 ops, not one")
            scale, zero = f"{w}@wscale", f"{w}.quantized@wzero_point"
            q, dq = f"{w}.wquantized", f"{w}.wquantized.dequantized"
            for name, shape, persist in ((scale, [1], True), (zero, [1], True), (q, params[w].shape, False),
                                         (dq, params[w].shape, False)):
                block.create_var(name=name, shape=list(shape), dtype="float32", persistable=persist)
            params[scale] = np.array([np.abs(params[w]).max()], np.float32)
            params[zero] = np.zeros(1, np.float32)
            common = {"bit_length": 8, "quant_axis": -1}
            block._insert_op(at[0], type="dequantize_linear", inputs={"X": [q], "Scale": [scale], "ZeroPoint": [zero]},
                             outputs={"Y": [dq]}, attrs=common)
            block._insert_op(at[0], type="quantize_linear", inputs={"X": [w], "Scale": [scale], "ZeroPoint": [zero]},
                             outputs={"Y": [q]}, attrs={**common, "only_observer": True})
            block.ops[at[0] + 2]._rename_input(w, dq)
            done += 1
        program._sync_with_cpp()
        program_bytes = program.desc.serialize_to_string()
    finally:
        paddle.disable_static()
    write_model(model_dir, program_bytes, params, program_file, params_file)
    return done


# ----------------------------------------------------------------------------- FFN channel order


def chunk_scale_rows(w: np.ndarray) -> np.ndarray:
    """Paddle 2.6.2's per-output-channel abs max of an fc weight [K, N] (K a multiple of N, the
    FFN-out Linear): channel i gets the max of flat values [i*K, (i+1)*K), i.e. of rows
    m*i .. m*i+m-1 (m = K / N), not of column i (see `add_weight_scales`)."""
    k, n = w.shape
    return np.abs(w.reshape(n, k)).max(axis=1)


def group_rows_for_chunks(w: np.ndarray) -> np.ndarray:
    """A row order for an FFN-out weight [K = m*N, N] under which Paddle's buggy scale of each
    output channel i (the max of the rows m*i .. m*i+m-1 that land in chunk i,
    `chunk_scale_rows`) is at least the max of column i, so that no weight is clipped, and as
    close to it as the rows allow. Chunk i needs one anchor row whose max is >= column i's max:
    columns in decreasing order of their max take a free row whose max is exactly theirs (it
    lies in their column) if there is one, else the free row with the smallest max above theirs,
    else (no row is large enough: that column is clipped) the largest free row. The other rows,
    largest max first, join the group whose anchor max is the smallest one not below theirs
    (else the largest). Permuting the FFN's intermediate channels is exact: FFN-in columns and
    bias, the GELU and the FFN-out rows all follow the same order."""
    a = np.abs(np.asarray(w, np.float64))
    k, n = a.shape
    if k % n:
        raise ConversionError(f"an FFN-out weight {a.shape} must have a multiple of its columns as rows")
    m = k // n
    u = a.max(axis=1)  # row maxima
    c = a.max(axis=0)  # column maxima
    own = a.argmax(axis=1)  # the column each row's max lies in
    free = np.ones(k, bool)
    by_u = np.argsort(u, kind="stable")  # rows, smallest max first
    anchor = np.empty(n, np.int64)
    for i in np.argsort(-c, kind="stable"):
        exact = np.flatnonzero(free & (own == i) & (u == c[i]))
        if len(exact):
            r = exact[0]
        else:
            cand = by_u[free[by_u]]
            big = cand[u[cand] >= c[i]]
            r = big[0] if len(big) else cand[-1]
        anchor[i] = r
        free[r] = False
    top = u[anchor]
    groups = [[int(anchor[i])] for i in range(n)]
    by_top = np.argsort(top, kind="stable")  # groups, smallest anchor max first
    room = np.full(n, m - 1)
    for r in sorted(np.flatnonzero(free), key=lambda r: -u[r]):
        open_ = by_top[room[by_top] > 0]
        fits = open_[top[open_] >= u[r]]
        g = fits[0] if len(fits) else open_[-1]
        groups[g].append(int(r))
        room[g] -= 1
    return np.array([r for g in groups for r in g], np.int64)


@dataclass(frozen=True)
class FfnBlock:
    """One FFN: in-weight [H, F], its bias [F], out-weight [F, H], and the 1/s of a smoothed FFN-out
    input (a SmoothQuant mul on the GELU output) or None."""

    w_in: str
    b_in: str
    w_out: str
    inv_scale: str | None
    side_in: str | None = None  # the FFN-in Linear's outlier side-path weight [k, F], if split
    side_out_index: str | None = None  # the FFN-out Linear's outlier channel indices [k], if split


def ffn_blocks(desc) -> list[FfnBlock]:
    """The FFN blocks of a program (ffn_in and ffn_out Linears of `linear_layers`, in order)."""
    from pipeline.convert.quantize import linear_layers

    block = desc.blocks[0]
    params = {v.name for v in block.vars if v.persistable}
    bias_of, inv_of = {}, {}
    for op in block.ops:
        ins = {v.parameter: v.arguments[0] for v in op.inputs if v.arguments}
        out = next((v.arguments[0] for v in op.outputs if v.parameter == "Out" and v.arguments), None)
        if op.type == "elementwise_add" and ins.get("Y") in params:
            bias_of[ins["X"]] = ins["Y"]
        if op.type == "elementwise_mul" and ins.get("Y", "").startswith(SMOOTH_PREFIX):
            inv_of[out] = ins["Y"]
    out_of = {}
    for op in block.ops:
        if op.type == "matmul_v2":
            ins = {v.parameter: v.arguments[0] for v in op.inputs}
            out_of[ins["Y"]] = next(v.arguments[0] for v in op.outputs if v.parameter == "Out")
    blocks, w_in, side = [], None, None
    for i, (kind, x, w) in enumerate(linear_layers(desc)):
        if kind == "ffn_in":
            w_in, side = w, f"{SMOOTH_PREFIX}_{i}.outlier_w"
        elif kind == "ffn_out" and w_in is not None:
            b_in = bias_of.get(out_of[w_in])
            if b_in is None:
                raise ConversionError(f"the FFN-in Linear {w_in} has no bias add")
            out_index = f"{SMOOTH_PREFIX}_{i}.outlier_index"
            blocks.append(FfnBlock(w_in, b_in, w, inv_of.get(x), side if side in params else None,
                                   out_index if out_index in params else None))
            w_in = None
    return blocks


def regroup_ffn_channels(params: dict[str, np.ndarray], blocks: Sequence[FfnBlock]) -> dict[str, np.ndarray]:
    """`params` with each FFN's intermediate channels reordered by `group_rows_for_chunks` of its
    out-weight (as the int8 kernel sees it: rows already multiplied by s if smoothed)."""
    params = dict(params)
    for b in blocks:
        order = group_rows_for_chunks(params[b.w_out])
        params[b.w_in] = np.ascontiguousarray(params[b.w_in][:, order])
        params[b.b_in] = np.ascontiguousarray(params[b.b_in][order])
        params[b.w_out] = np.ascontiguousarray(params[b.w_out][order])
        if b.inv_scale is not None:
            params[b.inv_scale] = np.ascontiguousarray(params[b.inv_scale][order])
        if b.side_in is not None:
            params[b.side_in] = np.ascontiguousarray(params[b.side_in][:, order])
        if b.side_out_index is not None:  # channel c moved to position where[c]
            where = np.empty_like(order)
            where[order] = np.arange(len(order))
            params[b.side_out_index] = where[params[b.side_out_index]].astype(np.int64)
    return params
