"""Context parallelism's compute per rank: a mixer layer fwd+bwd over one rank's tokens (megatron's
two pieces of c tokens each) run with its CP form, against the same tokens run without CP.

One process, a CP group of one rank: the exchanges are local (the states and transitions an
all-gather would move are [B, H, K, V] per piece, small beside the activations), so this
measures the work a CP rank adds, not the network. Forms, each on the same layer and input:

* ``none``     - no CP (the layer as on one GPU);
* ``default``  - the layer's CP form: one op pass for the diagonal-decay ops (ops.DIAGONAL_DECAY),
  the generic state passing otherwise (one op pass at V + K value width with the transition
  probe in the extra columns; two passes for the no-decay ops);
* ``three_pass`` - the generic state passing for every op (the zero-state pass, the transition
  probe from the identity state, the pass from the start state): what every mixer paid before
  the one-pass forms;
* ``fla``      - fla's own CP inside its chunk kernels (--la-cp-kernel fla; the delta-rule / DPLR
  mixers, on CUDA).

torch.compile'd pieces (GDN's / GLA's log decay) recompile for each form's shapes: run with
TORCHDYNAMO_DISABLE=1 where compile time matters more than those pieces' speed (all forms alike).

    python benchmarks/cp_bench.py --mixers gla gated_deltanet --seq-lens 8192 32768 --out $OUT/cp
    python benchmarks/cp_bench.py --toy      # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_layer_args, device, emit, parse_layer_args, time_fn, write_results,
)
from layer_bench import build_mixer  # noqa: E402

FORMS = ("none", "default", "three_pass", "fla")


@contextlib.contextmanager
def _cp_form(mixer, form: str):
    """Within: the mixer's CP runs as ``form`` (three_pass: the one-pass tables emptied; fla:
    --la-cp-kernel fla)."""
    from linear_moe import ops

    saved = dict(ops.DIAGONAL_DECAY), set(ops.WIDENED_PROBE), mixer.config.la_cp_kernel
    if form == "three_pass":
        ops.DIAGONAL_DECAY.clear()
        ops.WIDENED_PROBE.clear()
    mixer.config.la_cp_kernel = "fla" if form == "fla" else "ours"
    try:
        yield
    finally:
        ops.DIAGONAL_DECAY.update(saved[0])
        ops.WIDENED_PROBE.update(saved[1])
        mixer.config.la_cp_kernel = saved[2]


def bench_mixer(name, hidden, heads, seq, batch, dtype, warmup, iters, wanted=FORMS):
    from megatron.core import parallel_state

    from linear_moe.mixers.base import LinearMixer
    from linear_moe.parallel.context_parallel import SequenceChunks

    mixer = build_mixer(name, hidden, heads, dtype)
    x = torch.randn(seq, batch, hidden, device=device(), dtype=dtype, requires_grad=True)
    grad_out = torch.ones(seq, batch, hidden, device=device(), dtype=dtype)

    def step():
        out, _ = mixer(x)
        out.backward(grad_out)

    chunks = SequenceChunks(parallel_state.get_context_parallel_group())
    # A mixer with a cp_recurrent of its own (gsa) has no generic form to compare; fla's own
    # CP is for the mixers that declare it, on CUDA.
    forms = [f for f in FORMS
             if f in wanted
             and (f != "three_pass" or type(mixer).cp_recurrent is LinearMixer.cp_recurrent)
             and (f != "fla" or (mixer.fla_context_parallel and torch.cuda.is_available()))]
    row = {"mixer": name, "T": seq, "B": batch}
    reference = None
    for form in forms:
        mixer.cp = None if form == "none" else chunks
        with _cp_form(mixer, form):
            with torch.no_grad():  # the same math on every form: their outputs must agree
                out = mixer(x)[0].float()
            if reference is None:
                reference = out
            else:
                row[f"{form}_rel_diff"] = ((out - reference).norm() / reference.norm()).item()
            row[f"{form}_ms"] = time_fn(step, warmup, iters)
            print(f"{name} T={seq} {form}: {row[f'{form}_ms']:.2f} ms", flush=True)
    mixer.cp = None
    if "none" in forms:
        for form in forms[1:]:
            row[f"{form}_x"] = row[f"{form}_ms"] / row["none_ms"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="*", default=None,
                        help="default: every mixer with CP support")
    parser.add_argument("--forms", nargs="*", choices=FORMS, default=list(FORMS),
                        help="the CP forms to time (the first one's output is the others' "
                        "reference; ratios need none)")
    add_layer_args(parser, [8192, 32768],
                   "tokens of a rank's two pieces together (the local sequence)")
    args, dtype = parse_layer_args(parser, argv)
    from linear_moe.registry import registered_mixers

    names = args.mixers or sorted(n for n, e in registered_mixers().items() if e.supports_cp)
    rows = []
    for name in names:
        for seq in args.seq_lens:
            batch = max(1, args.tokens // seq)
            try:
                row = bench_mixer(name, args.hidden, args.heads, seq, batch, dtype,
                                  args.warmup, args.iters, args.forms)
            except ValueError as refused:  # e.g. mamba2's chunk path on Hopper: note it, go on
                row = {"mixer": name, "T": seq, "B": batch, "note": f"refused: {refused}"}
            rows.append(emit(row))
    write_results(rows, args.out, "Context parallelism's compute per rank: the layer with its "
                  "CP form vs without (CP group of one; ratios to none)",
                  ["mixer", "T", "B", "none_ms", "default_ms", "three_pass_ms", "fla_ms",
                   "default_x", "three_pass_x", "fla_x", "default_rel_diff",
                   "three_pass_rel_diff", "fla_rel_diff", "note"])
    return rows


if __name__ == "__main__":
    main()
