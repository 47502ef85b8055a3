"""Layer benchmark: each mixer's full Megatron layer (projections + op + norm/gate + output
projection) against its bare op plus the same projections as plain GEMMs (every projection of
the input as one GEMM, one GEMM per low-rank up projection, the output GEMM), fwd+bwd, equal
tokens per step. Reports the overhead ratio (target on the GPU: <= 1.10).

    python benchmarks/layer_bench.py --seq-lens 2048 8192 32768 --tokens 65536 --out benchmarks/results/layer_h100
    python benchmarks/layer_bench.py --toy      # CPU smoke run
    python benchmarks/layer_bench.py --mixers gated_deltanet --seq-lens 2048 --profile $OUT/prof
        # also writes the profiler tables of both steps: where the overhead goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_layer_args, device, emit, environment, parse_layer_args, time_fn, write_results,
)


def build_mixer(name, hidden, heads, dtype, conv_kernel="auto", **options):
    """The mixer at these sizes; ``options``: more LinearMoEConfig fields (the kernel choices)."""
    from megatron.core.transformer.enums import AttnMaskType

    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults
    from linear_moe.registry import get_mixer

    config = LinearMoEConfig(num_layers=1, hidden_size=hidden, num_attention_heads=heads,
                             params_dtype=dtype, bf16=dtype == torch.bfloat16,
                             normalization="RMSNorm", add_bias_linear=False,
                             gradient_accumulation_fusion=False, la_module=name,
                             la_num_heads=heads, la_conv_kernel=conv_kernel,
                             **options,
                             use_cpu_initialization=True)
    resolve_mixer_defaults(config)
    mixer = get_mixer(name).builder(config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    return mixer.to(device())


def projection_shapes(mixer, hidden):
    """The mixer's in-projections as the bare step computes them: (the summed output width of
    every linear that reads the input, [(in, out) of each linear that reads something else]),
    the latter the up projections of low-rank chains (GLA's gk_up, KDA's f_up, RWKV's w_up ...),
    whose input is their down projection's rank-r output. The output projection is not in
    either."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    x_width, others = 0, []
    for m in mixer.modules():
        if isinstance(m, (ColumnParallelLinear, torch.nn.Linear)):
            out_features, in_features = m.weight.shape
            if in_features == hidden:
                x_width += out_features
            else:
                others.append((in_features, out_features))
    return x_width, others


def fla_layer(name, mixer):
    """fla's own layer (``fla.layers``) with the mixer's sizes and options, for the mixers whose
    fla layer does the same math with the same parameters (test_benchmarks checks the counts), or
    None: what a user of fla's layers gets at this shape, projections, convs and norm included."""
    c = mixer.config
    if c.la_feature_map is not None:  # named by us, not by fla's ACT2FN
        return None
    h, heads = c.hidden_size, c.la_num_heads
    conv = dict(use_short_conv=c.la_use_short_conv, conv_size=c.la_conv_size,
                conv_bias=c.la_conv_bias)
    if name == "gla":
        from fla.layers import GatedLinearAttention

        return GatedLinearAttention(
            mode="chunk", hidden_size=h, expand_k=c.la_expand_k, expand_v=c.la_expand_v,
            num_heads=heads, num_kv_heads=c.la_num_kv_heads, use_output_gate=c.la_use_output_gate,
            gate_fn=c.la_gate_fn, gate_logit_normalizer=c.la_gate_logit_normalizer,
            gate_low_rank_dim=c.la_gate_low_rank_dim, clamp_min=c.la_clamp_min,
            elementwise_affine=c.la_norm_elementwise_affine, **conv)
    if name == "retention":
        from fla.layers import MultiScaleRetention

        return MultiScaleRetention(
            mode="chunk", hidden_size=h, expand_k=c.la_expand_k, expand_v=c.la_expand_v,
            num_heads=heads, num_kv_heads=c.la_num_kv_heads, use_output_gate=c.la_use_output_gate,
            gate_fn=c.la_gate_fn, elementwise_affine=c.la_norm_elementwise_affine, **conv)
    if name == "deltanet":
        from fla.layers import DeltaNet

        return DeltaNet(mode="chunk", hidden_size=h, expand_k=c.la_expand_k,
                        expand_v=c.la_expand_v, num_heads=heads, use_beta=c.la_use_beta,
                        use_gate=c.la_use_output_gate, allow_neg_eigval=c.la_allow_neg_eigval,
                        qk_activation=c.la_qk_activation, qk_norm=c.la_qk_norm, **conv)
    if name == "gated_deltanet" and c.la_num_v_heads is None:
        from fla.layers import GatedDeltaNet

        # fla sizes it by head: key dim = heads x head_dim, value dim = key dim x expand_v
        return GatedDeltaNet(hidden_size=h, head_dim=int(h * c.la_expand_k) // heads,
                             num_heads=heads, expand_v=c.la_expand_v / c.la_expand_k,
                             use_gate=c.la_use_output_gate, mode="chunk",
                             allow_neg_eigval=c.la_allow_neg_eigval, **conv)
    # Not kda: fla's KimiDeltaAttention gates its output through a low-rank projection, ours
    # through the full-rank gate every mixer has.
    return None


def fla_layer_row(name, mixer, seq, batch, dtype, warmup, iters, graph):
    """fla's layer (fla_layer) at the bench's shape, fwd+bwd from a [b, s, h] input and ones as
    its output's gradient: fla_layer_ms (and fla_layer_graph_ms), with both parameter counts.
    On the CPU only the counts: fla's layers run Triton kernels."""
    theirs = fla_layer(name, mixer)
    if theirs is None:
        return {"fla_note": f"no fla layer mapped for {name}"}
    row = {"params": sum(p.numel() for p in mixer.parameters()),
           "fla_params": sum(p.numel() for p in theirs.parameters())}
    if not torch.cuda.is_available():
        row["fla_note"] = "fla's layer runs Triton kernels: timed on CUDA only"
        return row
    from linear_moe.ops import fla_compat

    fla_compat.install_hopper_guard_shim()  # as for ours: fla #640's refusal, lifted alike
    theirs = theirs.to(device(), dtype)
    x = torch.randn(batch, seq, mixer.config.hidden_size, device=device(), dtype=dtype,
                    requires_grad=True)
    grad_out = torch.ones_like(x)

    def step():
        theirs(x)[0].backward(grad_out)

    row["fla_layer_ms"] = time_fn(step, warmup, iters)
    if graph:
        from linear_moe.cuda_graph import capture_step

        try:
            row["fla_layer_graph_ms"] = time_fn(
                capture_step(step, [x, *theirs.parameters()])[0], warmup, iters)
        except Exception as refused:  # noqa: BLE001 - fla's layer as it is: note why, go on
            row["fla_note"] = f"fla's layer not capturable: {type(refused).__name__}: {refused}"
    return row


def record_op_calls(mixer, x):
    """Run the mixer once and capture the op calls it makes with their inputs (MoM mixers call
    the op once per memory)."""
    from linear_moe import ops

    calls = []
    originals = {n: getattr(ops, n) for n in ops.__all__  # the ops, not the tables
                 if callable(getattr(ops, n)) and n != "resolve_backend"}

    def recorder(name):
        def call(*args, **kwargs):
            calls.append((originals[name], args, kwargs))
            return originals[name](*args, **kwargs)
        return call

    try:
        for n in originals:
            setattr(ops, n, recorder(n))
        mixer(x)
    finally:
        for n, fn in originals.items():
            setattr(ops, n, fn)
    assert calls, "the mixer called no op of linear_moe.ops"
    return calls


def norm_steps(seq, batch, hidden, dtype):
    """The two norms around the mixer, fwd+bwd, as the model runs them: the input norm storing
    its output batch-first (its output's gradient and its residual branch's arrive batch-first)
    and the pre-MLP norm storing its input gradient batch-first (MixerInputResidualRMSNorm,
    AfterMixerResidualRMSNorm); and as the seq-first norms before them. Returns (batch-first
    step, seq-first step): their difference is what the batch-first layout costs or saves
    outside the mixer."""
    from linear_moe.layers.norm import rms_norm_with_residual

    def ones(batch_first):
        if batch_first:
            return torch.ones(batch, seq, hidden, device=device(), dtype=dtype).transpose(0, 1)
        return torch.ones(seq, batch, hidden, device=device(), dtype=dtype)

    x = torch.randn(seq, batch, hidden, device=device(), dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device(), dtype=dtype, requires_grad=True)
    grads = {bf: (ones(bf), ones(bf)) for bf in (True, False)}
    from_mlp = ones(False)  # the pre-MLP norm's output and residual gradients

    def step(batch_first):
        def run():
            # x's and w's gradients returned, not accumulated into .grad (a pass of its own)
            y, r = rms_norm_with_residual(x, w, 1e-5, batch_first=batch_first)
            torch.autograd.grad([y, r], [x, w], grads[batch_first])
            y, r = rms_norm_with_residual(x, w, 1e-5, batch_first_grad=batch_first)
            torch.autograd.grad([y, r], [x, w], [from_mlp, from_mlp])
        return run

    return step(True), step(False)


def bench_mixer(name, hidden, heads, seq, batch, dtype, warmup, iters, profile_to=None,
                conv_kernel="auto", graph=False, input_layout="batch_first", options=None,
                against_fla=False):
    mixer = build_mixer(name, hidden, heads, dtype, conv_kernel, **(options or {}))
    # The mixer's input [s, b, h] as the model's input norm gives it (MixerInputRMSNorm): the
    # transposed view of a contiguous [b, s, h] tensor. seq_first: a contiguous [s, b, h] one
    # (the norms before 2026-12-07; sequence parallelism's gathered input), its output's
    # gradient likewise.
    batch_first = input_layout == "batch_first"
    shape = (batch, seq, hidden) if batch_first else (seq, batch, hidden)
    x_mem = torch.randn(*shape, device=device(), dtype=dtype, requires_grad=True)

    # Gradients that arrive from outside are ones made once: a fill or a reduction inside a
    # timed step would be work the layer does not do. The output's gradient batch-first too,
    # as the pre-MLP norm's backward stores it (AfterMixerResidualRMSNorm).
    grad_out = torch.ones(batch, seq, hidden, device=device(), dtype=dtype).transpose(0, 1)
    if not batch_first:
        grad_out = grad_out.contiguous()

    def layer_step():
        out, _ = mixer(x_mem.transpose(0, 1) if batch_first else x_mem)
        out.backward(grad_out)

    # The op's inputs as the layer passed them, kept once; each bare step takes new leaves over
    # them (no copy), so their gradients are assigned as the layer's intermediates' are, not
    # accumulated (which would add a pass over every input per step).
    kept = lambda a: a.detach().clone() if torch.is_tensor(a) else a
    fresh = lambda a: (a.detach().requires_grad_(a.is_floating_point())
                       if torch.is_tensor(a) else a)
    calls = [(fn, [kept(a) for a in args], {k: kept(v) for k, v in kwargs.items()})
             for fn, args, kwargs in record_op_calls(
                 mixer, x_mem.transpose(0, 1) if batch_first else x_mem)]
    for _, _, kwargs in calls:  # the bare op as fla's layers call it: q / k normalised inside
        if "use_qk_l2norm" in kwargs:  # (the layer's convs may do it: --la-qk-l2norm-in-conv)
            kwargs["use_qk_l2norm"] = True
    # Each projection as the layer computes it: until 2026-12-06 every ColumnParallelLinear was
    # taken as a projection of x (hidden -> out), so a low-rank up projection (r -> out) cost the
    # bare step a full GEMM from x and its down projection (a torch.nn.Linear) cost nothing.
    x_width, others = projection_shapes(mixer, hidden)
    w_in = torch.randn(x_width, hidden, device=device(), dtype=dtype, requires_grad=True)
    # A low-rank up projection's input is a leaf with its gradient computed, as in the layer
    # (where it feeds the down projection's backward).
    low_rank = [(torch.randn(seq * batch, r, device=device(), dtype=dtype),
                 torch.randn(out, r, device=device(), dtype=dtype, requires_grad=True))
                for r, out in others]
    w_out = torch.randn(hidden, mixer.value_dim, device=device(), dtype=dtype,
                        requires_grad=True)
    # The output GEMM's input, a leaf so that its input gradient is computed, as in a layer
    # (where it feeds the op's backward): a constant input would skip that GEMM.
    o_kept = torch.zeros(seq * batch, mixer.value_dim, device=device(), dtype=dtype)
    ones = []

    def bare_step():
        proj = x_mem @ w_in.t()  # all projections of x as one GEMM, rows in memory order
        outs = [fn(*[fresh(a) for a in args], **{k: fresh(v) for k, v in kwargs.items()})[0]
                for fn, args, kwargs in calls]
        ups = [a.detach().requires_grad_() @ w.t() for a, w in low_rank]
        out = o_kept.detach().requires_grad_() @ w_out.t()
        tensors = [proj, *ups, *outs, out]
        if not ones:  # the first (warm-up) step makes them
            ones.extend(torch.ones_like(t) for t in tensors)
        torch.autograd.backward(tensors, ones)

    layer_host, bare_host = [], []
    layer_ms = time_fn(layer_step, warmup, iters, layer_host)
    bare_ms = time_fn(bare_step, warmup, iters, bare_host)
    # Host ms until the step returns: a layer step whose host time nears its total leaves the
    # GPU idle between kernels (its eager overhead then holds host time, not device time).
    row = {"mixer": name, "T": seq, "B": batch, "input": input_layout,
           "gemm_form": getattr(mixer, "gemm_form", None), "layer_ms": layer_ms,
           "bare_ms": bare_ms, "layer_host_ms": statistics.median(layer_host),
           "bare_host_ms": statistics.median(bare_host)}
    if any("use_qk_l2norm" in kwargs for _, _, kwargs in calls):  # where q / k are normalised
        row["qk_norm"] = "conv" if getattr(mixer, "qk_l2norm_in_conv", False) else "op"
    if hasattr(mixer, "key_log_decay"):  # GLA: our one kernel or the GEMM + compiled logsigmoid
        row["log_decay"] = ("fused" if mixer.fused_log_decay and torch.cuda.is_available()
                            else "torch")  # the kernel is CUDA-only
    # The batch-first input is the input norm's doing: the layer is charged what that norm
    # takes over the seq-first one (norm_ms - norm_ref_ms; negative where it is faster).
    norm_bf, norm_ref = norm_steps(seq, batch, hidden, dtype) if batch_first else (None, None)
    if batch_first:
        row["norm_ms"], row["norm_ref_ms"] = (time_fn(norm_bf, warmup, iters),
                                              time_fn(norm_ref, warmup, iters))
    extra = row["norm_ms"] - row["norm_ref_ms"] if batch_first else 0.0
    row["overhead"] = (layer_ms + extra) / bare_ms
    if graph:  # device time only: each step captured as one CUDA graph and replayed
        from linear_moe.cuda_graph import capture_step

        bare_leaves = [w_in, w_out, *(w for _, w in low_rank)]
        layer_graph = capture_step(layer_step, [x_mem, *mixer.parameters()])[0]
        bare_graph = capture_step(bare_step, bare_leaves)[0]
        extra_graph = 0.0
        row["layer_graph_ms"] = time_fn(layer_graph, warmup, iters)
        row["bare_graph_ms"] = time_fn(bare_graph, warmup, iters)
        if batch_first:
            graphs = [capture_step(step, [])[0] for step in (norm_bf, norm_ref)]
            row["norm_graph_ms"], row["norm_ref_graph_ms"] = (time_fn(g, warmup, iters)
                                                              for g in graphs)
            extra_graph = row["norm_graph_ms"] - row["norm_ref_graph_ms"]
        row["overhead_graph"] = (row["layer_graph_ms"] + extra_graph) / row["bare_graph_ms"]
    if against_fla:  # ours over fla's own layer, ours charged as for its overhead
        row.update(fla_layer_row(name, mixer, seq, batch, dtype, warmup, iters, graph))
        if "fla_layer_ms" in row:
            row["vs_fla"] = (layer_ms + extra) / row["fla_layer_ms"]
        if "fla_layer_graph_ms" in row:
            row["vs_fla_graph"] = (row["layer_graph_ms"] + extra_graph) / row["fla_layer_graph_ms"]
    if profile_to:
        from profile_step import device_ms_by_op, op_diff, profile, summarise

        by_op = {}
        for which, step in (("layer", layer_step), ("bare", bare_step)):
            prof = profile(step, 1, 3, record_shapes=True)
            text, _ = summarise(prof, 3)
            by_op[which] = device_ms_by_op(prof, 3)
            with open(f"{profile_to}_{name}_{seq}_{which}.txt", "w") as f:
                f.write(text)
        # Where the overhead goes: each op (with its input shapes) by layer minus bare time.
        with open(f"{profile_to}_{name}_{seq}_diff.txt", "w") as f:
            f.write(f"# {name} T={seq} B={batch}, 3 profiled steps each: "
                    f"{json.dumps(environment())}\n")
            f.write(op_diff(by_op["layer"], by_op["bare"]))
    return row


def main(argv=None):
    from linear_moe.config import LinearMixerFields
    from linear_moe.layers.layout import GEMM_FORMS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="*", default=None, help="default: all registered")
    add_layer_args(parser, [2048, 8192, 32768])
    parser.add_argument("--profile", metavar="PREFIX",
                        help="also write <PREFIX>_<mixer>_<T>_{layer,bare}.txt profiler tables and "
                             "_diff.txt, the ops by how much longer the layer spends on them")
    parser.add_argument("--conv-kernel", choices=["auto", "fla", "ours"], default="auto",
                        help="CUDA kernel of the mixers' short convolutions (--la-conv-kernel)")
    parser.add_argument("--qk-l2norm-in", choices=["conv", "op"], default=None,
                        help="where the delta-rule mixers L2-normalise q / k: in their short "
                             "convs (--la-qk-l2norm-in-conv, the model's default) or in the op; "
                             "the bare op normalises them either way")
    parser.add_argument("--fused-log-decay", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="GLA's key decay in one kernel of ours or the GEMM and a compiled "
                             "logsigmoid (--la-fused-log-decay; default: the model's)")
    parser.add_argument("--gemm-form", choices=GEMM_FORMS, default=LinearMixerFields.la_gemm_form,
                        help="the mixer's projection GEMMs on contiguous operands batched over "
                             "B or as one 2-D GEMM over all rows (--la-gemm-form; default: the "
                             "model's)")
    parser.add_argument("--against-fla", action="store_true",
                        help="also time fla's own layer (fla.layers) at the same shape where it "
                             "does the same math (gla, retention, deltanet, gated_deltanet): "
                             "vs_fla = ours / fla's, fwd+bwd (timed on CUDA only)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time both steps captured as CUDA graphs (device time; GPU)")
    parser.add_argument("--input-layout", choices=["batch_first", "seq_first"],
                        default="batch_first",
                        help="the mixer's input and its output's gradient as the model's "
                             "norms store them (default; the layer is charged those norms' time "
                             "over the seq-first ones') or contiguous [s, b, h] tensors (rows "
                             "before 2026-12-07)")
    args, dtype = parse_layer_args(parser, argv)
    qk_in_conv = {None: None, "conv": True, "op": False}[args.qk_l2norm_in]
    from linear_moe.registry import registered_mixers

    rows = []
    for name in args.mixers or sorted(registered_mixers()):
        for seq in args.seq_lens:
            batch = max(1, args.tokens // seq)
            try:
                row = bench_mixer(name, args.hidden, args.heads, seq, batch, dtype,
                                  args.warmup, args.iters, args.profile, args.conv_kernel,
                                  args.cuda_graph and torch.cuda.is_available(),
                                  args.input_layout,
                                  dict(la_qk_l2norm_in_conv=qk_in_conv,
                                       la_fused_log_decay=args.fused_log_decay,
                                       la_gemm_form=args.gemm_form),
                                  args.against_fla)
            except ValueError as refused:  # e.g. mamba2's chunk path on Hopper: note it, go on
                row = {"mixer": name, "T": seq, "B": batch, "note": f"refused: {refused}"}
            rows.append(emit(row))
    write_results(rows, args.out, "Layer overhead: Megatron mixer layer vs bare op + GEMMs",
                  ["mixer", "T", "B", "input", "gemm_form", "qk_norm", "log_decay", "layer_ms", "bare_ms", "norm_ms", "norm_ref_ms",
                   "overhead", "layer_host_ms", "bare_host_ms", "layer_graph_ms",
                   "bare_graph_ms", "norm_graph_ms", "norm_ref_graph_ms", "overhead_graph",
                   "params", "fla_params", "fla_layer_ms", "fla_layer_graph_ms", "vs_fla",
                   "vs_fla_graph", "fla_note", "note"])
    return rows


if __name__ == "__main__":
    main()
